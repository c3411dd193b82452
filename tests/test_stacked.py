"""The stacked training engine computes exactly what the per-member DenseSM modules compute."""

import pytest
import torch

from msda.network.model import DenseSME, MemberSpec
from msda.network.ops import coin_mask
from msda.network.stacked import StackedEnsemble

from conftest import randomise_batchnorm

SPECS = [MemberSpec(1, 8), MemberSpec(3, 8), MemberSpec(2, 16), MemberSpec(1, 16), MemberSpec(2, 8)]


@pytest.fixture
def pair():
    with torch.random.fork_rng(devices=[]):
        torch.set_default_dtype(torch.float64)
        try:
            e = DenseSME(SPECS, seed=4)
            randomise_batchnorm(e, seed=5)
            for m in e.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
            st = StackedEnsemble.from_ensemble(e)
            st.dropout = False
        finally:
            torch.set_default_dtype(torch.float32)
    return e, st


def _member_outputs(e, x):
    outs = [m(x, return_features=True) for m in e.members]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


@pytest.mark.parametrize("training", [False, True])
def test_outputs_and_features_match(pair, training):
    e, st = pair
    e.train(training)
    st.train(training)
    x = torch.rand(40, 153, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, f = st(x)
    y_ref, f_ref = _member_outputs(e, x)
    assert y.shape == (len(SPECS), 40) and f.shape == (len(SPECS), 40, 32)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)
    if training:  # running statistics moved the same way
        back = st.to_ensemble()
        for a, b in zip(back.state_dict().items(), e.state_dict().items()):
            if "running" in a[0]:
                torch.testing.assert_close(a[1].double(), b[1], rtol=1e-6, atol=1e-6)


def test_gradients_match(pair):
    e, st = pair
    e.train()
    st.train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 153, dtype=torch.float64, generator=g)
    wy = torch.randn(len(SPECS), 32, dtype=torch.float64, generator=g)
    wf = torch.randn(len(SPECS), 32, 32, dtype=torch.float64, generator=g)
    y, f = st(x)
    ((y * wy).sum() + (f * wf).sum()).backward()
    y_ref, f_ref = _member_outputs(e, x)
    ((y_ref * wy).sum() + (f_ref * wf).sum()).backward()
    # the stacked gradients, mapped back to the modules' layout
    grads = StackedEnsemble(SPECS, e.schema).double()
    grads.load_state_dict({**grads.state_dict(), **{k: p.grad for k, p in st.named_parameters()}})
    back = grads.to_ensemble()
    scale = max(p.grad.abs().max().item() for p in e.parameters())
    for (name, got), ref in zip(back.named_parameters(), e.parameters()):
        assert torch.allclose(got, ref.grad, atol=1e-9 * scale, rtol=0), name


def test_round_trip_and_zero_padding_stays_zero(pair):
    e, st = pair
    back = st.to_ensemble()
    for (k, a), b in zip(back.state_dict().items(), e.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-7, msg=k)
    st = st.float().train()
    st.dropout = True
    opt = torch.optim.Adam(st.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        y, f = st(torch.rand(16, 153))
        (y.square().sum() + f.sum()).backward()
        opt.step()
    # padded entries (narrow members in a wider group, bottlenecks of shallow members) got zero
    # gradients: a round trip through the modules, which refills them, changes no parameter
    again = StackedEnsemble.from_ensemble(st.to_ensemble())
    for (name, p), q in zip(st.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
    assert sorted(st.groups[0].widths) == [8, 8, 8, 16, 16] and st.groups[0].width == 16  # 8 and 16 share a group


def test_coin_mask_is_fair():
    torch.manual_seed(0)
    m = coin_mask((1000, 1000), torch.device("cpu"), torch.float32, 2.0)
    assert set(torch.unique(m).tolist()) == {0.0, 2.0}
    assert abs(m.mean().item() - 1.0) < 0.005  # half kept, scaled by 2
    # neighbouring elements are independent (no bit pattern repeats)
    a, b = m.view(-1)[:-1] > 0, m.view(-1)[1:] > 0
    assert abs((a & b).float().mean().item() - 0.25) < 0.005


@pytest.mark.parametrize("length", [46, 7, 2])
@pytest.mark.parametrize("training", [True, False])
def test_tiled_first_convolution_matches_direct(monkeypatch, length, training):
    """Tiles of 2 samples (recomputed in backward) give the direct computation, dropout mask and
    replicate padding included."""
    import msda.network.ops as stacked

    monkeypatch.setattr(stacked, "TILE_BYTES", 1)  # the smallest tile: 2 samples
    g = torch.Generator().manual_seed(3)
    batch, c = 9, 64
    patches = torch.randn(batch * length, 16, dtype=torch.float64, generator=g)
    w = torch.randn(c, 16, dtype=torch.float64, generator=g, requires_grad=True)
    grad_out = torch.randn(batch, length // 2 + 4, c, dtype=torch.float64, generator=g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        out = stacked.LinearReluDropoutPool2.apply(patches, w, length, training, 2)
    (out * grad_out).sum().backward()
    got_grad, w.grad = w.grad, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)  # the same random words, drawn in one go
        mask = stacked.coin_mask((batch * length, c), patches.device, patches.dtype, 1.0) if training else 1.0
    kept = (torch.relu(patches @ w.t()) * mask).view(batch, length, c)
    ref = kept[:, 0 : length // 2 * 2 : 2] + kept[:, 1 : length // 2 * 2 : 2]
    ref = ref if training else ref * 0.5
    ref = torch.cat([ref[:, :1]] * 2 + [ref] + [ref[:, -1:]] * 2, dim=1)  # replicate padding for conv2
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, w.grad, rtol=1e-10, atol=1e-10)
