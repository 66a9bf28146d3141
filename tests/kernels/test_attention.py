"""Flash attention (``nnfast.kernels.attention``) against the references, judged by the
low-precision rule: the kernel's error may be at most 2x (3x for gradients) the error PyTorch
makes computing the same attention math in the input's dtype. For fp32 inputs PyTorch's
"low precision" is the fp32 reference itself and the truth is the same math in fp64.

Through the interpreter on CPU the shapes are small; the interpreter's blocks (32 x 16 and
16 x 32) still give several blocks per sequence, tails and diagonal blocks."""

import math

import pytest
import torch

import nnfast.functional as F
from nnfast.reference import attention as ref
from tests.helpers import CUDA, device_dtype_params, kernel_devices, max_err, requires_cuda
from tests.helpers import assert_close_lowp as close

K = pytest.importorskip("nnfast.kernels.attention")
DD = device_dtype_params()
sdpa = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "triton")


def _math(q, k, v, mask, causal, scale, dropout_p=0.0, keep=None):
    """The reference's math in the inputs' own dtype (no upcast): PyTorch's own error."""
    return _math_lse(q, k, v, mask, causal, scale, dropout_p, keep)[0]


def _math_lse(q, k, v, mask, causal, scale, dropout_p=0.0, keep=None):
    """``_math``'s (out, lse): lse the undropped rows' log-sum-exp, -inf with zero gradient
    on rows with no key."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # (B, Hq, Lk, D)
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if causal:
        tril = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~tril, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    den = e.sum(-1, keepdim=True)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    p = e / safe
    lse = torch.where(den > 0, torch.log(safe) + m, float("-inf")).squeeze(-1)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return p @ v, lse


def _grads(fn, tensors, dout, dtype=None):
    """fn's output and the gradients of the tensors that require grad, on copies in dtype."""
    leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad)
              if dtype is None or not t.is_floating_point()
              else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    return [out, *torch.autograd.grad(out, wrt, dout.to(out.dtype))]


