"""Token merging / expansion kernels vs their reference, the reference vs nn.Conv1d /
nn.ConvTranspose1d (and an explicit loop over the defining sum), the causal contract, and
the modules' state-dict compatibility with torch's convolutions.

The oracle: ``nnfast.reference.token_merge`` on fp32 copies. The low-precision bar: the same
convolution computed by PyTorch in the input dtype.
"""

import pytest
import torch
from torch import nn

import nnfast
from nnfast.reference import token_merge as ref
from tests.helpers import assert_close_lowp, device_dtype_params, kernel_devices, requires_cuda

kernel_params = device_dtype_params()
if kernel_devices():
    from nnfast.kernels import token_merge as kern

# (B, T, k, C_in, C_out): T multiple of k and not, k = 1 .. 4, C from 8 to 40.
SHAPES = [(2, 8, 4, 8, 40), (2, 7, 2, 8, 8), (2, 13, 3, 40, 8), (1, 13, 4, 40, 40),
          (3, 1, 3, 8, 16), (1, 5, 1, 8, 8)]


def _inputs(shape, dtype, device, expand=False, seed=0, wdtype=None):
    B, T, k, cin, cout = shape
    gen = torch.Generator().manual_seed(seed)
    wshape = (cin, cout, k) if expand else (cout, cin, k)
    x = torch.randn(B, T, cin, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(wshape, generator=gen) / (cin * k) ** 0.5).to(device, wdtype or dtype)
    b = torch.randn(cout, generator=gen).to(device=device, dtype=wdtype or dtype)
    return x, w, b


def _run(fn, x, w, b, dy, **kw):
    """Output and gradients of ``fn`` on fresh leaves with the same ``dy``."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (x, w, b)]
    y = fn(*leaves, **kw)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    return y.detach(), grads


def check_against_reference(op, x, w, b, dy=None, **kw):
    """Kernel vs the fp32 reference, output and every gradient, by the 2x/3x rule."""
    kfn, rfn = getattr(kern, op), getattr(ref, op)
    y_pt = rfn(x, w, b, **kw)  # PyTorch's convolution in the input dtype
    if dy is None:
        dy = torch.randn(y_pt.shape, dtype=x.dtype, device=x.device)
    y, grads = _run(kfn, x, w, b, dy, **kw)
    f32 = [t.float() if t is not None else None for t in (x, w, b)]
    y_ref, grads_ref = _run(rfn, *f32, dy.float(), **kw)
    y_pt, grads_pt = _run(rfn, x, w, b, dy, **kw)
    assert y.dtype == x.dtype
    assert_close_lowp("y", y, y_ref, y_pt)
    for name, g, g_ref, g_pt, t in zip(("dx", "dweight", "dbias"), grads, grads_ref, grads_pt,
                                       (x, w, b)):
        assert g.dtype == t.dtype, name
        assert_close_lowp(name, g, g_ref, g_pt, factor=3.0)


@pytest.mark.parametrize("device,dtype", kernel_params)
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_merge_matches_reference(device, dtype, shape, causal):
    x, w, b = _inputs(shape, dtype, device)
    check_against_reference("token_merge", x, w, b, k=shape[2], causal=causal)


@pytest.mark.parametrize("device,dtype", kernel_params)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_expand_matches_reference(device, dtype, shape):
    B, T, k, cin, cout = shape
    x, w, b = _inputs(shape, dtype, device, expand=True)
    # Full length, and cropped to an original length that is not a multiple of k.
    for length in {T * k, max(T * k - k + 1, 0)}:
        check_against_reference("token_expand", x, w, b, k=k, length=length)


@pytest.mark.parametrize("device,dtype", kernel_params)
def test_no_bias_and_fp32_weights(device, dtype):
    """No bias; and fp32 parameters with low-precision activations (autocast training)."""
    shape = (2, 13, 3, 40, 8)
    x, w, _ = _inputs(shape, dtype, device, seed=1)
    check_against_reference("token_merge", x, w, None, k=3, causal=True)
    x, w, _ = _inputs(shape, dtype, device, expand=True, seed=1)
    check_against_reference("token_expand", x, w, None, k=3, length=37)
    for expand, op, kw in ((False, "token_merge", {"causal": False}),
                           (True, "token_expand", {"length": 38})):
        x, w, b = _inputs(shape, dtype, device, expand=expand, seed=2, wdtype=torch.float32)
        check_against_reference(op, x, w, b, k=3, **kw)


@pytest.mark.parametrize("device,dtype", kernel_params)
def test_noncontiguous_inputs_and_nan_never_read(device, dtype):
    B, T, k, cin, cout = shape = (2, 13, 3, 40, 8)
    x, w, b = _inputs(shape, dtype, device, seed=3)
    # Channel stride 2 with NaN in the gaps, and NaN tokens past T (batch stride > T*C): the
    # window view must read neither (the tail padding is a mask, not a read).
    wide = torch.full((B, T + 4, 2 * cin), float("nan"), dtype=dtype, device=device)
    wide[:, :T, ::2] = x
    xs = wide[:, :T, ::2]
    assert not xs.is_contiguous()
    for causal in (False, True):
        check_against_reference("token_merge", xs, w, b, k=k, causal=causal)
    # Tokens not packed (time stride != C * channel stride): copied by the launcher.
    check_against_reference("token_merge", x.transpose(1, 2).contiguous().transpose(1, 2),
                            w, b, k=k, causal=True)
    check_against_reference("token_merge", torch.cat([x, x], 1)[:, ::2], w, b, k=k, causal=False)
    # Expand: a non-contiguous x, a transposed weight, an expanded upstream gradient.
    xe, we, be = _inputs(shape, dtype, device, expand=True, seed=4)
    xe = xe.transpose(0, 1).contiguous().transpose(0, 1)
    we = we.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    dy = torch.randn(cout, dtype=dtype, device=device).expand(B, T * k - 1, cout)
    check_against_reference("token_expand", xe, we, be, dy=dy, k=k, length=T * k - 1)


@pytest.mark.parametrize("device,dtype", kernel_params)
def test_split_weight_gradient(device, dtype, monkeypatch):
    """Weight gradients reduced over several programs' partial sums (many windows)."""
    monkeypatch.setattr(kern, "SPLIT_MIN_ROWS", 16)
    shape = (3, 97, 2, 8, 24)  # 147 windows -> several splits
    x, w, b = _inputs(shape, dtype, device, seed=5)
    check_against_reference("token_merge", x, w, b, k=2, causal=True)
    x, w, b = _inputs(shape, dtype, device, expand=True, seed=5)
    check_against_reference("token_expand", x, w, b, k=2, length=193)


