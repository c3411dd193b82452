"""One declared architecture, several engines: each either declines a spec or matches the
reference modules (outputs and bottleneck features in inference; a fit's losses in training)."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from msda.cli import app
from msda.errors import WeightsError
from msda.network.model import DenseSME, MemberSpec
from msda.network.reference import ReferenceEngine, ReferenceParted
from msda.network.spec import DEFAULT_ARCH, ArchSpec
from msda.network.engines import inference_engine, training_engine
from msda.network.fused import FusedEnsemble
from msda.predict import predict
from msda.schema import DEFAULT_SCHEMA, load_schema
from msda.network.stacked import PartedEnsemble
from msda.transfer import FitData, LossWeights, TrainSettings, fit
from msda.weights import load_ensemble, save_ensemble

from conftest import randomise_batchnorm

SPECS = {
    "default": DEFAULT_ARCH,
    "kernel3": ArchSpec(kernel=3),
    "kernel7": ArchSpec(kernel=7),
    "filters_32_16_8": ArchSpec(conv_filters=(32, 16, 8)),
    "pools_2_2_2": ArchSpec(pools=(2, 2, 2)),
    "four_convs_kernel7": ArchSpec(conv_filters=(32, 16, 8, 4), kernel=7, pools=(2, 2, 2, 2)),
    "blocks_of_two_bottleneck_16": ArchSpec(block_layers=2, bottleneck=16, dropout=0.2),
}


def _schema(tmp_path, n_series: int, length: int):
    if (n_series, length) == (3, 46):
        return DEFAULT_SCHEMA
    series = "".join(f"[[series]]\nname = 's{i}'\nlo = 0\nhi = 1\nlength = {length}\n" for i in range(n_series))
    path = tmp_path / f"s{n_series}_{length}.toml"
    path.write_text(f"name = 's{n_series}x{length}'\n[[scalars]]\nname = 'a'\nlo = 0\nhi = 1\n"
                    f"[[scalars]]\nname = 'b'\nlo = 0\nhi = 1\n{series}")
    return load_schema(path)


@pytest.mark.parametrize("shape", [(3, 46), (1, 70), (3, 8), (0, 0)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(SPECS))
def test_inference_engines_decline_or_match(tmp_path, name, shape):
    arch = SPECS[name]
    schema = _schema(tmp_path, *shape)
    if schema.n_series and arch.pooled_length(schema.series_length) < 1:
        with pytest.raises(WeightsError, match="too short"):
            DenseSME([MemberSpec(1, 8)], schema=schema, arch=arch)
        return
    ens = DenseSME([MemberSpec(1, 8), MemberSpec(5, 8)], schema=schema, seed=0, arch=arch).eval()
    with torch.no_grad():  # give the batch norms non-trivial running statistics
        for m in ens.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(70, schema.n_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = [m(x, return_features=True) for m in ens.members]
    want_y = torch.stack([r[0] for r in ref], 1)
    want_f = torch.stack([r[1] for r in ref])
    engines = [ReferenceEngine(ens)]
    if FusedEnsemble.covers(ens.arch, "infer", schema.n_series):
        engines.append(FusedEnsemble(ens))
    else:
        assert not arch.is_default or not schema.n_series
    for engine in engines:
        y, f = engine.member_features(x)
        torch.testing.assert_close(engine.member_outputs(x), want_y, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y.T, want_y, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f, want_f, rtol=1e-4, atol=1e-5)
    chosen = inference_engine(ens)
    assert isinstance(chosen, FusedEnsemble) == (arch.is_default and schema.n_series > 0)
    np.testing.assert_allclose(predict(ens, x.numpy()).members, want_y.numpy(), rtol=1e-4, atol=1e-5)


def _trainer_like(engine, ens):
    """A fresh trainer of the same class and member split as ``engine``, holding ``ens``'s parameters."""
    if isinstance(engine, PartedEnsemble):
        return PartedEnsemble.from_ensemble(ens, len(engine.parts))
    return ReferenceParted(ens)


def _in_module_layout(trainer, tensors: dict) -> dict:
    """Tensors named like ``trainer``'s parameters, as the ``DenseSME`` state dict they map onto."""
    holder = _trainer_like(trainer, trainer.to_ensemble())
    holder.load_state_dict({**holder.state_dict(), **tensors})
    return holder.to_ensemble().state_dict()


