"""RoPE: the Triton kernel against the reference (outputs, dq, dk), and the reference against
independent formulations (Hugging Face's ``rotate_half``, Meta's complex-number Llama code)."""

from __future__ import annotations

import pytest
import torch

from nnfast import functional as F
from nnfast.reference import rope as ref
from tests.helpers import assert_close_lowp, device_dtype_params, kernel_devices

KERNEL_DEVICES = kernel_devices()
needs_kernels = pytest.mark.skipif(not KERNEL_DEVICES, reason="Triton kernels cannot run here")

# (head dim, rotary dim): full rotary at an odd-ish head dim, partial rotary (Phi-style).
DIMS = [(40, 40), (80, 32)]
# (T, how positions are given): 1 (decoding), 7, 113 (not a power of two).
POSITIONS = [(1, "offset"), (7, "ids_1d"), (7, "ids_2d"), (113, "offset"), (113, "ids_2d")]


def _kernels():
    from nnfast.kernels import rope

    return rope


def _positions(mode: str, B: int, T: int, table: int, device: str):
    """``(position_ids, offset)`` for a positions mode."""
    g = torch.Generator().manual_seed(T)
    if mode == "offset":
        return None, table - T - 3  # offset > 0, the last rows of the table
    if mode == "ids_1d":
        return torch.randperm(table, generator=g)[:T].to(device, torch.int32), 0
    return torch.randint(0, table, (B, T), generator=g).to(device), 0


def _grads(outs, inputs, grads):
    return torch.autograd.grad(outs, inputs, grads)


def _check_against_reference(q, k, cos, sin, pos, offset, interleaved):
    """Kernel outputs and dq, dk vs the fp32 reference, judged by the low-precision rule."""
    q32 = q.detach().float().requires_grad_()
    k32 = k.detach().float().requires_grad_()
    gq = torch.randn(q.shape, device=q.device)
    gk = torch.randn(k.shape, device=k.device)

    out = _kernels().apply_rotary(q, k, cos, sin, pos, offset, interleaved)
    d_out = _grads(out, (q, k), (gq.to(q.dtype), gk.to(k.dtype)))
    exp = ref.apply_rotary(q32, k32, cos, sin, pos, offset, interleaved)
    d_exp = _grads(exp, (q32, k32), (gq, gk))
    ql = q.detach().requires_grad_()
    kl = k.detach().requires_grad_()
    low = ref.apply_rotary(ql, kl, cos, sin, pos, offset, interleaved)
    d_low = _grads(low, (ql, kl), (gq.to(q.dtype), gk.to(k.dtype)))

    for name, o, e, lo in zip(("q_out", "k_out"), out, exp, low):
        assert o.dtype == q.dtype
        assert_close_lowp(name, o, e, lo)
    for name, o, e, lo in zip(("dq", "dk"), d_out, d_exp, d_low):
        assert_close_lowp(name, o, e, lo, factor=3.0)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("D,rd", DIMS, ids=[f"D{d}r{r}" for d, r in DIMS])
@pytest.mark.parametrize("T,mode", POSITIONS, ids=[f"T{t}-{m}" for t, m in POSITIONS])
def test_kernel_matches_reference(device, dtype, interleaved, D, rd, T, mode):
    torch.manual_seed(0)
    # GQA-shaped k (fewer heads); 6 q heads make a partial second group of 4 in the kernel.
    B, H, Hk, table = 2, 6, 2, 128
    cos, sin = ref.rotary_cos_sin(table, rd, device=device)
    q = torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hk, T, D, device=device, dtype=dtype, requires_grad=True)
    pos, offset = _positions(mode, B, T, table, device)
    _check_against_reference(q, k, cos, sin, pos, offset, interleaved)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_fused_qkv_slices(device, dtype, interleaved):
    """q and k as strided views of one fused projection, as models produce them, with the
    unused parts of the buffer NaN so that a stray read shows up."""
    torch.manual_seed(1)
    B, T, H, Hk, D, rd = 2, 9, 4, 2, 40, 24
    qkv = torch.randn(B, T, (H + 2 * Hk) * D, device=device, dtype=dtype, requires_grad=True)
    q = qkv[..., : H * D].view(B, T, H, D).transpose(1, 2)  # (B, H, T, D), strided
    k = qkv[..., H * D : (H + Hk) * D].view(B, T, Hk, D).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = ref.rotary_cos_sin(64, rd, device=device)
    _check_against_reference(q, k, cos, sin, None, 3, interleaved)

    # A gap in the last dim too (stride 2), the gaps NaN.
    wide = torch.full((B, H, T, 2 * D), float("nan"), device=device, dtype=dtype)
    wide[..., ::2] = torch.randn(B, H, T, D, device=device, dtype=dtype)
    qg = wide[..., ::2].requires_grad_()
    kg = wide[:, :Hk, :, ::2].detach().requires_grad_()
    _check_against_reference(qg, kg, cos, sin, None, 0, interleaved)


