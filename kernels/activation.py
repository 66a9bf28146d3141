"""Fused (gated) activation: ``y = act(x) * up`` (SwiGLU, gated GELU) or ``y = act(x)``
(GPT-2's GELU), forward and backward, one kernel each with constexpr flags.

Layout: any leading shape; the launcher views a tensor as rows ``(M, N)`` with a row and a
column stride per input, so gate and up may be the two halves of one GEMM output
(``h[..., :H]`` and ``h[..., H:]``, row stride ``2H``) or a transposed tensor, with no copy.
Only leading dims that cannot merge into one row stride are copied. Outputs are contiguous.

Derivatives (``s = sigmoid(x)``, ``Phi``/``phi`` the normal CDF/PDF):

* silu(x) = x s, silu'(x) = s (1 + x (1 - s))
* gelu(x) = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, gelu'(x) = Phi(x) + x phi(x)
* gelu_tanh(x) = x (1 + t) / 2 with t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3);
  gelu_tanh'(x) = (1 + t) / 2 + x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2

Backward with ``dy``: ``dx = dy * up * act'(x)``, ``dup = dy * act(x)``. The backward
recomputes the activation from ``x`` (one exp/erf per element is free in a memory-bound
kernel) instead of storing it: storing would cost an extra ``(M, N)`` tensor of activation
memory and a write plus a read of it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nnfast._backend import interpreting

_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@triton.jit
def _activation_and_grad(
    x,  # fp32 block
    ACTIVATION: tl.constexpr,
    WANT_GRAD: tl.constexpr,
):
    """``(act(x), act'(x))`` in fp32; the derivative is 0.0 unless WANT_GRAD."""
    d = 0.0
    if ACTIVATION == "silu":
        s = 1.0 / (1.0 + tl.exp(-x))
        a = x * s
        if WANT_GRAD:
            d = s * (1.0 + x * (1.0 - s))
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))  # Phi(x)
        a = x * cdf
        if WANT_GRAD:
            d = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)  # 1/sqrt(2 pi)
    else:  # gelu_tanh
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi)
        # tanh from exp (tl.math.tanh / libdevice differ across Triton versions), in the form
        # that cannot overflow: e = exp(-2|u|) in (0, 1], tanh|u| = (1 - e) / (1 + e).
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(u < 0.0, -t, t)
        a = 0.5 * x * (1.0 + t)
        if WANT_GRAD:
            d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (
                1.0 + 0.134145 * x * x  # 3 * 0.044715
            )
    return a, d


@triton.jit
def _act_fwd(
    X,  # (M, N) gate, or the input when not GATED
    U,  # (M, N) up; unused when not GATED
    Y,  # (M, N) output, contiguous
    M,
    N,
    stride_xm,
    stride_xn,
    stride_um,
    stride_un,
    ACTIVATION: tl.constexpr,  # "silu" | "gelu" | "gelu_tanh"
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    y, _ = _activation_and_grad(x.to(tl.float32), ACTIVATION, False)
    if GATED:
        u = tl.load(U + rows[:, None] * stride_um + cols[None, :] * stride_un, mask=mask, other=0.0)
        y = y * u.to(tl.float32)
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd(
    DY,  # (M, N) upstream gradient
    X,  # (M, N) gate / input, as in the forward
    U,  # (M, N) up; unused when not GATED
    DX,  # (M, N) gradient of X, contiguous
    DU,  # (M, N) gradient of U, contiguous; unused when not GATED
    M,
    N,
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xn,
    stride_um,
    stride_un,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    a, d = _activation_and_grad(x.to(tl.float32), ACTIVATION, True)
    out = rows[:, None] * N + cols[None, :]
    if GATED:
        u = tl.load(U + rows[:, None] * stride_um + cols[None, :] * stride_un, mask=mask, other=0.0)
        tl.store(DX + out, (dy * u.to(tl.float32) * d).to(DX.dtype.element_ty), mask=mask)
        tl.store(DU + out, (dy * a).to(DU.dtype.element_ty), mask=mask)
    else:
        tl.store(DX + out, (dy * d).to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., N)`` -> ``(M, N)``: a view with the original strides whenever the leading dims
    merge into one row stride (always for halves of a GEMM output), else a copy."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def _blocks(M: int, N: int) -> tuple[int, int, int]:
    """A tile of about 4096 elements: wide along the row (coalesced), several rows when the
    row is short. 1024 columns keeps the masked tail small for Llama's 11008 (97.7% used)."""
    block_n = min(triton.next_power_of_2(N), 1024)
    block_m = min(max(1, 4096 // block_n), triton.next_power_of_2(M))
    num_warps = 1 if interpreting() else (8 if block_m * block_n >= 4096 else 4)
    return block_m, block_n, num_warps


def act_mul_forward(x: torch.Tensor, up: torch.Tensor | None, activation: str) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2 = _rows(x)
    u2 = _rows(up) if up is not None else x2
    M, N = x2.shape
    BLOCK_M, BLOCK_N, num_warps = _blocks(M, N)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _act_fwd[grid](
        x2, u2, y, M, N,
        x2.stride(0), x2.stride(1), u2.stride(0), u2.stride(1),
        ACTIVATION=activation, GATED=up is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps,
    )  # fmt: skip
    return y


def act_mul_backward(
    dy: torch.Tensor, x: torch.Tensor, up: torch.Tensor | None, activation: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    du = torch.empty(x.shape, dtype=x.dtype, device=x.device) if up is not None else None
    if x.numel() == 0:
        return dx, du
    dy2, x2 = _rows(dy), _rows(x)
    u2 = _rows(up) if up is not None else x2
    M, N = x2.shape
    BLOCK_M, BLOCK_N, num_warps = _blocks(M, N)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _act_bwd[grid](
        dy2, x2, u2, dx, du if du is not None else dx, M, N,
        dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), u2.stride(0), u2.stride(1),
        ACTIVATION=activation, GATED=up is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps,
    )  # fmt: skip
    return dx, du


# ----------------------------------------------------------------------------- custom ops
# Two ops (gated and not) because a custom op cannot return an optional tensor: the plain
# activation's backward returns one gradient, the gated one two.
@torch.library.custom_op("nnfast::activation_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, up: torch.Tensor | None, activation: str) -> torch.Tensor:
    return act_mul_forward(x, up, activation)


@_fwd_op.register_fake
def _(x, up, activation):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("nnfast::activation_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    return act_mul_backward(dy, x, None, activation)[0]


@_bwd_op.register_fake
def _(dy, x, activation):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("nnfast::activation_mul_bwd", mutates_args=())
def _mul_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, up: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return act_mul_backward(dy, x, up, activation)


@_mul_bwd_op.register_fake
def _(dy, x, up, activation):
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
    )


def _setup_context(ctx, inputs, output):
    x, up, activation = inputs
    # Saved are the inputs themselves (for SwiGLU: views of the one gate_up output), never
    # the activation: the backward recomputes it.
    ctx.save_for_backward(x, up)
    ctx.activation = activation


def _backward(ctx, dy):
    x, up = ctx.saved_tensors
    if up is None:
        return _bwd_op(dy, x, ctx.activation), None, None
    dx, du = _mul_bwd_op(dy, x, up, ctx.activation)
    return dx, du, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def act_mul(x: torch.Tensor, up: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``activation(x) * up`` (or ``activation(x)`` when ``up`` is None); inputs validated by
    ``nnfast.functional``."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() == 0:  # the launchers work on (M, N) rows: a 0-d tensor is one row of one
        return act_mul(x.reshape(1), None if up is None else up.reshape(1), activation)[0]
    return _fwd_op(x, up, activation)