@pytest.mark.parametrize("shape", [(3, 46), (1, 70), (3, 8), (0, 0)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(SPECS))
def test_training_engines_decline_or_match(tmp_path, name, shape):
    """The trainer the dispatcher picks matches the reference modules in a training-mode step
    (dropout off on both): outputs, bottleneck features, every gradient and the running statistics."""
    arch = SPECS[name]
    schema = _schema(tmp_path, *shape)
    if schema.n_series and arch.pooled_length(schema.series_length) < 1:
        return  # refused when built (test_inference_engines_decline_or_match)
    with torch.random.fork_rng(devices=[]):
        torch.set_default_dtype(torch.float64)
        try:
            ens = DenseSME([MemberSpec(1, 8), MemberSpec(3, 8), MemberSpec(2, 16)], schema=schema, seed=0, arch=arch)
            randomise_batchnorm(ens, seed=1)
            engine = training_engine(ens, 1, 0, torch.device("cpu"))
        finally:
            torch.set_default_dtype(torch.float32)
    fast = arch.is_default and schema.n_series > 0
    assert isinstance(engine, PartedEnsemble) == PartedEnsemble.covers(arch, "train", schema.n_series) == fast
    if not fast:
        assert isinstance(engine, ReferenceParted)
    for m in ens.modules():  # the reference: the same modules, dropout off
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for part in engine.parts:
        if isinstance(part, torch.nn.Module) and hasattr(part, "dropout"):
            part.dropout = False
    for m in engine.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ens.train()
    engine.train()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(40, schema.n_features, dtype=torch.float64, generator=g)
    y, f = engine(x)
    outs = [m(x, return_features=True) for m in ens.members]
    y_ref, f_ref = torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(f, f_ref, rtol=1e-9, atol=1e-9)
    wy, wf = torch.randn(y.shape, dtype=torch.float64, generator=g), torch.randn(f.shape, dtype=torch.float64, generator=g)
    ((y * wy).sum() + (f * wf).sum()).backward()
    ((y_ref * wy).sum() + (f_ref * wf).sum()).backward()
    grads = _in_module_layout(engine, {k: p.grad for k, p in engine.named_parameters()})
    stats = engine.to_ensemble().state_dict()
    scale = max(p.grad.abs().max().item() for p in ens.parameters())
    for key, ref in ens.named_parameters():
        torch.testing.assert_close(grads[key], ref.grad, rtol=0, atol=1e-9 * scale, msg=key)
    for key, ref in ens.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(stats[key].double(), ref, rtol=1e-6, atol=1e-6, msg=key)


def test_msda_fit_of_a_new_architecture_runs_on_the_reference_engine():
    arch = SPECS["four_convs_kernel7"]
    ens = DenseSME([MemberSpec(1, 8), MemberSpec(2, 8)], seed=0, arch=arch)
    g = torch.Generator().manual_seed(3)
    x, xt, xc = (torch.rand(n, 153, generator=g) for n in (200, 150, 150))
    data = FitData(x, torch.rand(200, generator=g) * 0.4, x_target=xt, x_coarse=xc, y_coarse=torch.rand(150, generator=g) * 0.4)
    res = fit(ens, data, LossWeights.for_method("msda", 0.7, "auto", "coral"),
              TrainSettings(epochs=2, batch=64, average_last=1), progress=False)
    assert res.ensemble.arch == arch and res.parts == 1
    assert all(np.isfinite(r["joint"]) for r in res.losses) and all(b > 0 for b in res.beta)
    assert not torch.equal(res.ensemble.members[0].out.weight, ens.members[0].out.weight)


def test_spec_round_trips_and_bad_specs(tmp_path):
    arch = SPECS["four_convs_kernel7"]
    ens = DenseSME([MemberSpec(2, 8)], seed=0, arch=arch)
    save_ensemble(ens, tmp_path / "w")
    back = load_ensemble(tmp_path / "w")
    assert back.arch == arch
    x = torch.rand(9, 153)
    torch.testing.assert_close(back(x), ens.eval()(x))
    assert ArchSpec.from_dict(arch.to_dict()) == arch
    for bad, match in (({"kernel": 4}, "odd"), ({"pools": [2, 2]}, "one window per convolution"),
                       ({"conv_filters": [32, 0, 4]}, "whole numbers"), ({"dropout": 1.0}, r"\[0, 1\)"),
                       ({"kernels": 5}, "unknown architecture key")):
        with pytest.raises(WeightsError, match=match):
            ArchSpec.from_dict(bad, "x.toml")


def test_cli_weights_init_from_an_arch_file(tmp_path):
    (tmp_path / "k7.toml").write_text("[arch]\nconv_filters = [32, 16, 8, 4]\nkernel = 7\npools = [2, 2, 2, 2]\n")
    runner = CliRunner()
    r = runner.invoke(app, ["weights", "init", "--out", str(tmp_path / "w"), "--arch", str(tmp_path / "k7.toml"),
                            "--widths", "8", "--depths", "1,2"])
    assert r.exit_code == 0, r.output
    assert load_ensemble(tmp_path / "w").arch == SPECS["four_convs_kernel7"]
    r = runner.invoke(app, ["weights", "info", str(tmp_path / "w")])
    assert r.exit_code == 0 and "kernel 7" in r.output and "8 filters / pool 2" in r.output
    (tmp_path / "bad.toml").write_text("kernel = 6\n")
    r = runner.invoke(app, ["weights", "init", "--out", str(tmp_path / "w2"), "--arch", str(tmp_path / "bad.toml")])
    assert isinstance(r.exception, WeightsError) and "bad.toml" in str(r.exception) and "odd" in str(r.exception)
    assert not (tmp_path / "w2").exists()