def _check(q, k, v, mask=None, causal=False, dropout_p=0.0, scale=None):
    """Kernel vs reference for out, dq, dk, dv (and dmask) with one shared dout."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    tensors = (q, k, v, mask)
    keep = None
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    dout = dout.to(q.device, q.dtype)
    torch.manual_seed(1234)  # the kernel's dropout seed comes from torch's generator
    got = _grads(lambda *t: sdpa(*t, dropout_p=dropout_p, is_causal=causal, scale=scale,
                                 enable_gqa=True), tensors, dout)
    if dropout_p > 0.0:
        torch.manual_seed(1234)
        B, H, Lq, _ = q.shape
        keep = K.dropout_mask(K.draw_seed(), B, H, Lq, k.shape[2], dropout_p, q.device)
    if q.dtype == torch.float32:  # truth in fp64, PyTorch's error = the fp32 reference's
        want = _grads(lambda *t: _math(*t, causal, scale, dropout_p, keep), tensors, dout,
                      torch.float64)
        lowp = _grads(lambda *t: ref.attention(*t, dropout_p, causal, scale, keep), tensors, dout)
    else:
        want = _grads(lambda *t: ref.attention(*t, dropout_p, causal, scale, keep), tensors,
                      dout, torch.float32)
        lowp = _grads(lambda *t: _math(*t, causal, scale, dropout_p, keep), tensors, dout)
    # fp32 gradients get the default floor (1e-5) relative to the largest gradient of the
    # problem, not each gradient's own size: with Lk = 1 the softmax is constant, dK is
    # analytically 0 and flash attention computes it as a difference of O(|dV|) terms
    # (dP - delta). Low-precision dtypes keep assert_close_lowp's default floor.
    big = max(max(1.0, w.abs().max().item()) for w in want[1:]) if len(want) > 1 else 1.0
    names = ["out", "dq", "dk", "dv", "dmask"]
    for i, (a, w, lo) in enumerate(zip(got, want, lowp)):
        assert a.dtype == (mask.dtype if i == 4 else q.dtype)
        floor = 1e-5 * big if i > 0 and q.dtype == torch.float32 else None
        close(names[i], a, w, lo, factor=2.0 if i == 0 else 3.0, floor=floor)
    return got


def _qkv(device, dtype, B, Hq, Hk, Lq, Lk, D, grad=True):
    gen = torch.Generator().manual_seed(B * 1000 + Lq * 10 + Lk + D)
    q, k, v = (torch.randn(B, h, n, D, generator=gen).to(device, dtype).requires_grad_(grad)
               for h, n in ((Hq, Lq), (Hk, Lk), (Hk, Lk)))
    return q, k, v


# (B, Hq, Hk, Lq, Lk, D): GQA ratios 1, 2, 4; Lq != Lk both ways; decoding (Lq = 1).
SHAPES = [
    (1, 2, 2, 113, 203, 16),
    (1, 4, 2, 1, 239, 40),
    (1, 4, 1, 239, 1, 80),
    (1, 2, 1, 113, 97, 64),
]


@pytest.mark.parametrize("device,dtype", DD)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, dtype, causal, shape):
    B, Hq, Hk, Lq, Lk, D = shape
    q, k, v = _qkv(device, dtype, *shape)
    out = _check(q, k, v, causal=causal)[0]
    assert out.shape == (B, Hq, Lq, D)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [48, 128, 256])
@pytest.mark.parametrize("L", [(1023, 1024), (1, 2048)])
def test_matches_reference_cuda(dtype, causal, D, L):
    q, k, v = _qkv("cuda", dtype, 2, 4, 2, L[0], L[1], D)
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("device,dtype", DD)
@pytest.mark.parametrize("scale", [-1.0, 0.0])
def test_negative_and_zero_scale(device, dtype, scale):
    """PyTorch takes any finite scale. The forward folds the scale into its running max
    (scale * max(q.k), or scale * min(q.k) when scale < 0): with scores spread over hundreds,
    a max taken on the wrong side overflows exp2 to inf."""
    q, k, v = _qkv(device, dtype, 1, 2, 1, 40, 72, 16)
    q = (8.0 * q).detach().requires_grad_()
    _check(q, k, v, scale=scale)


@pytest.mark.skipif("cpu" not in kernel_devices(), reason="needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tma_path_through_interpreter(monkeypatch, causal, dtype):
    """The forward's TMA path (descriptors over the (B, H, L, D) views) is taken only on CUDA
    sm_90+; the interpreter runs descriptors too, so it is forced here: GQA, tails in both
    lengths, a head dim below its block, and a non-contiguous view. Its row sums come from a
    dot of the rounded p (ROWSUM_DOT): in fp16 within the low-precision rule too."""
    monkeypatch.setattr(K, "_tma_ok", lambda *ts: True)
    q, k, v = _qkv("cpu", dtype, 2, 4, 2, 45, 50, 40)
    _check(q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(), k, v,
           causal=causal)


@requires_cuda
def test_long_sequence_cuda():
    q, k, v = _qkv("cuda", torch.bfloat16, 1, 4, 1, 4097, 4097, 112)
    _check(q, k, v, causal=True)


@pytest.mark.skipif(CUDA, reason="the CUDA test covers long sequences")
@pytest.mark.skipif("cpu" not in kernel_devices(), reason="needs TRITON_INTERPRET=1 on CPU")
def test_long_sequence_cheap():
    q, k, v = _qkv("cpu", torch.float32, 1, 1, 1, 1023, 1024, 16)
    _check(q, k, v, causal=True)


def _masks(kind, B, H, Lq, Lk, device, dtype):
    gen = torch.Generator().manual_seed(3)
    if kind == "bool":
        return (torch.rand(B, 1, Lq, Lk, generator=gen) > 0.3).to(device)
    if kind == "key_padding":  # (B, 1, 1, Lk): batch element b sees its first 40 - 9b keys
        return (torch.arange(Lk)[None, :] < torch.tensor([[40], [31]])).view(B, 1, 1, Lk).to(device)
    if kind == "float":  # full shape, learned (T5's relative-position bias)
        return torch.randn(B, H, Lq, Lk, generator=gen).to(device, dtype).requires_grad_()
    if kind == "float_bcast":  # (H, Lq, Lk) broadcast over batch, learned
        return torch.randn(H, Lq, Lk, generator=gen).to(device, dtype).requires_grad_()
    # (Lk,) additive key padding with -inf, constant
    return torch.zeros(Lk).masked_fill(torch.arange(Lk) >= 45, float("-inf")).to(device, dtype)


@pytest.mark.parametrize("device,dtype", DD)
@pytest.mark.parametrize("kind", ["bool", "key_padding", "float", "float_bcast", "float_pad"])
def test_masks(device, dtype, kind):
    q, k, v = _qkv(device, dtype, 2, 4, 2, 37, 53, 16)
    mask = _masks(kind, 2, 4, 37, 53, device, dtype)
    got = _check(q, k, v, mask)
    assert len(got) == (5 if kind in ("float", "float_bcast") else 4)


@pytest.mark.parametrize("device,dtype", DD)
def test_fully_masked_rows_give_zeros(device, dtype):
    q, k, v = _qkv(device, dtype, 2, 2, 1, 37, 29, 16)
    mask = torch.rand(2, 2, 37, 29, generator=torch.Generator().manual_seed(0)) > 0.5
    mask[:, :, [0, 5, 36]] = False  # rows with no key
    mask[1, :, :, :] = False  # a batch element with no key at all
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf")).to(device, dtype)
    for m in (mask.to(device), bias.requires_grad_()):
        out, dq, dk, dv, *rest = _check(q, k, v, m)
        assert out[:, :, [0, 5, 36]].abs().max() == 0 and out[1].abs().max() == 0
        assert dq[:, :, [0, 5, 36]].abs().max() == 0 and dq[1].abs().max() == 0
        assert dk[1].abs().max() == 0 and dv[1].abs().max() == 0
        for t in rest:  # the bias gradient: finite, zero at excluded entries
            assert torch.isfinite(t).all() and t[~mask.to(device)].abs().max() == 0


def _nan_padded(t, extra_l, extra_d):
    """t's values inside a NaN-filled (B, L + extra_l, H, D + extra_d) buffer, returned as a
    non-contiguous (B, H, L, D) view: anything read past the valid region poisons the result."""
    B, H, L, D = t.shape
    buf = torch.full((B, L + extra_l, H, D + extra_d), float("nan"), dtype=t.dtype,
                     device=t.device)
    buf[:, :L, :, :D] = t.detach().transpose(1, 2)
    return buf.transpose(1, 2)[:, :, :L, :D].requires_grad_()


@pytest.mark.parametrize("device,dtype", DD)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_padding_is_never_read(device, dtype, causal):
    q, k, v = _qkv(device, dtype, 2, 4, 2, 45, 50, 40)
    qp, kp, vp = (_nan_padded(t, 7, 5) for t in (q, k, v))
    assert not qp.is_contiguous()
    got = _check(qp, kp, vp, causal=causal)
    for t in got:
        assert not torch.isnan(t).any()


@pytest.mark.parametrize("device", kernel_devices())
def test_deterministic(device):
    q, k, v = _qkv(device, torch.float32, 2, 4, 2, 37, 50, 32)
    bias = torch.randn(4, 37, 50).to(device).requires_grad_()
    dout = torch.randn(2, 4, 37, 32).to(device)
    runs = [_grads(lambda *t: sdpa(*t, enable_gqa=True), (q, k, v, bias), dout)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("p", [0.2])
def test_dropout_kept_fraction(device, p):
    B, H, Lq, Lk = 2, 2, 64, 70
    keep = K.dropout_mask(12345, B, H, Lq, Lk, p, device)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # every (b, h) plane gets its own stream
    flat = keep.view(B * H, -1)
    assert all(not torch.equal(flat[0], flat[i]) for i in range(1, B * H))
    assert torch.equal(keep, K.dropout_mask(12345, B, H, Lq, Lk, p, device))
    assert not torch.equal(keep, K.dropout_mask(12346, B, H, Lq, Lk, p, device))


@pytest.mark.parametrize("device,dtype", DD)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_matches_reference_with_same_mask(device, dtype, causal):
    q, k, v = _qkv(device, dtype, 1, 4, 2, 37, 53, 16)
    _check(q, k, v, causal=causal, dropout_p=0.3)


@pytest.mark.parametrize("device,dtype", DD)
def test_dropout_with_learned_bias_and_scale(device, dtype):
    q, k, v = _qkv(device, dtype, 1, 4, 2, 29, 41, 16)
    bias = _masks("float_bcast", 1, 4, 29, 41, device, dtype)
    _check(q, k, v, bias, dropout_p=0.2, scale=0.3)


@pytest.mark.parametrize("device", kernel_devices())
def test_dropout_follows_torch_seed(device):
    q, k, v = _qkv(device, torch.float32, 1, 2, 2, 20, 30, 16, grad=False)
    torch.manual_seed(0)
    a = sdpa(q, k, v, dropout_p=0.4)
    b = sdpa(q, k, v, dropout_p=0.4)
    torch.manual_seed(0)
    assert torch.equal(a, sdpa(q, k, v, dropout_p=0.4))
    assert not torch.equal(a, b)


# ----------------------------------------------------------------------------- plumbing
@pytest.mark.parametrize("device", kernel_devices())
def test_no_grad_and_compile(device):
    """Forward-only path under no_grad; the custom ops' fake impls and autograd trace with no
    graph break. The kernel entry is compiled directly: functional._impl's importlib call is
    not traceable (see tests/modules)."""
    q, k, v = _qkv(device, torch.float32, 1, 2, 1, 20, 30, 16)
    with torch.no_grad():
        out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    assert out.grad_fn is None
    torch._dynamo.reset()
    fn = torch.compile(K.attention, backend="aot_eager", fullgraph=True)
    got = fn(q, k, v, None, 0.0, True, 0.25)
    assert torch.equal(got, out)
    (dq,) = torch.autograd.grad(got.sum(), q)
    (want,) = torch.autograd.grad(sdpa(q, k, v, is_causal=True, enable_gqa=True).sum(), q)
    assert torch.equal(dq, want)
    dropped = fn(q, k, v, None, 0.5, False, 0.25)  # the seed draw traces too
    assert torch.isfinite(dropped).all()
    assert max_err(dropped, K.attention(q, k, v, None, 0.0, False, 0.25)) > 0.1


@pytest.mark.parametrize("case", ["causal-gqa", "bool-masked-rows"])
def test_lse_gradient_fp16(monkeypatch, case):
    """fp16 through the kernels: out, lse and every gradient of the out + lse loss within
    2x (3x for gradients) of PyTorch's own fp16 error, both judged against fp64."""
    if "cpu" not in kernel_devices():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    q, k, v, mask, causal, _ = _lse_case(case)
    q, k, v = (t.half() for t in (q, k, v))
    gen = torch.Generator().manual_seed(5)
    g, h = torch.randn(2, 4, 37, 16, generator=gen).half(), torch.randn(2, 4, 37, generator=gen)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        dq, dk, dv = torch.autograd.grad((out, lse), leaves, (g.to(out.dtype), h.to(lse.dtype)))
        return out, lse, dq, dk, dv

    got = run(lambda *t: sdpa(*t, attn_mask=mask, is_causal=causal, scale=0.25,
                              enable_gqa=True, return_lse=True), torch.float16)
    want = run(lambda *t: _math_lse(*t, mask, causal, 0.25), torch.float64)
    lowp = run(lambda *t: _math_lse(*t, mask, causal, 0.25), torch.float16)
    fin = torch.isfinite(want[1])
    assert torch.equal(torch.isneginf(got[1]), ~fin)
    for i, name in enumerate(["out", "lse", "dq", "dk", "dv"]):
        a, w, lo = got[i], want[i], lowp[i]
        if name == "lse":
            a, w, lo = a[fin], w[fin], lo[fin]
        close(name, a, w, lo, factor=2.0 if i < 2 else 3.0)


