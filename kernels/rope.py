"""Rotary position embedding (RoPE): q and k rotated in one launch, forward and backward.

Layout: q ``(B, H, T, D)``, k ``(B, Hk, T, D)``, any strides (slices of a fused qkv
projection work without a copy); ``cos``/``sin`` float32 ``(max_seq_len, R/2)`` with
``R = rotary_dim``. One launch for q and k: a program takes ``BLOCK_T`` tokens of one
sequence and a group of ``HEADS`` heads (of q or of k); it reads the tokens' cos/sin rows
once and rotates a (BLOCK_T, R/2) tile per head. Channels ``R..D`` are copied through.

Backward. Per pair the forward is ``y = M(a) x`` with the rotation
``M(a) = [[cos a, -sin a], [sin a, cos a]]``, so ``dx = M(a)^T dy = M(-a) dy``: the same
kernel with ``sin`` negated (``INVERSE``). The pass-through channels' gradient is ``dy``.
cos/sin get no gradient (they are fixed tables).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nnfast._backend import interpreting


@triton.jit
def _rotate_heads(
    x_ptr,  # this batch element's input, (H, T, D) with strides (sxh, sxt, sxd)
    y_ptr,  # the same for the output
    h_start,  # heads h_start .. h_end - 1 are this program's
    h_end,
    sxh,
    sxt,
    sxd,
    syh,
    syt,
    syd,
    t,  # (BLOCK_T, 1) int64 token indices
    t_ok,  # (BLOCK_T, 1) t < T
    c,  # (BLOCK_T, BLOCK_R) fp32 cos of the tokens' angles
    s,  # (BLOCK_T, BLOCK_R) fp32 sin (negated for the backward)
    HALF: tl.constexpr,  # R / 2
    PASS: tl.constexpr,  # D - R, channels copied through
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    r = tl.arange(0, BLOCK_R)[None, :]  # (1, BLOCK_R) pair index
    m = t_ok & (r < HALF)
    if INTERLEAVED:
        # Pair (2i, 2i + 1): load whole (BLOCK_T, 2 * BLOCK_R) rows and split them in
        # registers, so the loads stay contiguous and vectorized (two stride-2 loads would
        # be scalar).
        d = tl.arange(0, 2 * BLOCK_R)[None, :]  # (1, 2 * BLOCK_R)
        m2 = t_ok & (d < 2 * HALF)
        x_off = t * sxt + d * sxd  # (BLOCK_T, 2 * BLOCK_R)
        y_off = t * syt + d * syd
    else:
        # Pair (i, i + R/2): two contiguous half-rows.
        x1_off = t * sxt + r * sxd  # (BLOCK_T, BLOCK_R), the same for every head
        x2_off = x1_off + HALF * sxd
        y1_off = t * syt + r * syd
        y2_off = y1_off + HALF * syd
    p = 2 * HALF + tl.arange(0, BLOCK_P)[None, :]  # (1, BLOCK_P) pass-through channels
    mp = t_ok & (p < 2 * HALF + PASS)
    xh = x_ptr + h_start.to(tl.int64) * sxh  # 64-bit: heads * strides may pass 2^31
    yh = y_ptr + h_start.to(tl.int64) * syh
    for _ in range(h_start, h_end):
        if INTERLEAVED:
            x = tl.load(xh + x_off, mask=m2, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_R, 2)))  # (BLOCK_T, BLOCK_R) each
            y = tl.reshape(tl.join(x1 * c - x2 * s, x2 * c + x1 * s), (BLOCK_T, 2 * BLOCK_R))
            tl.store(yh + y_off, y.to(y_ptr.dtype.element_ty), mask=m2)
        else:
            x1 = tl.load(xh + x1_off, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(xh + x2_off, mask=m, other=0.0).to(tl.float32)
            tl.store(yh + y1_off, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=m)
            tl.store(yh + y2_off, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=m)
        if PASS > 0:
            xp = tl.load(xh + t * sxt + p * sxd, mask=mp, other=0.0)
            tl.store(yh + t * syt + p * syd, xp, mask=mp)
        xh += sxh
        yh += syh


@triton.jit
def _rope_kernel(
    q_ptr,  # (B, H, T, D) any strides
    k_ptr,  # (B, Hk, T, D) any strides
    qo_ptr,  # (B, H, T, D) output
    ko_ptr,  # (B, Hk, T, D) output
    cos_ptr,  # (max_seq_len, R/2) fp32, rows contiguous
    sin_ptr,  # (max_seq_len, R/2) fp32, same strides as cos
    pos_ptr,  # (B, T) int positions (batch stride 0 for a (T,) tensor); unused without HAS_POS
    T,
    H,
    HK,
    offset,  # position of token 0 when there are no position ids
    max_seq_len,
    stride_cs,  # row stride of cos/sin
    stride_pb,
    stride_pt,
    sqb, sqh, sqt, sqd,  # q's strides (B, H, T, D)
    skb, skh, skt, skd,  # k's
    sqob, sqoh, sqot, sqod,  # q output's
    skob, skoh, skot, skod,  # k output's
    HALF: tl.constexpr,
    PASS: tl.constexpr,
    HEADS: tl.constexpr,  # heads per program
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    INVERSE: tl.constexpr,  # rotate by -theta (the backward)
    HAS_POS: tl.constexpr,
):
    # Axis 0: (batch, block of BLOCK_T tokens); axis 1: a group of HEADS heads, q's groups
    # first, then k's. The tokens' cos/sin tile is read once and serves every head.
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_tb = tl.cdiv(T, BLOCK_T)
    b = (pid_t // n_tb).to(tl.int64)
    t = ((pid_t % n_tb) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]).to(tl.int64)  # (BLOCK_T, 1)
    t_ok = t < T
    if HAS_POS:
        pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt, mask=t_ok, other=0).to(tl.int64)
    else:
        pos = offset + t
    # An out-of-range position id (not checked on the host: that would need a device sync)
    # yields NaN instead of an out-of-bounds read.
    valid = (pos >= 0) & (pos < max_seq_len)
    row = tl.where(valid, pos, 0) * stride_cs
    r = tl.arange(0, BLOCK_R)[None, :]
    c = tl.load(cos_ptr + row + r, mask=t_ok & (r < HALF), other=0.0)
    s = tl.load(sin_ptr + row + r, mask=t_ok & (r < HALF), other=0.0)
    c = tl.where(valid, c, float("nan"))
    s = tl.where(valid, s, float("nan"))
    if INVERSE:
        s = -s
    n_qg = tl.cdiv(H, HEADS)
    if pid_h < n_qg:
        h0 = pid_h * HEADS
        _rotate_heads(
            q_ptr + b * sqb, qo_ptr + b * sqob, h0, tl.minimum(h0 + HEADS, H),
            sqh, sqt, sqd, sqoh, sqot, sqod, t, t_ok, c, s,
            HALF, PASS, BLOCK_T, BLOCK_R, BLOCK_P, INTERLEAVED,
        )
    else:
        h0 = (pid_h - n_qg) * HEADS
        _rotate_heads(
            k_ptr + b * skb, ko_ptr + b * skob, h0, tl.minimum(h0 + HEADS, HK),
            skh, skt, skd, skoh, skot, skod, t, t_ok, c, s,
            HALF, PASS, BLOCK_T, BLOCK_R, BLOCK_P, INTERLEAVED,
        )


def _out_like(x: torch.Tensor) -> torch.Tensor:
    # empty_like keeps x's strides when x is dense (e.g. a transposed (B, T, H, D) buffer) and
    # falls back to contiguous for gapped views such as slices of a fused qkv tensor.
    return torch.empty_like(x)


def _launch(q, k, cos, sin, position_ids, offset: int, interleaved: bool, inverse: bool):
    B, H, T, D = q.shape
    HK = k.shape[1]
    half = cos.shape[1]
    cos = cos.contiguous()
    sin = sin.contiguous()
    qo, ko = _out_like(q), _out_like(k)
    if B * T == 0 or H + HK == 0:
        return qo, ko
    if position_ids is None:
        pos, spb, spt = cos, 0, 0  # a dummy pointer, never read
    else:
        pos = position_ids
        spb, spt = (0, pos.stride(0)) if pos.dim() == 1 else (pos.stride(0), pos.stride(1))
    block_r = triton.next_power_of_2(half)
    block_p = triton.next_power_of_2(max(D - 2 * half, 1))
    # A (BLOCK_T, BLOCK_R) tile of ~2K elements per half-rotation (32 tokens at head dim 128):
    # enough bytes in flight per load for 4 warps, registers to spare. HEADS=4 keeps
    # B * T/32 * (H + Hk)/4 programs (4096 at Llama-7B training shapes) for the SMs.
    block_t = min(triton.next_power_of_2(T), max(1, 2048 // block_r))
    heads = 4
    tile = block_t * block_r
    num_warps = 4 if tile >= 1024 else (2 if tile >= 256 else 1)
    grid = (B * triton.cdiv(T, block_t), triton.cdiv(H, heads) + triton.cdiv(HK, heads))
    _rope_kernel[grid](
        q, k, qo, ko, cos, sin, pos,
        T, H, HK, offset, cos.shape[0], cos.stride(0), spb, spt,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(),
        HALF=half, PASS=D - 2 * half, HEADS=heads,
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_P=block_p,
        INTERLEAVED=interleaved, INVERSE=inverse, HAS_POS=position_ids is not None,
        num_warps=1 if interpreting() else num_warps,
    )
    return qo, ko


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("nnfast::rope_fwd", mutates_args=())
def rope_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    offset: int,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, cos, sin, position_ids, offset, interleaved, inverse=False)


@torch.library.custom_op("nnfast::rope_bwd", mutates_args=())
def rope_bwd(
    dq: torch.Tensor,
    dk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    offset: int,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(dq, dk, cos, sin, position_ids, offset, interleaved, inverse=True)


@rope_fwd.register_fake
def _(q, k, cos, sin, position_ids, offset, interleaved):
    return _out_like(q), _out_like(k)


@rope_bwd.register_fake
def _(dq, dk, cos, sin, position_ids, offset, interleaved):
    return _out_like(dq), _out_like(dk)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, position_ids, offset, interleaved = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.offset, ctx.interleaved = offset, interleaved


def _fwd_backward(ctx, dqo, dko):
    cos, sin, position_ids = ctx.saved_tensors
    dq, dk = rope_bwd(dqo, dko, cos, sin, position_ids, ctx.offset, ctx.interleaved)
    return dq, dk, None, None, None, None, None


def _bwd_backward(ctx, ddq, ddk):
    # The backward is linear in (dq, dk) with the inverse rotation: its own backward is the
    # forward rotation (double backward).
    cos, sin, position_ids = ctx.saved_tensors
    gq, gk = rope_fwd(ddq, ddk, cos, sin, position_ids, ctx.offset, ctx.interleaved)
    return gq, gk, None, None, None, None, None


rope_fwd.register_autograd(_fwd_backward, setup_context=_setup_context)
rope_bwd.register_autograd(_bwd_backward, setup_context=_setup_context)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    offset: int,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry point called by ``nnfast.functional.apply_rotary`` (inputs already checked)."""
    return rope_fwd(q, k, cos, sin, position_ids, offset, interleaved)
