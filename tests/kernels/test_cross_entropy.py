"""Fused linear + cross-entropy kernel vs the fp32 reference: loss and the gradients of
input, weight and bias, with ignore_index, label smoothing, every reduction, and the
chunked path forced to many small chunks and vocabulary blocks."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import nnfast.functional as Fn
from nnfast.reference.cross_entropy import linear_cross_entropy as reference
from tests.helpers import (
    assert_close_lowp,
    device_dtype_params,
    kernel_devices,
    profiled_peak_bytes,
)

ce_kernels = pytest.importorskip("nnfast.kernels.cross_entropy")


@pytest.fixture
def small_chunks(monkeypatch):
    """Force ~15-row chunks and 512-wide vocabulary blocks (V = 999: a partial last one)."""
    monkeypatch.setattr(ce_kernels, "CHUNK_BYTES", 4 * 999 * 16)
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_V", 512)
    assert ce_kernels._chunk_rows(113, 999, 64, 1024, torch.float32, torch.float32) == 15


def _make(N, C, V, dtype, device, w_dtype=None, bias=True, ignore_every=5, ignore_index=-100,
          seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(device, dtype)
    w = (torch.randn(V, C, generator=g) / C**0.5).to(device, w_dtype or dtype)
    b = (0.1 * torch.randn(V, generator=g)).to(device, w_dtype or dtype) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = ignore_index
    return x, w, b, t.to(device)


def _grads(fn, x, w, b, t, grad_out_seed=1, **kw):
    """Loss and grads of (x, w, b) with a fixed random grad_output."""
    leaves = [v.detach().clone().requires_grad_() for v in (x, w) + ((b,) if b is not None else ())]
    xx, ww, bb = leaves[0], leaves[1], leaves[2] if b is not None else None
    loss = fn(xx, ww, t, bb, **kw)
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_out_seed))
    grads = torch.autograd.grad(loss, leaves, go.to(loss.device))
    return (loss.detach(), *grads)


def _kernel(x, w, t, b, **kw):
    return Fn.linear_cross_entropy(x, w, t, b, **kw)


def _ref(x, w, t, b, ignore_index=-100, reduction="mean", label_smoothing=0.0,
         accum_dtype=None):
    return reference(x, w, t, b, ignore_index, reduction, label_smoothing, accum_dtype)


def _compare(x, w, b, t, **kw):
    """Kernel vs an fp64 reference (its projection and gradients in fp64), judged against
    PyTorch's own error in x's dtype (fp32 included: sums over V = 50257 terms round)."""
    out = _grads(_kernel, x, w, b, t, **kw)
    ref = _grads(_ref, x.double(), w.double(), None if b is None else b.double(), t, **kw)
    lowp = _grads(_ref, x, w, b, t, **kw)
    names = ["loss", "grad_input", "grad_weight", "grad_bias"]
    for i, (name, o, r, lp) in enumerate(zip(names, out, ref, lowp)):
        assert o.dtype == lp.dtype, f"{name}: dtype {o.dtype} != {lp.dtype}"
        assert_close_lowp(name, o, r, lp, factor=2.0 if i == 0 else 3.0)
    return out


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("N,C", [(1, 7), (113, 64)])
@pytest.mark.parametrize(
    "reduction,label_smoothing", [("mean", 0.0), ("mean", 0.1), ("sum", 0.1), ("none", 0.0)]
)
def test_matches_reference_chunked(small_chunks, device, dtype, N, C, reduction, label_smoothing):
    x, w, b, t = _make(N, C, 999, dtype, device, ignore_every=5 if N > 1 else 0)
    _compare(x, w, b, t, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_default_chunking_odd_vocab_no_bias(device, dtype):
    # One chunk, one vocabulary block; V odd, a non-default ignore_index that is a real class.
    x, w, _, t = _make(37, 64, 1001, dtype, device, bias=False, ignore_index=3)
    _compare(x, w, None, t, ignore_index=3, label_smoothing=0.1)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_lowp_input_fp32_weight(small_chunks, device, dtype):
    """bf16/fp16 autocast: low-precision input, fp32 tied weight and bias; fp32 grads."""
    x, w, b, t = _make(50, 64, 999, dtype, device, w_dtype=torch.float32)
    loss, gx, gw, gb = _compare(x, w, b, t)
    assert (gx.dtype, gw.dtype, gb.dtype) == (dtype, torch.float32, torch.float32)


@pytest.mark.parametrize("device", kernel_devices())
def test_gpt2_vocab(device):
    x, w, b, t = _make(3, 7, 50257, torch.float32, device, ignore_every=0)
    _compare(x, w, b, t, label_smoothing=0.1)


@pytest.mark.parametrize("device", kernel_devices())
def test_leading_dims_noncontiguous(small_chunks, device):
    x, w, b, t = _make(2 * 9, 7, 999, torch.float32, device)
    t3 = t.reshape(2, 9)
    go = torch.randn(2, 9).to(device)
    results = []
    for fn in (_kernel, _ref):
        wide = torch.zeros(2, 9, 14, device=device)
        wide[..., ::2] = x.reshape(2, 9, 7)
        wide.requires_grad_()
        x3 = wide[..., ::2]  # (2, 9, 7), stride gap in the last dim
        assert not x3.is_contiguous()
        ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
        loss = fn(x3, ww, t3, bb, reduction="none")
        assert loss.shape == (2, 9)
        results.append((loss.detach(), *torch.autograd.grad(loss, (wide, ww, bb), go)))
    for name, o, r in zip(["loss", "grad_input", "grad_weight", "grad_bias"], *results):
        assert_close_lowp(name, o, r, r)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zeros(device, reduction):
    """Mean over no valid target is 0 here (F.cross_entropy gives NaN), gradients 0."""
    x, w, b, t = _make(6, 7, 999, torch.float32, device, ignore_every=1)
    loss, gx, gw, gb = _grads(_kernel, x, w, b, t, reduction=reduction)
    for name, v in [("loss", loss), ("grad_input", gx), ("grad_weight", gw), ("grad_bias", gb)]:
        assert torch.equal(v, torch.zeros_like(v)), name


@pytest.mark.parametrize("device", kernel_devices())
def test_deterministic_and_no_grad(small_chunks, device):
    x, w, b, t = _make(40, 7, 999, torch.float32, device)
    first = _grads(_kernel, x, w, b, t, label_smoothing=0.1)
    second = _grads(_kernel, x, w, b, t, label_smoothing=0.1)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    with torch.no_grad():
        assert torch.equal(_kernel(x, w, t, b, label_smoothing=0.1), first[0])
    # Frozen weight and bias: only the input's gradient is computed.
    xx = x.clone().requires_grad_()
    go = torch.randn((), generator=torch.Generator().manual_seed(1)).to(device)  # as _grads
    (gx,) = torch.autograd.grad(_kernel(xx, w, t, b, label_smoothing=0.1), xx, go)
    assert torch.equal(gx, first[1])


@pytest.mark.parametrize("device", kernel_devices())
def test_compiles_fullgraph(device):
    """The custom ops' fake impls and autograd: no graph break. The kernel entry is compiled
    directly: functional._impl's importlib call is not traceable (see tests/modules)."""
    x, w, b, t = _make(9, 7, 999, torch.float32, device)

    def entry(x, w, t, b, label_smoothing):
        return ce_kernels.linear_cross_entropy(x, w, t, b, -100, "mean", label_smoothing)

    torch._dynamo.reset()
    fn = torch.compile(entry, backend="aot_eager", fullgraph=True)
    out = _grads(fn, x, w, b, t, label_smoothing=0.1)
    ref = _grads(_kernel, x, w, b, t, label_smoothing=0.1)
    for a, c in zip(out, ref):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_reference_path_equals_torch(monkeypatch, reduction, label_smoothing):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    x, w, b, t = _make(4 * 7, 7, 999, torch.float32, "cpu")
    x, t = x.reshape(4, 7, 7), t.reshape(4, 7)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    out = Fn.linear_cross_entropy(x, w, t, b, **kw)
    want = F.cross_entropy((x @ w.T + b).reshape(-1, 999), t.reshape(-1), **kw)
    torch.testing.assert_close(out, want.reshape(out.shape))
    # The one documented difference: all targets ignored with mean gives 0, torch NaN.
    ignored = torch.full_like(t, -100)
    if reduction == "mean":
        assert Fn.linear_cross_entropy(x, w, ignored, b, **kw).item() == 0.0
        assert F.cross_entropy((x @ w.T).reshape(-1, 999), ignored.reshape(-1)).isnan()


