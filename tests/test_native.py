import ctypes
import re
import warnings

import numpy as np
import pytest
import torch

from msda.network import native
from msda.errors import MsdaError
from msda.predict import FusedEnsemble, predict

needs_cc = pytest.mark.skipif(native._compiler() is None, reason="needs a C compiler")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache, and no library remembered from other tests."""
    monkeypatch.setenv("MSDA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MSDA_NATIVE", raising=False)
    native.conv_stage_library.cache_clear()
    yield tmp_path / "cache"
    native.conv_stage_library.cache_clear()


@needs_cc
def test_builds_into_cache_and_is_used(fresh_cache, full_ensemble):
    lib = native.conv_stage_library()
    assert isinstance(lib, ctypes.CDLL)
    built = list(fresh_cache.iterdir())
    assert len(built) == 1 and built[0].name.startswith("convstage-") and built[0].suffix == ".so"
    assert FusedEnsemble(full_ensemble).native is not None  # the default on CPU
    assert FusedEnsemble(full_ensemble, native=False).native is None
    assert FusedEnsemble(full_ensemble, compile=True).native is None  # compile keeps the PyTorch stage


@needs_cc
@pytest.mark.parametrize("n", [1, 17, 333])
def test_conv_stage_equals_pytorch_stage(full_ensemble, n):
    """Strided rows (a column slice of a wider array), several thread splits, odd sizes."""
    wide = torch.rand(n, 160)
    x = wide[:, 3:156]
    c = FusedEnsemble(full_ensemble, native=True)
    t = FusedEnsemble(full_ensemble, native=False)
    got = c.native(x, c.n_scalars)
    series = x[:, c.n_scalars :].reshape(n, c.n_series, c.length)
    with torch.inference_mode():
        ref = t._conv_features(series.contiguous())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    p1 = predict(c, x.contiguous().numpy(), batch_size=100)
    p2 = predict(t, x.contiguous().numpy(), batch_size=100)
    np.testing.assert_allclose(p1.members, p2.members, rtol=1e-5, atol=1e-6)


@needs_cc
def test_threads_split_samples(full_ensemble, monkeypatch):
    x = torch.rand(200, 153)
    c = FusedEnsemble(full_ensemble, native=True)
    two = c.native(x, c.n_scalars)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = c.native(x, c.n_scalars)
    torch.testing.assert_close(one, two, rtol=0, atol=0)


def test_disabled_by_environment(fresh_cache, monkeypatch, full_ensemble):
    monkeypatch.setenv("MSDA_NATIVE", "0")
    assert native.conv_stage_library() is None
    assert FusedEnsemble(full_ensemble).native is None
    with pytest.raises(MsdaError, match="C convolution stage"):
        FusedEnsemble(full_ensemble, native=True)


def test_no_compiler_warns_and_falls_back(fresh_cache, monkeypatch, full_ensemble):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with pytest.warns(UserWarning, match="no C compiler"):
        assert native.conv_stage_library() is None
    x = torch.rand(20, 153)
    with torch.no_grad():
        ref = full_ensemble.member_outputs(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(FusedEnsemble(full_ensemble).member_outputs(x), ref, rtol=1e-5, atol=1e-5)


def test_failed_build_leaves_nothing(fresh_cache, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="could not build"):
        assert native.conv_stage_library() is None
    assert not fresh_cache.exists() or not list(fresh_cache.iterdir())


def test_supports_only_its_architecture():
    assert native.supports(3, 46, (32, 16, 4), 5, (2, 2, 4))
    assert not native.supports(3, 46, (32, 16, 8), 5, (2, 2, 4))
    assert not native.supports(3, 46, (32, 16, 4), 3, (2, 2, 4))
    assert not native.supports(9, 46, (32, 16, 4), 5, (2, 2, 4))
    assert not native.supports(3, 7, (32, 16, 4), 5, (2, 2, 4))



class _NoOpenMP:
    """The library as if built without OpenMP: parts run in Python threads instead."""

    def __init__(self, lib):
        self._lib = lib

    def __getattr__(self, name):
        return (lambda: 0) if name == "msda_openmp" else getattr(self._lib, name)


def _conv_stage(use_c, lib, patches, params, length, training, grad, seed=11):
    """conv3's output (before its batch norm) and the gradients of every parameter, from the C
    kernels or from PyTorch: the first convolution, a grouped Conv1d, training-mode batch norm,
    ReLU, dropout and pool, and conv3 as a Conv1d (replicate padding)."""
    import torch.nn.functional as F

    from msda.network.conv_stage import NativeConvStage
    from msda.network.ops import LinearReluDropoutPool2, ReluDropoutPool2, StackedBN

    leaves = [t.detach().clone().requires_grad_(True) for t in params]
    fused, w2, b2, gamma, beta, w3, b3 = leaves
    m = w2.shape[0]
    bn2 = StackedBN((m, 16))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same dropout words on both paths
        if use_c:
            y, stats = NativeConvStage.apply(patches, fused, w2, b2, gamma, beta, w3, b3, length, training, bn2,
                                              slice(None), lib)
            var, mean = torch.var_mean(y.detach().double(), dim=(0, 2), correction=0)  # the kernel's statistics
            torch.testing.assert_close(stats, torch.stack((mean, var)), rtol=1e-5, atol=1e-5)
        else:
            h = LinearReluDropoutPool2.apply(patches, fused, length, training, 2)  # (B, L/2 + 4, m*32)
            z = F.conv1d(h.transpose(1, 2), w2.flatten(0, 1), b2.flatten(), groups=m)  # (B, m*16, L/2)
            zn = F.batch_norm(z, bn2.running_mean.view(-1), bn2.running_var.view(-1), gamma, beta, True, 0.1, 1e-5)
            h2 = ReluDropoutPool2.apply(zn.transpose(1, 2), training, 1).transpose(1, 2)  # (B, m*16, L/4)
            y = F.conv1d(F.pad(h2, (2, 2), mode="replicate"), w3.flatten(0, 1), b3.flatten(), groups=m)
    (y * grad).sum().backward()
    return [y.detach(), bn2.running_mean.clone(), bn2.running_var.clone()] + [t.grad for t in leaves]


@needs_cc
@pytest.mark.parametrize("length", [46, 31, 4])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("openmp", [True, False])
def test_training_convolutions_equal_pytorch(length, training, openmp):
    """The three convolutions of training in C, conv2's batch norm, ReLU, dropout and pool in
    between, against PyTorch: conv3's output, conv2's running statistics and the gradients of
    every weight; dropout mask bits, replicate padding, odd lengths, window widths 16 and 41,
    samples split over threads (OpenMP or Python threads)."""
    lib = native.conv_stage_library()
    lib = lib if openmp else _NoOpenMP(lib)
    g = torch.Generator().manual_seed(3)
    names = ("y", "running mean", "running var", "conv1 weight", "conv2 weight", "conv2 bias", "bn2 weight", "bn2 bias",
             "conv3 weight", "conv3 bias")
    for batch, kc, m in ((37, 16, 3), (5, 41, 1)):
        patches = torch.randn(batch * length, kc, generator=g)
        patches[:, -1] = 1.0
        params = (torch.randn(m * 32, kc, generator=g), torch.randn(m, 16, 32, 5, generator=g) * 0.2,
                  torch.randn(m, 16, generator=g), torch.rand(m * 16, generator=g) + 0.5, torch.randn(m * 16, generator=g),
                  torch.randn(m, 4, 16, 5, generator=g) * 0.3, torch.randn(m, 4, generator=g))
        grad = torch.randn(batch, m * 4, length // 4, generator=g)
        got = _conv_stage(True, lib, patches, params, length, training, grad)
        ref = _conv_stage(False, None, patches, params, length, training, grad)
        for name, a, r in zip(names, got, ref):
            if name == "conv2 bias":  # before a training-mode batch norm: zero up to round-off
                assert max(a.abs().max(), r.abs().max()) < 1e-4 * got[4].abs().max(), name
                continue
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * r.abs().max().item(), msg=name)
        if training:  # a different mask gives a different result: the bits are really used
            other = _conv_stage(True, lib, patches, params, length, training, grad, seed=12)
            assert not torch.allclose(other[0], got[0])


@needs_cc
def test_stacked_training_with_c_equals_pytorch(full_ensemble, monkeypatch):
    """A whole training step of the 25 stacked members, dropout on: outputs, features and every
    parameter's gradient agree between the C convolutions and PyTorch's."""
    from msda.network import stacked
    from msda.network.stacked import StackedEnsemble

    monkeypatch.setattr(stacked, "CHUNK_BYTES", 1 << 40)  # PyTorch's path in one member chunk too: the same mask words
    x = torch.rand(70, 153, generator=torch.Generator().manual_seed(0))
    results = []
    for use_c in (True, False):
        st = StackedEnsemble.from_ensemble(full_ensemble).train()
        st.native = use_c
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            y, f = st(x)
        (y.square().sum() + f.square().mean()).backward()
        results.append((y.detach(), f.detach(), {k: p.grad for k, p in st.named_parameters()}))
    (y1, f1, g1), (y2, f2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f1, f2, rtol=1e-4, atol=1e-4)  # batch-normalised: float32 round-off of the statistics
    for name in g2:
        scale = g2[name].abs().max().item()
        if re.search(r"(conv\d|linear\d)\.bias$", name):  # biases before a batch norm: zero gradient, up to round-off
            weight_scale = g2[name.replace("bias", "weight")].abs().max().item()
            assert max(g1[name].abs().max().item(), scale) < 1e-4 * weight_scale, name
            continue
        torch.testing.assert_close(g1[name], g2[name], rtol=0, atol=1e-4 * scale + 1e-9, msg=name)


def test_stacked_native_insists(fresh_cache, monkeypatch, full_ensemble):
    from msda.network.stacked import StackedEnsemble

    monkeypatch.setenv("MSDA_NATIVE", "0")
    st = StackedEnsemble.from_ensemble(full_ensemble).train()
    st.native = True
    with pytest.raises(MsdaError, match="C convolution"):
        st(torch.rand(8, 153))
    st.native = None  # falls back to PyTorch
    assert st(torch.rand(8, 153))[0].shape == (25, 8)


@needs_cc
@pytest.mark.parametrize("width", [16, 32, 128])
def test_dense_batchnorm_relu_equals_pytorch(width):
    """relu(batch_norm(y)) of stacked dense layers in their (members, batch, width) layout: output,
    batch statistics and the gradients of y, gamma and beta (and of a bias before the batch norm:
    round-off) against PyTorch's batch norm."""
    import torch.nn.functional as F

    lib = native.conv_stage_library()
    g = torch.Generator().manual_seed(6)
    y = (torch.randn(3, 50, width, generator=g) * 2 + 1).requires_grad_(True)
    gamma = (torch.rand(3, width, generator=g) + 0.5).requires_grad_(True)
    beta = torch.randn(3, width, generator=g).requires_grad_(True)
    go = torch.randn(3, 50, width, generator=g)
    out, mean, var = native.bnrelu_forward(lib, y.detach(), gamma.detach(), beta.detach(), 1e-5)
    gz, d_gamma, d_beta, d_bias = native.bnrelu_backward(lib, y.detach(), out, go, gamma.detach(), mean,
                                                         torch.rsqrt(var + 1e-5), bias_grad=True)
    got = [out, mean, var, gz, d_gamma, d_beta]
    assert d_bias.abs().max() < 1e-4 * gz.abs().sum(1).max()
    torch.testing.assert_close(d_bias, gz.sum(1))
    rows = y.transpose(0, 1).reshape(50, -1)
    ref = F.relu(F.batch_norm(rows, None, None, gamma.reshape(-1), beta.reshape(-1), True, 0.1, 1e-5))
    ref = ref.view(50, 3, width).transpose(0, 1)
    (ref * go).sum().backward()
    var_ref, mean_ref = torch.var_mean(y.detach(), dim=1, correction=0)
    expected = [ref.detach(), mean_ref, var_ref, y.grad, gamma.grad, beta.grad]
    for name, a, r in zip(("out", "mean", "var", "y grad", "gamma grad", "beta grad"), got, expected):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * r.abs().max().item(), msg=name)


