import pickle

import pytest
import torch

from msda.errors import WeightsError
from msda.network.model import DenseSM, DenseSME, MemberSpec, default_members, pooled_length
from msda.schema import DEFAULT_SCHEMA, FeatureSchema
from msda.weights import load_ensemble, read_manifest, save_authors, save_ensemble

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def authors_keys(depth: int) -> set[str]:
    """The state-dict keys of the authors' DWN module (METHOD.md section 4), written out."""
    keys = set()
    for i in (1, 2, 3):
        keys |= {f"conv_block.conv{i}.weight", f"conv_block.conv{i}.bias"}
        keys |= {f"conv_block.bn{i}.{p}" for p in BN}
    keys |= {f"norm.{p}" for p in BN}
    for k in range(depth):
        for i in (1, 2, 3):
            keys |= {f"dense_layers.{k}.linear{i}.weight", f"dense_layers.{k}.linear{i}.bias"}
            keys |= {f"dense_layers.{k}.bn{i}.{p}" for p in BN}
    keys |= {"fc_layers.0.linear1.weight", "fc_layers.0.linear1.bias"}
    keys |= {f"fc_layers.0.bn1.{p}" for p in BN}
    keys |= {"out.weight", "out.bias"}
    return keys


def test_pooled_length():
    assert pooled_length(46) == 3  # 46 -> 23 -> 11 -> ceil(11/4) = 3
    assert pooled_length(30) == 2


@pytest.mark.parametrize("spec", default_members(), ids=lambda s: s.name)
def test_forward_shapes_all_members(spec):
    m = DenseSM(spec.depth, spec.width)
    assert set(m.state_dict()) == authors_keys(spec.depth)
    assert m.n_in == 30
    assert m.dense_layers[-1].linear1.in_features == 30 + (spec.depth - 1) * spec.width
    assert m.fc_layers[0].linear1.in_features == 30 + spec.depth * spec.width
    x = torch.rand(7, 153)
    m.train()
    y, f = m(x, return_features=True)
    assert y.shape == (7,) and f.shape == (7, 32)
    m.eval()
    assert m(x[:1]).shape == (1,)


def test_ensemble_is_member_mean(small_ensemble):
    x = torch.rand(9, 153)
    with torch.no_grad():
        per = torch.stack([m(x) for m in small_ensemble.members], 1)
        torch.testing.assert_close(small_ensemble(x), per.mean(1))
    assert DenseSME().names[:3] == ["m_1_8", "m_1_16", "m_1_32"] and len(DenseSME().specs) == 25


def test_seed_makes_identical_ensembles():
    a, b = DenseSME(seed=5), DenseSME(seed=5)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = DenseSME(seed=6)
    assert not torch.equal(a.members[0].out.weight, c.members[0].out.weight)


def test_series_mean_is_an_input():
    """Shifting a whole series shifts its mean, which reaches the dense part (not only the conv)."""
    m = DenseSM(1, 8).eval()
    with torch.no_grad():  # the conv features no longer depend on the series
        m.conv_block.conv3.weight.zero_()
        m.conv_block.conv3.bias.zero_()
    x = torch.rand(4, 153, generator=torch.Generator().manual_seed(0))
    shifted = x.clone()
    shifted[:, 15:61] += 0.3  # the whole first series
    with torch.no_grad():
        conv = m.conv_block(x[:, 15:].reshape(4, 3, 46))
        torch.testing.assert_close(m.conv_block(shifted[:, 15:].reshape(4, 3, 46)), conv)
        assert not torch.allclose(m(shifted), m(x))  # through the series mean only


def test_authors_files_load_identically(tmp_path, full_ensemble):
    save_authors(full_ensemble, tmp_path / "pre")
    files = sorted(p.name for p in (tmp_path / "pre").glob("*.pt"))
    assert len(files) == 25 and "DenseSM_3_64.pt" in files
    loaded = load_ensemble(tmp_path / "pre")
    assert loaded.names == full_ensemble.names
    x = torch.rand(64, 153)
    with torch.no_grad():
        torch.testing.assert_close(loaded.member_outputs(x), full_ensemble.member_outputs(x), rtol=0, atol=0)


def test_authors_key_variants(tmp_path, small_ensemble):
    """The authors' code also writes '0.'-prefixed keys and 'fe.'/'mv.' (feature extractor + head)."""
    m = small_ensemble.members[1]  # d=2, w=16
    state = m.state_dict()
    d = tmp_path / "variants"
    d.mkdir()
    torch.save({f"0.{k}": v for k, v in state.items()}, d / "a_2_16.pt")
    fe_mv = {("mv." + k[4:] if k.startswith("out.") else "fe." + k): v for k, v in state.items()}
    torch.save(fe_mv, tmp_path / "ft_2_16.pt")
    x = torch.rand(10, 153)
    with torch.no_grad():
        ref = m(x)
        for path in (d, tmp_path / "ft_2_16.pt"):
            e = load_ensemble(path)
            assert e.names == ["m_2_16"]
            torch.testing.assert_close(e(x), ref, rtol=0, atol=0)