@pytest.mark.skipif(not kernel_devices(), reason="Triton kernels cannot run here")
def test_empty_batch():
    device = kernel_devices()[-1]
    x, w, b = _inputs((0, 7, 2, 8, 8), torch.float32, device)
    dy = torch.empty(0, 4, 8, device=device)
    y, (dx, dw, db) = _run(kern.token_merge, x, w, b, dy, k=2, causal=False)
    assert y.shape == (0, 4, 8) and dx.shape == x.shape
    assert not dw.any() and not db.any()


# ----------------------------------------------------------------------------- causality
def _merge_expand(impl, x, wm, bm, we, be, k, causal):
    """merge -> a causal mix over merged tokens (cumulative sum, as causal attention would
    be) -> expand back to T tokens."""
    h = impl.token_merge(x, wm, bm, k, causal)
    return impl.token_expand(h.cumsum(1), we, be, k, x.shape[1])


def _impls():
    return [pytest.param(ref, id="reference")] + (
        [pytest.param("kernel", id="kernel")] if kernel_devices() else [])


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("k", [2, 3, 4])
def test_causal_merge_expand_never_sees_the_future(impl, k):
    """Perturbing token t changes nothing at positions before t; position s depends on
    token t only if t <= (s // k) * k. Without the shift the future leaks (so the check bites)."""
    impl = kern if impl == "kernel" else impl
    device = kernel_devices()[-1] if impl is not ref else "cpu"
    T, C = 13, 8
    x, wm, bm = _inputs((2, T, k, C, 16), torch.float32, device, seed=6)
    _, we, be = _inputs((2, T, k, 16, C), torch.float32, device, expand=True, seed=7)
    y = _merge_expand(impl, x, wm, bm, we, be, k, causal=True)
    pos = torch.arange(T, device=device)
    for t in range(T):
        x2 = x.clone()
        x2[:, t] += 1.0
        y2 = _merge_expand(impl, x2, wm, bm, we, be, k, causal=True)
        changed = (y2 != y).any(-1).any(0)  # (T,)
        assert not changed[:t].any(), f"token {t} reached positions {pos[:t][changed[:t]]}"
        # Exactly the positions whose window reaches t are allowed to change.
        assert not (changed & ((pos // k) * k < t)).any()
    # The same check on the unshifted merge must fail for k > 1: the window leaks.
    x2 = x.clone()
    x2[:, k - 1] += 1.0
    leaked = _merge_expand(impl, x2, wm, bm, we, be, k, causal=False)
    assert (leaked[:, 0] != _merge_expand(impl, x, wm, bm, we, be, k, causal=False)[:, 0]).any()


# ----------------------------------------------------------------------------- functional / compile
@pytest.mark.skipif(not kernel_devices(), reason="Triton kernels cannot run here")
def test_functional_dispatch_and_modules(monkeypatch):
    device = kernel_devices()[-1]
    torch.manual_seed(8)
    merge = nnfast.TokenMerge(8, 24, 3, causal=True).to(device)
    expand = nnfast.TokenExpand(24, 8, 3).to(device)
    x = torch.randn(2, 13, 8, device=device)
    want = ref.token_expand(ref.token_merge(x, merge.weight, merge.bias, 3, True),
                            expand.weight, expand.bias, 3, 13)
    for backend in ("auto", "torch"):
        monkeypatch.setenv("NNFAST_BACKEND", backend)
        y = expand(merge(x), length=13)
        assert y.shape == (2, 13, 8)
        torch.testing.assert_close(y, want)
    # k defaults to the weight's last dim.
    torch.testing.assert_close(nnfast.functional.token_merge(x, merge.weight),
                               ref.token_merge(x, merge.weight, None, 3, False))


@pytest.mark.skipif(not kernel_devices(), reason="Triton kernels cannot run here")
def test_compile_fullgraph():
    """The custom ops and their fake impls: no graph break, same values and gradients."""
    device = kernel_devices()[-1]
    x, wm, bm = _inputs((2, 7, 2, 8, 16), torch.float32, device, seed=9)
    _, we, be = _inputs((2, 7, 2, 16, 8), torch.float32, device, expand=True, seed=9)

    def f(x, wm, bm, we, be):
        return kern.token_expand(kern.token_merge(x, wm, bm, 2, True), we, be, 2, 7)

    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        leaves = [t.clone().requires_grad_(True) for t in (x, wm, bm, we, be)]
        y = fn(*leaves)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), *[t.grad for t in leaves]))
    torch.testing.assert_close(results[0], results[1])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_benchmark_size_cuda(dtype, causal):
    x, w, b = _inputs((4, 4096, 4, 512, 1024), dtype, "cuda", seed=10)
    check_against_reference("token_merge", x, w, b, k=4, causal=causal)
    x, w, b = _inputs((4, 1024, 4, 1024, 512), dtype, "cuda", expand=True, seed=10)
    check_against_reference("token_expand", x, w, b, k=4, length=4095)