@pytest.mark.parametrize("device", kernel_devices())
def test_lse_gradient_compiles(device):
    """The lse's gradient through torch.compile (the custom ops' fake impls, attention_bwd's
    optional grad_lse): the same gradients as eager, for losses of out + lse and lse alone."""
    q, k, v = _qkv(device, torch.float32, 1, 2, 1, 20, 30, 16)
    torch._dynamo.reset()
    fn = torch.compile(K.attention, backend="aot_eager", fullgraph=True)
    h = torch.randn(1, 2, 20, generator=torch.Generator().manual_seed(0)).to(device)
    for use_out in (True, False):
        grads = []
        for f in (K.attention, fn):
            out, lse = f(q, k, v, None, 0.0, True, 0.25, window=(5, -1), return_lse=True)
            loss = (lse * h).sum() + (out.sum() if use_out else 0.0)
            g = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
            # lse alone does not depend on v: None in eager (as on the reference path);
            # AOTAutograd materialises a None gradient as zeros.
            if f is K.attention:
                assert (g[2] is None) == (not use_out)
            grads.append([torch.zeros_like(t) if d is None else d for d, t in zip(g, (q, k, v))])
        for a, b in zip(*grads):
            assert torch.equal(a, b)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "args,kwargs,err,match",
    [
        ((_t(2, 8, 16), _t(2, 8, 16), _t(2, 8, 16)), {}, ValueError, "query must be 4-D"),
        ((_t(1, 2, 8, 16), _t(1, 2, 8, 32), _t(1, 2, 8, 32)), {}, ValueError, "head dim"),
        ((_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 32)), {}, ValueError, "value's head"),
        ((_t(1, 6, 8, 16), _t(1, 4, 8, 16), _t(1, 4, 8, 16)), {"enable_gqa": True}, ValueError,
         "multiple"),
        ((_t(1, 4, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)), {}, ValueError, "enable_gqa"),
        ((_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)), {"attn_mask": _t(3, 8, 8)},
         ValueError, "attn_mask"),
        ((_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)),
         {"attn_mask": _t(8, 8, dtype=torch.int32)}, TypeError, "attn_mask"),
        ((_t(1, 2, 8, 16), _t(1, 2, 8, 16, dtype=torch.float16), _t(1, 2, 8, 16)), {},
         TypeError, "key"),
        ((_t(1, 2, 8, 16), _t(1, 2, 8, 16, device="meta"), _t(1, 2, 8, 16)), {}, ValueError,
         "device"),
        ((_t(1, 2, 8, 320), _t(1, 2, 8, 320), _t(1, 2, 8, 320)), {}, ValueError, "head dim"),
        ((_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)), {"dropout_p": 1.0}, ValueError,
         "dropout_p"),
        ((_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)),
         {"attn_mask": _t(8, 8), "is_causal": True}, ValueError, "is_causal"),
        ((_t(1, 2, 8, 16, dtype=torch.int64),) * 3, {}, TypeError, "query"),
    ],
)
def test_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        sdpa(*args, **kwargs)


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 113, 40), (1, 2, 64, 80)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_cpu_fast_path_is_pytorchs_kernel(monkeypatch, shape, causal, scale):
    """The fp32 CPU call (the fast path: PyTorch's fused kernel called directly, its NaN
    test read off the kernel's lse) gives torch's own SDPA bit for bit, output and every
    gradient."""
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(*shape, generator=gen) for _ in range(3)]
    dout = torch.randn(*shape, generator=gen)
    results = []
    for fn in (sdpa, torch.nn.functional.scaled_dot_product_attention):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves, is_causal=causal, scale=scale)
        results.append([out, *torch.autograd.grad(out, leaves, dout)])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("finder", ["wmemchr", "torch"])