def test_cpu_fast_path_nan_loss(monkeypatch):
    """The fp32 CPU fast path (2-D input, no bias, the mean: torch's own ops) reads its
    loss's memory for NaN: all targets ignored still gives the full path's 0 and zero
    gradients, a NaN input still NaN, anything else torch's loss bit for bit."""
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    x, w, _, t = _make(12, 7, 11, torch.float32, "cpu", bias=False)
    assert torch.equal(Fn.linear_cross_entropy(x, w, t), F.cross_entropy(x @ w.T, t))
    leaves = [v.clone().requires_grad_() for v in (x, w)]
    loss = Fn.linear_cross_entropy(*leaves, torch.full_like(t, -100))
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, leaves):
        assert torch.equal(g, torch.zeros_like(g))
    x[3, 2] = float("nan")
    assert Fn.linear_cross_entropy(x, w, t).isnan()


def test_bad_input_names_the_argument():
    x, w, b, t = _make(5, 7, 11, torch.float32, "cpu")
    with pytest.raises(TypeError, match="target"):
        Fn.linear_cross_entropy(x, w, t.float())
    with pytest.raises(ValueError, match="target"):
        Fn.linear_cross_entropy(x, w, t[:4])
    with pytest.raises(ValueError, match="weight"):
        Fn.linear_cross_entropy(x, w[:, :6], t)
    with pytest.raises(ValueError, match="bias"):
        Fn.linear_cross_entropy(x, w, t, b[:10])
    with pytest.raises(ValueError, match="weight"):
        Fn.linear_cross_entropy(x, w.to("meta"), t)
    with pytest.raises(ValueError, match="reduction"):
        Fn.linear_cross_entropy(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        Fn.linear_cross_entropy(x, w, t, label_smoothing=1.0)


@pytest.mark.parametrize("device", kernel_devices())
def test_accum_dtype_fp32(small_chunks, device):
    """fp16 weight, gradient accumulated across the 8 chunks in fp32, returned in fp16."""
    x, w, b, t = _make(113, 64, 999, torch.float16, device)
    loss, gx, gw, gb = _compare(x, w, b, t, accum_dtype=torch.float32)
    assert gw.dtype == torch.float16
    with pytest.raises(TypeError, match="accum_dtype"):
        Fn.linear_cross_entropy(x, w, t, accum_dtype=torch.int32)


@pytest.mark.skipif("cpu" not in kernel_devices(), reason="measures the CPU (interpreter) path")
# torch's mkldnn.flags() warns that its TF32 switch is for Intel GPUs (torch 2.13)
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN:UserWarning")
@pytest.mark.parametrize("w_dtype,reduction", [(torch.float16, "mean"), (torch.float16, "none"),
                                               (torch.float32, "sum")])
def test_peak_memory_at_most_the_weight(w_dtype, reduction):
    """Forward + backward allocate at most 1x the weight's bytes beyond the gradients (the
    profiler's allocation events; the inputs and the weight live before the call)."""
    N, C, V = 64, 128, 2048
    x, w, _, t = _make(N, C, V, torch.float16, "cpu", w_dtype=w_dtype, bias=False)
    x.requires_grad_()
    w.requires_grad_()
    go = torch.ones(N) if reduction == "none" else None

    def step():
        loss = Fn.linear_cross_entropy(x, w, t, reduction=reduction)
        # The interpreter's launches leave reference cycles that hold their tensor
        # arguments until the next gc (the CUDA launcher keeps nothing): collect them, as
        # the forward's chunk buffer is otherwise still alive during the backward.
        gc.collect()
        loss.backward(go)

    step()  # compile (interpreter caches) outside the measurement
    x.grad = w.grad = None
    # The op's own buffers, not the CPU BLAS's: on CPUs where oneDNN runs fp16 GEMMs it
    # allocates a packed copy of the (V, C) operand inside each mm (1.07x the weight here),
    # freed before the mm returns -- the library's scratch space, as cuBLAS's workspace on a
    # GPU (allocated once per handle, never per call). Without oneDNN torch's CPU GEMM
    # allocates nothing but its output, so what is left is what the op allocates.
    with torch.backends.mkldnn.flags(enabled=False):
        peak = profiled_peak_bytes(step)
    grads = x.grad.nbytes + w.grad.nbytes
    extra = (peak - grads) / w.nbytes
    assert extra <= 1.0, f"peak extra memory {extra:.2f}x the weight's bytes"


# ----------------------------------------------------------------------------- plain CE
def _plain_grads(fn, logits, t, go_seed=2, **kw):
    z = logits.detach().clone().requires_grad_()
    loss = fn(z, t, **kw)
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(go_seed))
    (gz,) = torch.autograd.grad(loss, z, go.to(loss.device, loss.dtype))
    return loss.detach(), gz