@needs_cc
@pytest.mark.parametrize("length", [11, 20, 3, 1])
@pytest.mark.parametrize("dropout", [True, False])
def test_third_batchnorm_pool_equals_pytorch(length, dropout):
    """conv3's batch norm, ReLU, dropout and pool of 4 (ceil) in C (``ToeplitzConv.pooled``)
    against PyTorch's: output, running statistics and the gradients of the input and of the
    batch norm; steps past 16 (two vector chunks), windows cut short, a single step."""
    import torch.nn.functional as F

    from msda.network.conv_stage import ToeplitzConv
    from msda.network.ops import avg_pool, coin_dropout

    lib = native.conv_stage_library()
    g = torch.Generator().manual_seed(8)
    m = 3
    y = torch.randn(37, m * 4, length, generator=g) * 2 + 1
    go = torch.randn(37, m * 4, -(-length // 4), generator=g)
    results = []
    for use_c in (True, False):
        conv = ToeplitzConv(m + 1, 16, 4, 4).train()  # one member more: the slice of members is honoured
        with torch.no_grad():
            conv.bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
            conv.bn.bias.normal_(generator=torch.Generator().manual_seed(4))
        yi = y.clone().requires_grad_(True)
        members = slice(1, m + 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(9)  # the same dropout words on both paths
            if use_c:
                var, mean = torch.var_mean(yi.detach().double(), dim=(0, 2), correction=0)
                out = conv.pooled(yi, torch.stack((mean, var)), dropout, members, lib)
            else:
                out = avg_pool(coin_dropout(F.relu(conv.bn(yi, members)), dropout), 4, ceil=True)
        (out * go).sum().backward()
        results.append([out.detach(), yi.grad, conv.bn.weight.grad, conv.bn.bias.grad, conv.bn.running_mean,
                        conv.bn.running_var])
    names = ("out", "y grad", "bn weight grad", "bn bias grad", "running mean", "running var")
    for name, a, r in zip(names, *results):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * r.abs().max().item() + 1e-7, msg=name)
    assert results[0][2][0].abs().max() == 0  # the member outside the slice gets no gradient


@needs_cc
def test_dense_blocks_function_equals_autograd():
    """The dense blocks and bottleneck layer written out (``DenseBlocks``) against the same
    layers through autograd (``fc(WidthGroup._blocks)``): the bottleneck's pre-activations, the
    gradients of the inputs, of the bottleneck and of every block parameter, and the running
    statistics; members of depths 1-3 in one group (runs of one depth: 1, 2, 1)."""
    from msda.network.dense_stage import DenseBlocks, WidthGroup

    lib = native.conv_stage_library()
    g = torch.Generator().manual_seed(4)
    h = torch.randn(4, 40, 30, generator=g)
    go = None
    results = []
    for written_out in (True, False):
        torch.manual_seed(0)
        group = WidthGroup(32, [1, 2, 2, 3], [32, 16, 32, 32], 30, 32).train()
        with torch.no_grad():
            for p in group.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3 + (p.dim() == 1))
            for j, d in enumerate(group.depths):  # the bottleneck's columns in front of a member's inputs are zero
                group.fc.weight[j, :, : group.max_in - 30 - 32 * d] = 0
        hi = h.clone().requires_grad_(True)
        params = [group.fc.weight, group.fc.bias] + group.block_parameters()
        if written_out:
            out = DenseBlocks.apply(hi, group, lib, *params)
        else:
            out = group.fc(group._blocks(hi))
        if go is None:
            go = torch.randn(out.shape, generator=g)
        (out * go).sum().backward()
        stats = [t.clone() for blk in group.blocks for n in ("bn1", "bn2", "bn3")
                 for t in (blk[n].running_mean, blk[n].running_var, blk[n].num_batches_tracked)]
        results.append(([out.detach(), hi.grad] + [p.grad for p in params], stats))
    (a, sa), (r, sr) = results
    for i, (u, v) in enumerate(zip(a, r)):
        if i >= 4 and (i - 4) % 12 in (1, 3, 5):  # a layer's bias before batch norm: zero up to round-off
            assert max(u.abs().max(), v.abs().max()) < 1e-4 * r[i - 1].abs().max(), i
            continue
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * v.abs().max().item() + 1e-6, msg=f"tensor {i}")
    for u, v in zip(sa, sr):
        torch.testing.assert_close(u, v)
    assert a[2][0, :, : 32 * 2].abs().max() == 0  # the depth-1 member's padded bottleneck columns get no gradient


def test_training_kernels_decline_other_architectures():
    """The C training kernels are written for filters (32, 16, 4), kernel 5 and pools (2, 2, 4);
    any other architecture must fall back to PyTorch rather than run them (kernel 7 ran silently
    wrong before)."""
    from msda.network import native

    patches = torch.zeros(46 * 4, 3 * 5)
    assert native.train_supported(patches, 46, (32, 16, 4), 5, (2, 2, 4))
    assert not native.train_supported(patches, 46, (32, 16, 4), 7, (2, 2, 4))
    assert not native.train_supported(patches, 46, (32, 16, 8), 5, (2, 2, 4))
    assert not native.train_supported(patches, 46, (32, 16, 4), 5, (2, 2, 2))
    assert not native.train_supported(patches.double(), 46, (32, 16, 4), 5, (2, 2, 4))