# ----------------------------------------------------------------------------- the reference
def _loop_merge(x, w, b, k, causal):
    """The defining sum, one output at a time (fp64)."""
    B, T, _ = x.shape
    shift = k - 1 if causal else 0
    out = torch.zeros(B, -(-T // k), w.shape[0], dtype=x.dtype)
    for j in range(out.shape[1]):
        for i in range(k):
            t = j * k + i - shift
            if 0 <= t < T:
                out[:, j] += x[:, t] @ w[:, :, i].T
    return out + b


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_is_the_defining_sum_and_conv1d(shape, causal):
    B, T, k, cin, cout = shape
    x, w, b = _inputs(shape, torch.float64, "cpu", seed=11)
    y = ref.token_merge(x, w, b, k, causal)
    torch.testing.assert_close(y, _loop_merge(x, w, b, k, causal))
    conv = nn.Conv1d(cin, cout, k, stride=k, dtype=torch.float64)
    conv.load_state_dict({"weight": w, "bias": b})
    if T % k == 0 and not causal:
        torch.testing.assert_close(y, conv(x.transpose(1, 2)).transpose(1, 2))
    # fp32 gradients of the reference vs fp64 autograd of nn.Conv1d on the padded input.
    shift = k - 1 if causal else 0
    Tm = -(-T // k)
    dy = torch.randn(B, Tm, cout, dtype=torch.float64)

    def conv_padded(x, w, b):
        xp = torch.cat([x.new_zeros(B, shift, cin), x, x.new_zeros(B, Tm * k, cin)], 1)
        return torch.nn.functional.conv1d(xp[:, : Tm * k].transpose(1, 2), w, b,
                                          stride=k).transpose(1, 2)

    y32, g32 = _run(ref.token_merge, x.float(), w.float(), b.float(), dy.float(), k=k,
                    causal=causal)
    y64, g64 = _run(conv_padded, x, w, b, dy)
    torch.testing.assert_close(y32, y64.float(), rtol=1e-5, atol=1e-5)
    for g, gg in zip(g32, g64):
        torch.testing.assert_close(g, gg.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_expand_is_conv_transpose1d(shape):
    B, T, k, cin, cout = shape
    x, w, b = _inputs(shape, torch.float64, "cpu", expand=True, seed=12)
    deconv = nn.ConvTranspose1d(cin, cout, k, stride=k, dtype=torch.float64)
    deconv.load_state_dict({"weight": w, "bias": b})
    full = deconv(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(ref.token_expand(x, w, b, k, None), full)
    torch.testing.assert_close(ref.token_expand(x, w, b, k, T * k - 1), full[:, : T * k - 1])
    # Token j*k + i is x[j] @ w[:, :, i] + b.
    torch.testing.assert_close(full[:, k - 1], x[:, 0] @ w[:, :, k - 1] + b)


def test_modules_load_torch_state_dicts():
    torch.manual_seed(13)
    conv, deconv = nn.Conv1d(8, 24, 3, stride=3), nn.ConvTranspose1d(24, 8, 3, stride=3)
    merge, expand = nnfast.TokenMerge(8, 24, 3), nnfast.TokenExpand(24, 8, 3)
    merge.load_state_dict(conv.state_dict())
    expand.load_state_dict(deconv.state_dict())
    x = torch.randn(2, 12, 8)
    h = merge(x)
    torch.testing.assert_close(h, conv(x.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(expand(h), deconv(h.transpose(1, 2)).transpose(1, 2))
    # And back: ours load into torch's, bias-free modules have no bias entry.
    conv.load_state_dict(nnfast.TokenMerge(8, 24, 3).state_dict())
    deconv.load_state_dict(nnfast.TokenExpand(24, 8, 3).state_dict())
    assert set(nnfast.TokenMerge(8, 24, 3, bias=False).state_dict()) == {"weight"}
    # Initialized like torch's modules: the same uniform bounds.
    assert merge.weight.shape == conv.weight.shape and expand.weight.shape == deconv.weight.shape
    bound_m, bound_e = (8 * 3) ** -0.5, (8 * 3) ** -0.5
    fresh_m, fresh_e = nnfast.TokenMerge(8, 24, 3), nnfast.TokenExpand(24, 8, 3)
    assert fresh_m.weight.abs().max() <= bound_m and fresh_m.weight.abs().max() > bound_m / 2
    assert fresh_e.weight.abs().max() <= bound_e and fresh_e.bias.abs().max() <= bound_e


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    x = torch.randn(2, 8, 4)
    w = torch.randn(6, 4, 2)
    F = nnfast.functional
    with pytest.raises(ValueError, match="k must"):
        F.token_merge(x, w, k=0)
    with pytest.raises(ValueError, match="k must"):
        F.token_expand(x, torch.randn(4, 6, 2), k=-1)
    with pytest.raises(ValueError, match="weight"):
        F.token_merge(x, w, k=3)  # weight's last dim is not k
    with pytest.raises(ValueError, match="weight"):
        F.token_merge(x, torch.randn(6, 5, 2))  # C_in mismatch
    with pytest.raises(ValueError, match="weight"):
        F.token_expand(x, w)  # a Conv1d weight given to the transpose
    with pytest.raises(ValueError, match="weight"):
        F.token_merge(x, torch.randn(6, 8))
    with pytest.raises(TypeError, match="weight"):
        F.token_merge(x, w.half())
    with pytest.raises(TypeError, match="bias"):
        F.token_merge(x, w, torch.randn(6, dtype=torch.float64))
    with pytest.raises(TypeError, match="x"):
        F.token_merge(x.long(), w)
    with pytest.raises(ValueError, match="bias"):
        F.token_merge(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="x must be 3-D"):
        F.token_merge(x[0], w)
    with pytest.raises(ValueError, match="bias"):
        F.token_merge(x, w, torch.randn(6, device="meta"))
    with pytest.raises(ValueError, match="length"):
        F.token_expand(x, torch.randn(4, 6, 2), length=17)
    with pytest.raises(ValueError, match="k must"):
        nnfast.TokenMerge(4, 6, 0)
    with pytest.raises(ValueError, match="k must"):
        nnfast.TokenExpand(4, 6, 0)


@pytest.mark.skipif(not kernel_devices(), reason="Triton kernels cannot run here")
def test_autotune_key_is_power_of_two_buckets(monkeypatch):
    """Two batch x length sizes in one power-of-two bucket give the autotuner one key (the
    key as Autotuner.run builds it from the launch's arguments), so no re-tuning."""
    import inspect

    names = inspect.signature(kern._gemm.fn).parameters
    keys = []
    real_run = kern._gemm_tuned.run

    def spy(*args, **kwargs):
        bound = dict(zip(names, args), **kwargs)
        keys.append(tuple(bound[k] for k in kern._gemm_tuned.keys))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(kern._gemm_tuned, "run", spy)
    w = torch.randn(8, 8, 2)
    for T in (10, 12):  # M = B*T/k = 10 and 12 windows: both in the 16 bucket
        kern.token_merge(torch.randn(2, T, 8), w, None, 2, False)
    assert keys[0] == keys[1] and keys[0][:3] == (16, 8, 16)