def _torch_ce(z, t, **kw):
    """F.cross_entropy in z's dtype (fp16/bf16 softmax are computed in fp32 inside)."""
    return F.cross_entropy(z, t, **kw)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize(
    "reduction,label_smoothing", [("mean", 0.0), ("mean", 0.1), ("sum", 0.0), ("none", 0.1)]
)
def test_plain_cross_entropy_matches_torch(monkeypatch, device, dtype, reduction,
                                           label_smoothing):
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_V", 256)  # V = 999: 4 blocks, a partial one
    g = torch.Generator().manual_seed(0)
    wide = (3 * torch.randn(37, 1200, generator=g)).to(device, dtype)
    logits = wide[:, :999]  # row stride 1200
    t = torch.randint(0, 999, (37,), generator=g)
    t[::4] = -100
    t = t.to(device)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    out = _plain_grads(Fn.cross_entropy, logits, t, **kw)
    ref = _plain_grads(_torch_ce, logits.double(), t, **kw)
    lowp = _plain_grads(_torch_ce, logits, t, **kw)
    for i, name in enumerate(["loss", "grad_logits"]):
        assert out[i].dtype == dtype, name
        assert_close_lowp(name, out[i], ref[i], lowp[i], factor=2.0 if i == 0 else 3.0)