def test_cpu_kernel_lse_zero_test(monkeypatch, finder):
    """The fast path's test for the rows where PyTorch's kernel is not the math: it reads
    lse's memory in place, which needs the kernel's lse dense from its first element (else
    it would read past it); it finds a +0.0 anywhere (fp32 and fp64), and nothing else in
    fp32."""
    if finder == "torch":
        monkeypatch.setattr(ref, "_WMEMCHR", None)
    elif ref._WMEMCHR is None:
        pytest.skip("no 4-byte wmemchr in this libc")
    for shape, dtype in [((1, 1, 1, 8), torch.float32), ((3, 5, 113, 40), torch.float32),
                         ((2, 3, 37, 16), torch.float64)]:
        q = torch.randn(*shape, dtype=dtype)
        _, lse = ref._FLASH_CPU(q, q, q, 0.0, True)
        assert lse.storage_offset() == 0 and min(lse.stride()) > 0
        assert lse.untyped_storage().nbytes() == lse.nbytes
        assert not ref._has_zero(lse.abs() + 1.0)
        for idx in [(0, 0, 0), (shape[0] - 1, shape[1] - 1, shape[2] - 1)]:
            hit = lse.abs() + 1.0  # same (B, Lq, H) layout: clone-like ops keep it
            hit[idx] = 0.0
            assert ref._has_zero(hit), (shape, dtype, idx)


