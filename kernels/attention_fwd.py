"""Flash attention forward kernel (one program per query block, looping over key blocks)
and its autotuning. The maths and the flags are described in ``attention.py``.

Two ways in and out of memory, one kernel (constexpr ``USE_TMA``): tensor descriptors built
on the device (Hopper's TMA: one bulk copy per tile, no address or mask arithmetic per
element, rows past the sequence's end read as zeros and never written), or pointers (other
GPUs, the interpreter, strides TMA cannot take). A descriptor is made per program with the
bounds of its own (batch, head) or packed sequence, so varlen needs no per-row masks."""

import triton
import triton.language as tl

from nnfast._backend import interpreting
from nnfast.kernels.attention_common import (
    _KEY,
    _configs,
    _dropout_keep,
    _prune_spilling,
    _scores,
    _seq,
    _span,
)


@triton.jit
def _load(ptrs, n_ok, d_ok, N_MASK: tl.constexpr, D_MASK: tl.constexpr):
    """A tile through pointers, bounds-masked only on the axes that need it."""
    if N_MASK and D_MASK:
        x = tl.load(ptrs, mask=n_ok & d_ok, other=0.0)
    elif N_MASK:
        x = tl.load(ptrs, mask=n_ok, other=0.0)
    elif D_MASK:
        x = tl.load(ptrs, mask=d_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _tile_desc(base, rows, stride, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """A (rows, HEAD_DIM) descriptor for (BLOCK_ROWS, BLOCK_D) tiles: TMA zero-fills reads
    past ``rows`` / ``HEAD_DIM`` and drops writes there."""
    return tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[stride, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_D])


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q,
    k_src, v_src,  # USE_TMA: descriptors; else K / V pointers at this (b, head)'s row 0
    mask_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    offs_m, offs_n0, offs_d,
    lo, hi, seqlen_q, seqlen_k, Lk, diag, wl, wr, scale_log2, cap2, dropout_p, seed, bh,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr, SCALE_NEG: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """Key blocks [lo, hi) (lo a multiple of BLOCK_N). MASKED: bounds / window masking of
    the scores (and of the pointer loads); off, every key of every block is in bounds and
    in the window of every row."""
    d_ok = offs_d < HEAD_DIM
    D_MASK: tl.constexpr = BLOCK_D != HEAD_DIM
    if not USE_TMA:  # advanced by one block per step: no per-step address recomputation
        k_ptrs = k_src + offs_d[:, None] * stride_kd + (lo + offs_n0)[None, :] * stride_kn
        v_ptrs = v_src + (lo + offs_n0)[:, None] * stride_vn + offs_d[None, :] * stride_vd
    # Base-2 scores without bounds, window, mask or cap: the scale (times log2 e) is folded
    # into the exponent's FMA, exp2(qk * scale_log2 - m), and into the row max (of qk, or
    # of -qk for a negative scale), so a score costs no separate multiply.
    FOLD: tl.constexpr = not (MASKED or HAS_MASK or HAS_SOFTCAP)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        if USE_TMA:
            kT = k_src.load([start_n, 0]).T  # (BLOCK_D, BLOCK_N)
        else:
            kT = _load(k_ptrs, (offs_n < seqlen_k)[None, :], d_ok[:, None], MASKED, D_MASK)
        qk = tl.dot(q, kT, input_precision=DOT_PREC)
        if FOLD:
            if SCALE_NEG:
                m_new = tl.maximum(m_i, tl.min(qk, 1) * scale_log2)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            # Finite scores: m_new is finite, so no -inf - -inf below.
            m_safe = m_new
            p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
        else:
            s = _scores(qk, offs_m[:, None], offs_n[None, :], mask_base, stride_mm, stride_mn,
                        seqlen_q, seqlen_k, diag, wl, wr, scale_log2, cap2, MASKED, HAS_LEFT,
                        HAS_RIGHT, HAS_SOFTCAP, HAS_MASK, MASK_IS_BOOL)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASKED or HAS_MASK:
                # A row with every score -inf so far: subtract 0 instead of -inf (no NaN).
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_safe = m_new
            p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer counts dropped entries too
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
            p = tl.where(keep, p, 0.0)
        if USE_TMA:
            v = v_src.load([start_n, 0])  # (BLOCK_N, BLOCK_D)
        else:
            v = _load(v_ptrs, (offs_n < seqlen_k)[:, None], d_ok[None, :], MASKED, D_MASK)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seed"])
def _attn_fwd(
    Q,  # (B, Hq, Lq, D); varlen: (1, Hq, total_q, D) with stride_qb = 0
    K,  # (B, Hk, Lk, D); varlen: (1, Hk, total_k, D) with stride_kb = 0
    V,  # like K
    Mask,  # broadcast view (B, Hq, Lq, Lk), bool as uint8 or float; unused without HAS_MASK
    Out,  # like Q
    LSE,  # fp32, base 2, element (b, h, i) at b * stride_lb + h * stride_lh + q0 + i
    CuQ, CuK,  # varlen: int32 (B + 1,) cumulative sequence lengths; unused otherwise
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh,
    Hq, Lq, Lk,  # varlen: the largest sequence lengths
    GROUP,  # Hq // Hk
    scale_log2,  # scale * log2(e)
    cap2,  # softcap * log2(e)
    bottom_right,  # 1: causal/window diagonal at i + Lk - Lq (per sequence), 0: at i
    wl, wr,  # window sizes (0 where unbounded)
    dropout_p,
    seed,
    lq_bucket, lk_bucket,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr,  # Q/K/V/Out through TMA descriptors (unit last stride, 16 B rows)
    SCALE_NEG: tl.constexpr,  # scale < 0: the row max of scale * qk is scale * min(qk)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WARP_SPEC: tl.constexpr = False,  # warp-specialised key loop (autotune option)
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    q0, seqlen_q, k0, seqlen_k = _seq(CuQ, CuK, b, Lq, Lk, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:  # varlen: the grid covers the longest sequence
        return
    diag = bottom_right * (seqlen_k - seqlen_q)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen_q
    q_base = Q + b * stride_qb + h * stride_qh + q0 * stride_qm
    k_base = K + b * stride_kb + hk * stride_kh + k0 * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + k0 * stride_vn
    o_base = Out + b * stride_ob + h * stride_oh + q0 * stride_om
    if USE_TMA:
        q = _tile_desc(q_base, seqlen_q, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D).load([start_m, 0])
        k_src = _tile_desc(k_base, seqlen_k, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_src = _tile_desc(v_base, seqlen_k, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D)
    else:
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_src = k_base
        v_src = v_base
    mask_base = Mask + b * stride_mb + h * stride_mh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Key blocks outside [lo, hi) are never visited (window / causal skipping); inside
    # [mid_lo, mid_hi) every key is in bounds and in the window of every row (no masking).
    lo, mid_lo, mid_hi, hi = _span(start_m, seqlen_k, diag - wl, diag + wr,
                                   HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    if HAS_LEFT:  # the left edge of the window
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, k_src, v_src, mask_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            offs_m, offs_n0, offs_d, lo, mid_lo, seqlen_q, seqlen_k, Lk, diag, wl, wr,
            scale_log2, cap2, dropout_p, seed, bh, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
            HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
            USE_TMA, SCALE_NEG, False)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_src, v_src, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_n0, offs_d, mid_lo, mid_hi, seqlen_q, seqlen_k, Lk, diag, wl, wr,
        scale_log2, cap2, dropout_p, seed, bh, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
        HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
        USE_TMA, SCALE_NEG, WARP_SPEC)
    # The diagonal / right edge of the window and the tail, with bounds masking.
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_src, v_src, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_n0, offs_d, mid_hi, hi, seqlen_q, seqlen_k, Lk, diag, wl, wr,
        scale_log2, cap2, dropout_p, seed, bh, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
        HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
        USE_TMA, SCALE_NEG, False)
    empty = l_i == 0.0  # fully masked row: zero output, lse2 = +inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    out = out.to(Out.dtype.element_ty)
    if USE_TMA:
        _tile_desc(o_base, seqlen_q, stride_om, HEAD_DIM, BLOCK_M, BLOCK_D).store([start_m, 0],
                                                                                   out)
    else:
        tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, out,
                 mask=m_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + b * stride_lb + h * stride_lh + q0 + offs_m, lse, mask=m_ok)


# ----------------------------------------------------------------------------- autotuning
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Configs too big for shared memory at large head
# dims fail to compile and are dropped by the autotuner.
_FWD = _configs([(32, 16, 4, 1)] if interpreting() else [
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4),
    (64, 32, 4, 2), (16, 128, 4, 3), (16, 64, 4, 2)])


def _prune_fwd(configs, named_args, **kwargs):
    # Decoding (a handful of queries) wastes most of a 64/128-row block: BLOCK_M = 16 configs
    # are for short query lengths only, and only they are tried there.
    lq = named_args.get("lq_bucket", kwargs.get("lq_bucket"))
    if lq is None:
        return configs
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == (lq <= 16)]
    return _prune_spilling(kept, named_args, **kwargs) or configs


# The memory path is part of the key: TMA and pointer loads may favour different tiles.
_fwd_kernel = triton.autotune(_FWD, key=[*_KEY, "USE_TMA"],
                              prune_configs_by={"early_config_prune": _prune_fwd})(_attn_fwd)