@needs_kernels
def test_output_layout_follows_dense_input():
    """A dense (B, T, H, D) buffer viewed as (B, H, T, D) keeps its layout in the output (no
    copy needed downstream); a gapped view (fused qkv slice) gives a contiguous output."""
    device = KERNEL_DEVICES[0]
    cos, sin = ref.rotary_cos_sin(8, 8, device=device)
    x = torch.randn(2, 5, 3, 8, device=device).transpose(1, 2)  # (B, H, T, D), dense
    qo, ko = _kernels().apply_rotary(x, x[:, :1], cos, sin, None, 0, False)
    assert qo.stride() == x.stride()
    assert ko.is_contiguous()
    qe, ke = ref.apply_rotary(x, x[:, :1], cos, sin, None, 0, False)
    torch.testing.assert_close(qo, qe)
    torch.testing.assert_close(ko, ke)


@needs_kernels
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_backward_is_inverse_rotation(interleaved):
    """Rotating by theta and then by -theta (the backward kernel) returns the input; the
    pass-through channels are untouched; two runs are bitwise equal."""
    device = KERNEL_DEVICES[0]
    kr = _kernels()
    torch.manual_seed(2)
    q = torch.randn(2, 3, 11, 80, device=device)
    k = torch.randn(2, 1, 11, 80, device=device)
    cos, sin = ref.rotary_cos_sin(32, 32, device=device)
    pos = torch.randint(0, 32, (2, 11), device=device)
    qr, kr_ = kr.rope_fwd(q, k, cos, sin, pos, 0, interleaved)
    assert not torch.allclose(qr[..., :32], q[..., :32], atol=1e-3)  # it did rotate
    assert torch.equal(qr[..., 32:], q[..., 32:]) and torch.equal(kr_[..., 32:], k[..., 32:])
    q2, k2 = kr.rope_bwd(qr, kr_, cos, sin, pos, 0, interleaved)
    torch.testing.assert_close(q2, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k2, k, atol=1e-5, rtol=1e-5)
    again = kr.rope_fwd(q, k, cos, sin, pos, 0, interleaved)
    assert torch.equal(again[0], qr) and torch.equal(again[1], kr_)