@pytest.mark.parametrize("device", kernel_devices())
def test_plain_cross_entropy_all_ignored_and_compile(device):
    z = torch.randn(5, 17, device=device)
    t = torch.full((5,), 3, device=device)
    loss, gz = _plain_grads(Fn.cross_entropy, z, t, ignore_index=3)
    assert loss.item() == 0.0 and torch.equal(gz, torch.zeros_like(gz))
    t = torch.randint(0, 17, (5,), device=device)

    def entry(z, t):
        return ce_kernels.cross_entropy(z, t, -100, "mean", 0.1)

    torch._dynamo.reset()
    fn = torch.compile(entry, backend="aot_eager", fullgraph=True)
    out = _plain_grads(lambda z, t: fn(z, t), z, t)
    want = _plain_grads(lambda z, t: entry(z, t), z, t)
    for a, c in zip(out, want):
        torch.testing.assert_close(a, c)


def test_plain_cross_entropy_reference_and_bad_input(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    z, t = torch.randn(6, 11), torch.randint(0, 11, (6,))
    torch.testing.assert_close(Fn.cross_entropy(z, t, label_smoothing=0.2),
                               F.cross_entropy(z, t, label_smoothing=0.2))
    with pytest.raises(TypeError, match="target"):
        Fn.cross_entropy(z, t.float())
    with pytest.raises(ValueError, match="target"):
        Fn.cross_entropy(z, t[:5])
    with pytest.raises(ValueError, match="input"):
        Fn.cross_entropy(z[None], t)
    with pytest.raises(ValueError, match="reduction"):
        Fn.cross_entropy(z, t, reduction="avg")


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_plain_cross_entropy_target_out_of_range(monkeypatch, backend):
    """check_class_targets on both paths (auto: the kernel, through the interpreter here)."""
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    z = torch.randn(4, 11)
    with pytest.raises(ValueError, match="target"):
        Fn.cross_entropy(z, torch.tensor([0, 11, 2, -100]))
    assert Fn.cross_entropy(z, torch.tensor([0, 10, 2, -100])).isfinite()
