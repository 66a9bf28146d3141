"""Flash attention forward kernel (one program per query block, looping over key blocks)
and its autotuning. The maths and the flags are described in ``attention.py``."""

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
def _fwd_inner(
    acc, m_i, l_i, q,
    k_base, v_base, mask_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    offs_m, offs_n0, offs_d, d_ok,
    lo, hi, seqlen_q, seqlen_k, Lk, diag, wl, wr, scale_log2, cap2, dropout_p, seed, bh,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < seqlen_k
        kT = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = _scores(tl.dot(q, kT, input_precision=DOT_PREC), offs_m[:, None], offs_n[None, :],
                    mask_base, stride_mm, stride_mn, seqlen_q, seqlen_k, diag, wl, wr,
                    scale_log2, cap2, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_MASK,
                    MASK_IS_BOOL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with every score -inf so far: subtract 0 instead of -inf (no inf - inf NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer counts dropped entries too
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
            p = tl.where(keep, p, 0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh + k0 * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + k0 * stride_vn
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
            acc, m_i, l_i, q, k_base, v_base, mask_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            offs_m, offs_n0, offs_d, d_ok, lo, mid_lo, seqlen_q, seqlen_k, Lk, diag, wl, wr,
            scale_log2, cap2, dropout_p, seed, bh, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
            HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, BLOCK_N, DOT_PREC)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_n0, offs_d, d_ok, mid_lo, mid_hi, seqlen_q, seqlen_k, Lk, diag, wl, wr,
        scale_log2, cap2, dropout_p, seed, bh, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
        HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, BLOCK_N, DOT_PREC)
    # The diagonal / right edge of the window and the tail, with bounds masking.
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_n0, offs_d, d_ok, mid_hi, hi, seqlen_q, seqlen_k, Lk, diag, wl, wr,
        scale_log2, cap2, dropout_p, seed, bh, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
        HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, BLOCK_N, DOT_PREC)
    empty = l_i == 0.0  # fully masked row: zero output, lse2 = +inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    tl.store(Out + b * stride_ob + h * stride_oh + (q0 + offs_m[:, None]) * stride_om
             + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
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


_fwd_kernel = triton.autotune(_FWD, key=_KEY,
                              prune_configs_by={"early_config_prune": _prune_fwd})(_attn_fwd)
