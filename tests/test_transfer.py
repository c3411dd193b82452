"""Losses, Eq. 4, the method table, streams, weight averaging and a small adaptation."""

import numpy as np
import pytest
import torch

from msda.losses import coral, mmd
from msda.network.model import DenseSME, MemberSpec
from msda.network.stacked import PartedEnsemble, StackedEnsemble, split_members
from msda.transfer import (
    FitData,
    LossWeights,
    Stream,
    TrainSettings,
    TransferError,
    WeightAverage,
    epoch_batches,
    eq4_beta,
    fit,
)

SPECS = [MemberSpec(1, 8), MemberSpec(2, 8)]


def _data(n_lab=60, n_tgt=90, n_c=70, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x_lab = torch.rand(n_lab, 153, generator=g)
    x_tgt = (torch.rand(n_tgt, 153, generator=g) + shift).clamp(0, 1)
    x_c = torch.rand(n_c, 153, generator=g)
    return FitData(x_lab, torch.rand(n_lab, generator=g) * 0.4, x_c, torch.rand(n_c, generator=g) * 0.4, x_tgt)


def test_coral_matches_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 50, 32)), rng.normal(2, 3, size=(3, 70, 32))
    got = coral(torch.from_numpy(s), torch.from_numpy(t)).numpy()
    for k in range(3):
        cs, ct = np.cov(s[k], rowvar=False), np.cov(t[k], rowvar=False)
        assert got[k] == pytest.approx(np.sum((cs - ct) ** 2) / (4 * 32 * 32), rel=1e-12)


def test_mmd_zero_for_same_set_positive_for_shift():
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(0))
    assert mmd(x, x).abs().max() < 1e-6
    assert (mmd(x, x + 1.0) > 0.01).all()


def test_method_table():
    table = {m: LossWeights.for_method(m) for m in ("finetune", "ms", "da", "msda")}
    assert (table["finetune"].alpha, table["finetune"].beta) == (1.0, 0.0)
    assert (table["ms"].alpha, table["ms"].beta) == (0.7, 0.0)
    assert (table["da"].alpha, table["da"].beta) == (1.0, "auto")
    assert (table["msda"].alpha, table["msda"].beta) == (0.7, "auto")
    assert [(w.uses_9km, w.uses_target) for w in table.values()] == [(False, False), (True, False), (False, True), (True, True)]
    assert LossWeights.for_method("msda", alpha=0.5, beta=2.0).beta == 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "msda", "alpha": 1.5}, "alpha must be in"),
        ({"method": "msda", "beta": -1.0}, "beta must be"),
        ({"method": "msda", "beta": "big"}, "beta must be"),
        ({"method": "fancy"}, "unknown method"),
        ({"method": "finetune", "alpha": 0.5}, "fixes alpha"),
        ({"method": "ms", "beta": 1.0}, "fixes beta"),
        ({"method": "msda", "domain_loss": "kl"}, "unknown domain loss"),
    ],
)
def test_bad_loss_settings(kwargs, match):
    with pytest.raises(TransferError, match=match):
        LossWeights.for_method(**kwargs)


def test_stream_draws_without_replacement_until_exhausted():
    s = Stream(20, np.random.default_rng(0), torch.device("cpu"))
    drawn = torch.cat([s.take(7) for _ in range(6)]).tolist()  # 42 draws
    assert sorted(drawn[:20]) == list(range(20))
    assert sorted(drawn[20:40]) == list(range(20))
    assert drawn[:20] != drawn[20:40]  # reshuffled for the second pass


def test_epoch_batches_cover_each_sample_once():
    rng = np.random.default_rng(0)
    batches = epoch_batches(257, 128, rng, torch.device("cpu"))
    assert [len(b) for b in batches] == [128, 129]  # a last batch of 1 joins the one before
    assert sorted(torch.cat(batches).tolist()) == list(range(257))
    assert [len(b) for b in epoch_batches(300, 128, rng, torch.device("cpu"))] == [128, 128, 44]