# ----------------------------------------------------------------------------- lse gradient
def _lse_case(case):
    """(q, k, v, mask, causal, dropout_p): fp32 on the CPU."""
    q, k, v = _qkv("cpu", torch.float32, 2, 4, 2, 37, 45, 16)
    gen = torch.Generator().manual_seed(11)
    mask = None
    if case == "bool-masked-rows":
        mask = torch.rand(2, 1, 37, 45, generator=gen) > 0.4
        mask[:, :, [0, 5, 36]] = False  # rows with no key
        mask[1] = False  # a batch element with no key at all
    elif case == "float-learned":  # T5-style bias with gradient, one row fully -inf
        mask = torch.randn(4, 37, 45, generator=gen)
        mask[:, 5] = float("-inf")
        mask.requires_grad_()
    return q, k, v, mask, case in ("causal-gqa", "dropout"), 0.3 if case == "dropout" else 0.0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", ["causal-gqa", "bool-masked-rows", "float-learned", "dropout"])
def test_lse_gradient_matches_fp64(monkeypatch, backend, case):
    """return_lse=True: out, lse and the gradients (dq, dk, dv, dmask) of
    ``(out * g).sum() + (lse * h).sum()`` against the fp64 math, on the kernel (interpreter)
    and the reference path. With dropout, lse is the undropped softmax's."""
    if backend == "triton" and "cpu" not in kernel_devices():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    if backend == "torch" and case == "dropout":
        pytest.skip("the reference path draws its own keep mask, which no test can replay")
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    q, k, v, mask, causal, p_drop = _lse_case(case)
    scale = 0.25
    leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad)
              for t in (q, k, v, mask)]
    torch.manual_seed(1234)
    out, lse = sdpa(*leaves, dropout_p=p_drop, is_causal=causal, scale=scale,
                    enable_gqa=True, return_lse=True)
    keep = None
    if p_drop > 0.0:
        torch.manual_seed(1234)
        keep = K.dropout_mask(K.draw_seed(), 2, 4, 37, 45, p_drop, "cpu")
    gen = torch.Generator().manual_seed(5)
    g, h = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    got = [out, lse, *torch.autograd.grad((out, lse), wrt, (g, h))]
    wl = [t if t is None or t.dtype == torch.bool
          else t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v, mask)]
    w_out, w_lse = _math_lse(*wl, causal, scale, p_drop, keep)
    w_wrt = [t for t in wl if t is not None and t.requires_grad]
    want = [w_out, w_lse, *torch.autograd.grad((w_out, w_lse), w_wrt, (g.double(), h.double()))]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(w_lse)), "fully masked rows"
    fin = torch.isfinite(w_lse)
    got[1], want[1] = got[1][fin], want[1][fin]
    big = max(1.0, *(w.abs().max().item() for w in want))
    for name, a, w in zip(["out", "lse", "dq", "dk", "dv", "dmask"], got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), w, atol=2e-5 * big, rtol=2e-5, msg=name)
    if mask is not None:  # rows with no key: no gradient reaches q (nor the bias)
        rows = ~torch.isfinite(w_lse)
        assert got[2][rows].abs().max() == 0
        if len(got) == 6:
            assert got[5][(~torch.isfinite(mask)).expand(4, 37, 45)].abs().max() == 0