@needs_kernels
def test_double_backward():
    """The backward op has its own backward (the forward rotation), so grad-of-grad works."""
    device = KERNEL_DEVICES[0]
    torch.manual_seed(6)
    cos, sin = ref.rotary_cos_sin(16, 8, device=device)
    q0 = torch.randn(1, 2, 3, 10, device=device)
    results = []
    for impl in (_kernels(), ref):
        q = q0.clone().requires_grad_()
        k = (q0[:, :1] * 2).requires_grad_()
        qo, ko = impl.apply_rotary(q, k, cos, sin, None, 4, False)
        loss = (qo.square() * torch.arange(10.0, device=device)).sum() + (ko * q[:, :1]).sum()
        dq, dk = torch.autograd.grad(loss, (q, k), create_graph=True)
        results.append(torch.autograd.grad((dq * dk).sum(), (q, k)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@needs_kernels
def test_out_of_range_position_ids_give_nan():
    """Position ids are not range-checked on the host (a device sync); the kernel must not
    read past the table but poison the token's output instead."""
    device = KERNEL_DEVICES[0]
    cos, sin = ref.rotary_cos_sin(8, 16, device=device)
    q = torch.randn(1, 2, 3, 16, device=device)
    pos = torch.tensor([0, 8, -1], device=device)
    qo, ko = _kernels().apply_rotary(q, q, cos, sin, pos, 0, False)
    assert not qo[:, :, 0].isnan().any()
    assert qo[:, :, 1:].isnan().all() and ko[:, :, 1:].isnan().all()


@needs_kernels
def test_torch_compile_fullgraph():
    device = KERNEL_DEVICES[0]
    torch.manual_seed(3)
    cos, sin = ref.rotary_cos_sin(16, 8, device=device)

    def f(q, k):
        qo, ko = F.apply_rotary(q, k, cos, sin, offset=2, interleaved=True)
        return (qo * ko).sum()

    q = torch.randn(1, 2, 5, 12, device=device, requires_grad=True)
    k = torch.randn(1, 2, 5, 12, device=device, requires_grad=True)
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k)
    dq, dk = torch.autograd.grad(loss, (q, k))
    q32, k32 = q.detach().requires_grad_(), k.detach().requires_grad_()
    qe, ke = ref.apply_rotary(q32, k32, cos, sin, None, 2, True)
    le = (qe * ke).sum()
    dqe, dke = torch.autograd.grad(le, (q32, k32))
    torch.testing.assert_close(loss, le)
    torch.testing.assert_close(dq, dqe)
    torch.testing.assert_close(dk, dke)


@needs_kernels
@pytest.mark.parametrize("pos_mode", ["none", "ids_2d"])
def test_opcheck(pos_mode):
    """torch.library's own checks of the custom ops: schema, fake (meta) implementations with
    the real outputs' strides, autograd registration."""
    device = KERNEL_DEVICES[0]
    kr = _kernels()
    cos, sin = ref.rotary_cos_sin(16, 8, device=device)
    qkv = torch.randn(2, 5, 3 * 3 * 12, device=device, requires_grad=True)
    q = qkv[..., :36].view(2, 5, 3, 12).transpose(1, 2)  # strided, not dense
    k = torch.randn(2, 1, 5, 12, device=device, requires_grad=True)
    pos = torch.randint(0, 16, (2, 5), device=device) if pos_mode == "ids_2d" else None
    for op in (kr.rope_fwd, kr.rope_bwd):
        torch.library.opcheck(op, (q, k, cos, sin, pos, 3 if pos is None else 0, True))


# ----------------------------------------------------------------------------- the reference
def _hf_rope(q, k, pos, rotary_dim, base):
    """Hugging Face's ``apply_rotary_pos_emb`` (GPT-NeoX/Llama, half-split, partial rotary as
    in GPT-NeoX/Phi), in float64 as the truth."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = pos.double()[..., None] * inv_freq  # (B, T, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # (B, 1, T, R)

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    def one(x):
        x = x.double()
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)

    return one(q), one(k)


def _meta_rope(q, k, pos, rotary_dim, base):
    """Meta's Llama ``apply_rotary_emb``: adjacent channel pairs as complex numbers, in float64.
    Meta's layout is (B, T, H, D); ours is (B, H, T, D)."""
    freqs = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = pos.double()[..., None] * freqs  # (B, T, R/2)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[:, :, None]  # (B, T, 1, R/2)

    def one(x):
        x = x.double().transpose(1, 2)  # (B, T, H, D)
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        xc = torch.view_as_complex(x_rot.reshape(*x_rot.shape[:-1], -1, 2).contiguous())
        out = torch.view_as_real(xc * freqs_cis).flatten(3)
        return torch.cat((out, x_pass), dim=-1).transpose(1, 2)

    return one(q), one(k)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("D,rd", [(40, 40), (80, 32), (128, 128)])
def test_reference_matches_independent_formulation(interleaved, D, rd):
    torch.manual_seed(4)
    B, H, Hk, T, table, base = 2, 3, 1, 17, 4096, 10000.0
    q = torch.randn(B, H, T, D)
    k = torch.randn(B, Hk, T, D)
    pos = torch.randint(0, table, (B, T))
    pos[0, 0] = table - 1  # a long position, where fp32 angles would already be off
    cos, sin = ref.rotary_cos_sin(table, rd, base)
    qo, ko = ref.apply_rotary(q, k, cos, sin, pos, 0, interleaved)
    qe, ke = (_meta_rope if interleaved else _hf_rope)(q, k, pos, rd, base)
    torch.testing.assert_close(qo.double(), qe, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko.double(), ke, atol=1e-5, rtol=1e-5)
    # offset and 1-D position ids mean the same positions as explicit 2-D ids.
    q1, _ = ref.apply_rotary(q, k, cos, sin, pos[0], 0, interleaved)
    torch.testing.assert_close(q1[:1], qo[:1])
    q2, _ = ref.apply_rotary(q, k, cos, sin, None, 5, interleaved)
    q3, _ = ref.apply_rotary(q, k, cos, sin, torch.arange(5, 5 + T), 0, interleaved)
    torch.testing.assert_close(q2, q3)


def test_rotary_cos_sin_table():
    cos, sin = ref.rotary_cos_sin(100, 8, base=500.0)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (100, 4)
    theta = 500.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    torch.testing.assert_close(cos[37].double(), (37 * theta).cos(), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin[99].double(), (99 * theta).sin(), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="rotary_dim"):
        ref.rotary_cos_sin(10, 7)


# ----------------------------------------------------------------------------- bad input
def _bad(**over):
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    cos, sin = ref.rotary_cos_sin(8, 8)
    args = dict(q=q, k=k, cos=cos, sin=sin, position_ids=None, offset=0)
    args.update(over)
    return F.apply_rotary(
        args["q"], args["k"], args["cos"], args["sin"],
        position_ids=args["position_ids"], offset=args["offset"],
    )


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(cos=torch.ones(8, 4, dtype=torch.float16)), TypeError, "cos"),
        (dict(q=torch.randn(2, 4, 8)), ValueError, "q"),
        (dict(k=torch.randn(1, 2, 5, 8)), ValueError, "k must be"),
        (dict(k=torch.randn(1, 2, 4, 8).half()), TypeError, "k has dtype"),
        (dict(q=torch.ones(1, 2, 4, 8, dtype=torch.int64)), TypeError, "q must be"),
        (dict(position_ids=torch.arange(4.0)), TypeError, "position_ids"),
        (dict(position_ids=torch.arange(5)), ValueError, "position_ids"),
        (dict(offset=5), ValueError, "offset"),
        (dict(cos=torch.ones(8, 5), sin=torch.ones(8, 5)), ValueError, "rotary_dim"),
    ],
    ids=["cos-fp16", "q-3d", "k-T", "k-dtype", "q-int", "pos-float", "pos-shape", "offset",
         "rotary-too-wide"],
)
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**over)