def test_eq4_balances_the_terms_as_training_sees_them():
    """beta * E[CORAL of two 128-sample batches] = alpha * MSE at the start (Eq. 4 with the
    domain loss of training batches); the whole-set CORAL lacks the batches' noise floor, so a
    beta from it would weigh the domain term more."""
    e = DenseSME(SPECS, seed=0)
    data = _data(n_lab=1280, n_tgt=2560, shift=0.2)
    beta = eq4_beta(e, data, alpha=0.7, domain_loss="coral", batch=128, seed=3)
    e.eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for k, m in enumerate(e.members):
            y, f_s = m(data.x_labeled, return_features=True)
            _, f_t = m(data.x_target, return_features=True)
            fine = torch.mean((y - data.y_labeled) ** 2).item()
            draws = [coral(f_s[torch.randperm(1280, generator=g)[:128]][None].double(),
                           f_t[torch.randperm(2560, generator=g)[:128]][None].double())[0].item() for _ in range(400)]
            expected = float(np.mean(draws))  # Monte Carlo over random batch pairs, independent of eq4_beta
            assert beta[k].item() * expected == pytest.approx(0.7 * fine, rel=0.1)
            whole = coral(f_s[None].double(), f_t[None].double())[0].item()
            assert whole < expected  # the noise floor of 128-sample covariances


def _fit(weights, data=None, epochs=3, seed=0, device_override="cpu", **kw):
    settings = TrainSettings(epochs=epochs, batch=16, seed=seed, device=device_override, **kw)
    return fit(DenseSME(SPECS, seed=0), data or _data(), weights, settings, progress=False)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.ensemble.state_dict().values(), b.ensemble.state_dict().values()))


def test_alpha_one_beta_zero_is_finetune():
    a = _fit(LossWeights(alpha=1.0, beta=0.0))
    b = _fit(LossWeights.for_method("finetune"))
    c = _fit(LossWeights.for_method("msda", alpha=1.0, beta=0.0))
    assert _same(a, b) and _same(a, c)
    assert all(np.isnan(r["coarse_9km"]) and np.isnan(r["domain"]) for r in a.losses)
    assert not _same(a, _fit(LossWeights(alpha=1.0, beta=0.0), seed=1))  # the seed matters


def test_methods_use_their_streams():
    ms = _fit(LossWeights.for_method("ms"))
    da = _fit(LossWeights.for_method("da"))
    msda = _fit(LossWeights.for_method("msda"))
    assert all(np.isfinite(r["coarse_9km"]) and np.isnan(r["domain"]) for r in ms.losses)
    assert all(np.isnan(r["coarse_9km"]) and np.isfinite(r["domain"]) for r in da.losses)
    assert all(np.isfinite(r["coarse_9km"]) and np.isfinite(r["domain"]) for r in msda.losses)
    for r in msda.losses:  # joint = alpha * 50 m + (1 - alpha) * 9 km + beta * domain, per member
        beta = msda.beta[SPECS.index(next(s for s in SPECS if s.name == r["member"]))]
        assert r["joint"] == pytest.approx(0.7 * r["fine_50m"] + 0.3 * r["coarse_9km"] + beta * r["domain"], rel=1e-5)
    assert len(msda.losses) == 3 * len(SPECS)


def test_weight_average_is_mean_of_last_epochs():
    saved = []

    def keep(epoch, stacked):
        saved.append({k: v.detach().clone() for k, v in stacked.state_dict().items()})

    res = fit(DenseSME(SPECS, seed=0), _data(), LossWeights.for_method("msda"),
              TrainSettings(epochs=5, batch=16, average_last=3, device="cpu"), progress=False, on_epoch_end=keep)
    mean = {k: torch.stack([s[k] for s in saved[-3:]]).mean(0) for k in saved[0] if saved[0][k].is_floating_point()}
    expected = PartedEnsemble(SPECS, res.ensemble.schema, split_members(SPECS, res.parts))  # the parts it trained in
    expected.load_state_dict({**saved[-1], **mean})
    got = PartedEnsemble.from_ensemble(res.ensemble, res.parts)
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)
    avg = WeightAverage()
    with pytest.raises(TransferError):
        avg.result()