def test_authors_weights_bad(tmp_path, small_ensemble):
    d = tmp_path / "w"
    save_authors(small_ensemble, d)
    state = torch.load(d / "DenseSM_2_16.pt", weights_only=True)
    del state["dense_layers.1.bn2.running_var"]
    torch.save(state, d / "DenseSM_2_16.pt")
    with pytest.raises(WeightsError, match=r"DenseSM_2_16.pt \(member m_2_16\): missing key 'dense_layers.1.bn2.running_var'"):
        load_ensemble(d)
    # shape mismatch: a complete width-16 file named as width 8
    torch.save(small_ensemble.members[1].state_dict(), d / "DenseSM_2_16.pt")
    (d / "DenseSM_2_16.pt").rename(d / "DenseSM_2_8.pt")
    with pytest.raises(WeightsError, match=r"member m_2_8\): key 'dense_layers.0.linear1.weight' has shape \(16, 30\), the model expects \(8, 30\)"):
        load_ensemble(d)
    (d / "DenseSM_2_8.pt").rename(d / "nonumbers.pt")
    with pytest.raises(WeightsError, match="no '<depth>_<width>' pair"):
        load_ensemble(d)


def test_authors_weights_need_default_schema(tmp_path, small_ensemble):
    save_authors(small_ensemble, tmp_path / "w")
    d = DEFAULT_SCHEMA.to_dict()
    d["name"] = "no-vh"
    d["scalars"] = [s for s in d["scalars"] if s["name"] != "vh"]
    with pytest.raises(WeightsError, match="fit only the default Table 1 schema.*'no-vh' has 152 features"):
        load_ensemble(tmp_path / "w", schema=FeatureSchema.from_dict(d))


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    d = tmp_path / "evil"
    d.mkdir()
    with open(d / "DenseSM_1_8.pt", "wb") as fh:
        pickle.dump({"conv_block.conv1.weight": _Payload(str(marker))}, fh, protocol=2)
    with pytest.raises(WeightsError, match="not a plain state dict of tensors.*do not trust this file") as err:
        load_ensemble(d)
    assert not marker.exists()
    assert "weights_only" not in str(err.value)


def test_safetensors_round_trip(tmp_path, full_ensemble):
    save_ensemble(full_ensemble, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [".msda-output", "manifest.json", "weights.safetensors"]
    manifest = read_manifest(tmp_path / "ours")
    assert manifest["schema"]["name"] == "table1" and len(manifest["members"]) == 25
    assert {"created", "msda", "torch"} <= set(manifest["provenance"])
    back = load_ensemble(tmp_path / "ours")
    for a, b in zip(back.state_dict().values(), full_ensemble.state_dict().values()):
        assert torch.equal(a, b)
    # also by file
    assert load_ensemble(tmp_path / "ours" / "weights.safetensors").names == full_ensemble.names


def test_safetensors_errors(tmp_path, small_ensemble):
    from safetensors.torch import load_file, save_file

    save_ensemble(small_ensemble, tmp_path / "ours")
    t = load_file(str(tmp_path / "ours" / "weights.safetensors"))
    t["m_3_8.out.weight"] = torch.zeros(1, 16)
    save_file(t, str(tmp_path / "ours" / "weights.safetensors"))
    with pytest.raises(WeightsError, match=r"member m_3_8: key 'out.weight' has shape \(1, 16\), the model expects \(1, 32\)"):
        load_ensemble(tmp_path / "ours")
    other = DEFAULT_SCHEMA.to_dict()
    other["name"] = "other"
    other["series"][0]["length"] = 40
    other["series"][1]["length"] = 40
    other["series"][2]["length"] = 40
    with pytest.raises(WeightsError, match="trained with schema 'table1'"):
        load_ensemble(tmp_path / "ours", schema=FeatureSchema.from_dict(other))
    with pytest.raises(WeightsError, match="no such file"):
        load_ensemble(tmp_path / "missing")


def test_custom_schema_weights_round_trip(tmp_path):
    d = DEFAULT_SCHEMA.to_dict()
    d["name"] = "no-vh"
    d["scalars"] = [s for s in d["scalars"] if s["name"] != "vh"]
    schema = FeatureSchema.from_dict(d)
    e = DenseSME([MemberSpec(2, 8)], schema=schema, seed=0).eval()
    save_ensemble(e, tmp_path / "w")
    back = load_ensemble(tmp_path / "w")
    assert back.schema.same_layout(schema)
    x = torch.rand(4, schema.n_features)
    with torch.no_grad():
        torch.testing.assert_close(back(x), e(x))
    with pytest.raises(Exception, match="only Table 1"):
        from msda.cli import weights_convert

        weights_convert(tmp_path / "w", tmp_path / "a", to="authors")