def test_missing_streams_are_errors():
    data = _data()
    with pytest.raises(TransferError, match="9 km"):
        _fit(LossWeights.for_method("ms"), FitData(data.x_labeled, data.y_labeled, x_target=data.x_target))
    with pytest.raises(TransferError, match="target"):
        _fit(LossWeights.for_method("da"), FitData(data.x_labeled, data.y_labeled))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_runs_on_cuda():
    res = _fit(LossWeights.for_method("msda"), device_override="cuda")
    assert res.device.startswith("cuda")
    assert all(torch.isfinite(p).all() for p in res.ensemble.parameters())


def test_parts_in_threads_equal_parts_in_turn(monkeypatch):
    """Two parts stepped side by side in threads give exactly what they give one after another
    (each part draws dropout from its own generator), and the input ensemble is not changed."""
    ensemble = DenseSME(SPECS, seed=0)
    before = {k: v.clone() for k, v in ensemble.state_dict().items()}
    settings = TrainSettings(epochs=2, batch=16, seed=3, device="cpu", parts=2)
    results = []
    for threads in (2, 1):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)  # 1: no room for side-by-side parts, they run in turn
        try:
            results.append(fit(ensemble, _data(), LossWeights.for_method("msda"), settings, progress=False))
        finally:
            torch.set_num_threads(old)
    assert _same(*results)
    assert all(torch.equal(v, ensemble.state_dict()[k]) for k, v in before.items())
    one_part = fit(ensemble, _data(), LossWeights.for_method("msda"), TrainSettings(epochs=2, batch=16, seed=3, device="cpu", parts=1), progress=False)
    assert not _same(results[0], one_part)  # other generators: other dropout masks
    with pytest.raises(TransferError, match="parts"):
        TrainSettings(parts=-1).check()


def test_split_members_balances_cost():
    from msda.network.model import default_members
    from msda.network.stacked import member_cost

    specs = default_members()
    parts = split_members(specs, 2)
    assert sorted(parts[0] + parts[1]) == list(range(25))
    costs = [sum(member_cost(specs[i]) for i in p) for p in parts]
    assert max(costs) / min(costs) < 1.001  # the swaps after the greedy split (which left 1.05)
    assert split_members(specs, 2) == parts  # deterministic
    three = split_members(specs, 3)
    assert sorted(sum(three, [])) == list(range(25))
    costs = [sum(member_cost(specs[i]) for i in p) for p in three]
    assert max(costs) / min(costs) < 1.01
    assert split_members(specs[:1], 2) == [[0]]  # never an empty part


def test_parted_ensemble_matches_one_stack():
    e = DenseSME(SPECS, seed=0).eval()
    one = StackedEnsemble.from_ensemble(e).eval()
    two = PartedEnsemble.from_ensemble(e, 2).eval()
    x = torch.rand(20, 153)
    with torch.no_grad():
        y1, f1 = one(x)
        y2, f2 = two(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(f1, f2)
    back = two.to_ensemble()
    for (k, a), b in zip(back.state_dict().items(), e.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_auto_parts_only_for_large_steps(monkeypatch):
    from msda.network.model import default_members
    from msda.transfer import auto_parts

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert auto_parts(default_members(), 384, cpu) == 2  # MSDA's three streams of 128
    assert auto_parts(default_members(), 256, cpu) == 1  # pretraining: one stream of 256
    assert auto_parts(SPECS, 384, cpu) == 1  # small members: the dispatch of a second part costs more
    assert auto_parts(default_members(), 384, torch.device("cuda")) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert auto_parts(default_members(), 384, cpu) == 1
    assert _fit(LossWeights.for_method("msda"), epochs=1).parts == 1  # recorded in the result
