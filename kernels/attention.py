"""Fused (flash) scaled dot-product attention: forward and backward in Triton.

Layout (B, H, L, D); q has Hq heads, k/v have Hk (GQA: q head h reads kv head
h // (Hq // Hk), never repeated in memory). One kernel family; the variants are constexpr
flags: HAS_RIGHT / HAS_LEFT (key j takes part only if j <= i + diag + wr, resp.
j >= i + diag - wl: causal is HAS_RIGHT with wr = 0, sliding windows set either side; the
diagonal ``diag`` is 0, top-left, or Lk - Lq, bottom-right), HAS_SOFTCAP (scores
``softcap * tanh(s / softcap)``, Gemma 2), IS_VARLEN (packed sequences: q (total_q, Hq, D),
k/v (total_k, Hk, D) seen as (1, H, total, D) with a zero batch stride; program (m, b, h)
reads sequence b's bounds from int32 ``cu_seqlens`` and exits at once past its end),
HAS_MASK + MASK_IS_BOOL (a bool or additive float mask read through broadcast strides,
stride 0 on broadcast dims), HAS_DROPOUT (philox `tl.rand`, regenerated in the backward),
STORE_DS (dS for dbias).

Key blocks outside a query block's window are never visited (loop bounds from ``_span``),
and, symmetrically, query blocks outside a key block's window in the dK/dV pass.

Forward (per query block, looping over key blocks): online softmax in fp32 in base 2,
with the softmax scale folded into ``scale * log2(e)`` so each score costs one multiply and
one ``exp2``. Blocks outside the window (above the causal diagonal) are skipped; blocks
fully in bounds and inside the window run without any score masking, the edges with it.
The base-2 log-sum-exp of each row, ``lse2 = log2(sum_j 2^(s2_ij))`` with
``s2 = log2(e) * (scale * q.k + bias)``, is kept (B, Hq, Lq) fp32 for the backward; a fully
masked row stores ``+inf`` so that the backward's ``p = 2^(s2 - lse2)`` is exactly 0 there.

Backward. With P = softmax(S), dropout keep mask Z and r = 1 / (1 - p_drop):
    O = (P * Z * r) V,  dV = (P * Z * r)^T dO,  dP = (dO V^T) * Z * r,
    dS = P * (dP - delta)  with  delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id,
    dQ = scale * dS K,  dK = scale * dS^T Q,  dBias = dS (summed to the mask's shape).
With softcap, S = c * tanh(scale * q.k / c) + bias and dQ, dK take dS * (1 - tanh^2).
dK/dV: one program per key block, looping over the q heads of its GQA group and over query
blocks; dQ (and dS) in a separate pass per query block looping over key blocks. Every
gradient element is written by exactly one program: no atomics, bitwise deterministic.
dBias (a float mask that requires grad, e.g. T5's learned bias): the dQ pass writes the full
(B, Hq, Lq, Lk) fp32 dS -- 4 bytes per score, the N x N memory flash attention otherwise
avoids, paid only then -- and torch sums it down to the mask's broadcast shape.

Dropout: keep = philox(seed, b, h, i, j) >= p, the same formula in the forward, both backward
passes and ``dropout_mask`` (which tests hand to the reference); varlen uses the sequence
index for b and local i, j, with the longest key length as the row stride, so
``dropout_mask(seed, n_seqs, Hq, max_seqlen_q, max_seqlen_k, p)[b, :, :Lq_b, :Lk_b]`` is
sequence b's mask. The seed is drawn from
torch's CPU generator, so ``torch.manual_seed`` makes a run reproducible.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from nnfast._backend import interpreting, warn_once

LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _dropout_keep(seed, bh, qi, kj, Lk, dropout_p):
    # Philox key = (seed, b * Hq + h), counter = i * Lk + j: a unique (key, counter) per
    # (b, h, i, j) with 32-bit counters (``attention`` checks Lq * Lk < 2^31).
    key = seed.to(tl.int64) + (bh.to(tl.int64) << 32)
    return tl.rand(key, qi * Lk + kj) >= dropout_p


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^2x + 1): saturates to +-1 for large |x| (exp2 overflow to inf gives 1).
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _softcap_dt(qk, scale_log2, cap2):
    """d(softcapped score) / d(scale * q.k) = 1 - tanh^2, recomputed in the backward."""
    t = _tanh(qk * scale_log2 / cap2)
    return 1.0 - t * t


@triton.jit
def _scores(
    qk,  # (rows, cols) fp32: q . k for the tile, either orientation
    qi,  # query indices broadcastable to qk's shape
    kj,  # key indices broadcastable to qk's shape
    mask_base,  # attn_mask pointer already offset to this (b, h)
    stride_mm,
    stride_mn,
    Lq,  # this sequence's query length
    Lk,  # this sequence's key length
    diag,  # query i lines up with key i + diag (0 top-left, Lk - Lq bottom-right)
    wl,  # keys at most wl before the diagonal (HAS_LEFT)
    wr,  # keys at most wr after the diagonal (HAS_RIGHT; causal is wr = 0)
    scale_log2,
    cap2,  # softcap * log2(e) (HAS_SOFTCAP)
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
):
    """Scores in base 2 (log2(e) * (softcap(scale * qk) + bias)), -inf where a key does not
    take part. Soft-capping comes before the bias, as in Gemma 2."""
    s = qk * scale_log2
    if HAS_SOFTCAP:
        s = cap2 * _tanh(s / cap2)
    if HAS_MASK:
        ptrs = mask_base + qi * stride_mm + kj * stride_mn
        inb = (qi < Lq) & (kj < Lk)
        if MASK_IS_BOOL:
            s = tl.where(tl.load(ptrs, mask=inb, other=0) != 0, s, float("-inf"))
        else:
            s += tl.load(ptrs, mask=inb, other=0.0).to(tl.float32) * 1.4426950408889634
    if MASKED:
        ok = kj < Lk
        if HAS_RIGHT:
            ok = ok & (kj <= qi + diag + wr)
        if HAS_LEFT:
            ok = ok & (kj >= qi + diag - wl)
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def _seq(CuQ, CuK, b, Lq, Lk, IS_VARLEN: tl.constexpr):
    """(first query row, query length, first key row, key length) of sequence/batch b."""
    if IS_VARLEN:
        q0 = tl.load(CuQ + b)
        k0 = tl.load(CuK + b)
        seqlen_q = tl.load(CuQ + b + 1) - q0
        seqlen_k = tl.load(CuK + b + 1) - k0
        q0 = q0.to(tl.int64)
        k0 = k0.to(tl.int64)
    else:
        q0 = 0
        k0 = 0
        seqlen_q = Lq
        seqlen_k = Lk
    return q0, seqlen_q, k0, seqlen_k


@triton.jit
def _span(start, n_other, lo_off, hi_off,
          HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
          BLOCK_SELF: tl.constexpr, BLOCK_OTHER: tl.constexpr):
    """Loop bounds over the other axis for a block [start, start + BLOCK_SELF) whose index x
    pairs with y in [x + lo_off, x + hi_off] (each side only if HAS_LO / HAS_HI) and
    [0, n_other): (lo, mid_lo, mid_hi, hi). Blocks outside [lo, hi) are skipped; inside
    [mid_lo, mid_hi) every pair takes part, so no score needs masking there."""
    lo = 0
    mid_lo = 0
    hi = n_other
    mid_hi = (n_other // BLOCK_OTHER) * BLOCK_OTHER
    if HAS_LO:
        lo = (tl.maximum(start + lo_off, 0) // BLOCK_OTHER) * BLOCK_OTHER
        mid_lo = tl.cdiv(tl.maximum(start + BLOCK_SELF - 1 + lo_off, 0), BLOCK_OTHER) \
            * BLOCK_OTHER
    if HAS_HI:
        hi = tl.minimum(n_other, tl.maximum(start + BLOCK_SELF + hi_off, 0))
        mid_hi = (tl.minimum(n_other, tl.maximum(start + hi_off + 1, 0)) // BLOCK_OTHER) \
            * BLOCK_OTHER
    hi = tl.maximum(hi, lo)
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


# ----------------------------------------------------------------------------- forward
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


# ----------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_delta(
    Out,  # (B, Hq, Lq, D)
    DO,  # (B, Hq, Lq, D)
    Delta,  # (B, Hq, Lq) fp32
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    Hq, Lq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm
                 + offs_d[None, :] * stride_gd, mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v,
    q_base, do_base, lse_base, delta_base, mask_base,
    stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn,
    offs_n, offs_m0, offs_d, d_ok,
    lo, hi, seqlen_q, seqlen_k, Lk, diag, wl, wr, scale_log2, cap2, dropout_p, seed, bh,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Tiles are transposed, (BLOCK_N keys, BLOCK_M queries). Rows past seqlen_q load
    # lse = +inf and dO = 0, so their P and dS are exactly 0; key rows past seqlen_k are
    # never stored.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < seqlen_q
        qT = tl.load(q_base + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qm,
                     mask=d_ok[:, None] & m_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_M)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        qkT = tl.dot(k, qT, input_precision=DOT_PREC)
        sT = _scores(qkT, offs_m[None, :], offs_n[:, None], mask_base, stride_mm, stride_mn,
                     seqlen_q, seqlen_k, diag, wl, wr, scale_log2, cap2, MASKED, HAS_LEFT,
                     HAS_RIGHT, HAS_SOFTCAP, HAS_MASK, MASK_IS_BOOL)
        pT = tl.math.exp2(sT - lse[None, :])  # (BLOCK_N, BLOCK_M)
        do = tl.load(do_base + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], Lk, dropout_p)
            r = 1.0 / (1.0 - dropout_p)
            pdT = tl.where(keep, pT * r, 0.0)
            dpT = tl.where(keep, dpT * r, 0.0)
        else:
            pdT = pT
        dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * _softcap_dt(qkT, scale_log2, cap2)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv(
    Q,  # (B, Hq, Lq, D); varlen as in _attn_fwd
    K,  # (B, Hk, Lk, D)
    V,  # (B, Hk, Lk, D)
    Mask,  # broadcast view (B, Hq, Lq, Lk)
    DO,  # like Q
    LSE,  # fp32, as in _attn_fwd
    Delta,  # fp32, like LSE
    DK,  # like K
    DV,  # like V
    CuQ, CuK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh,
    Hq, Hk, Lq, Lk, GROUP, scale, scale_log2, cap2, bottom_right, wl, wr, dropout_p, seed,
    lq_bucket, lk_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // Hk).to(tl.int64)
    hk = (bhk % Hk).to(tl.int64)
    q0, seqlen_q, k0, seqlen_k = _seq(CuQ, CuK, b, Lq, Lk, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    diag = bottom_right * (seqlen_k - seqlen_q)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_ok = (offs_n < seqlen_k)[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + (k0 + offs_n[:, None]) * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * stride_vb + hk * stride_vh + (k0 + offs_n[:, None]) * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query row i sees key j iff j - diag - wr <= i (HAS_RIGHT) and i <= j - diag + wl
    # (HAS_LEFT): the query blocks outside are skipped.
    lo, mid_lo, mid_hi, hi = _span(start_n, seqlen_q, -diag - wr, wl - diag,
                                   HAS_RIGHT, HAS_LEFT, BLOCK_N, BLOCK_M)
    if not HAS_LEFT:  # query rows past seqlen_q read lse = +inf: the tail needs no mask
        mid_hi = hi
    for g in range(GROUP):  # the q heads sharing this kv head, in a fixed order
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + b * stride_qb + h * stride_qh + q0 * stride_qm
        do_base = DO + b * stride_gb + h * stride_gh + q0 * stride_gm
        mask_base = Mask + b * stride_mb + h * stride_mh
        lse_base = LSE + b * stride_lb + h * stride_lh + q0
        delta_base = Delta + b * stride_lb + h * stride_lh + q0
        if HAS_RIGHT:  # the diagonal (causal) / right edge of the window
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base,
                stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn,
                offs_n, offs_m0, offs_d, d_ok, lo, mid_lo, seqlen_q, seqlen_k, Lk, diag, wl,
                wr, scale_log2, cap2, dropout_p, seed, bh, True, HAS_LEFT, HAS_RIGHT,
                HAS_SOFTCAP, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, BLOCK_M, DOT_PREC)
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base,
            stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn,
            offs_n, offs_m0, offs_d, d_ok, mid_lo, mid_hi, seqlen_q, seqlen_k, Lk, diag, wl,
            wr, scale_log2, cap2, dropout_p, seed, bh, False, HAS_LEFT, HAS_RIGHT,
            HAS_SOFTCAP, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, BLOCK_M, DOT_PREC)
        if HAS_LEFT:  # the left edge of the window
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base,
                stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn,
                offs_n, offs_m0, offs_d, d_ok, mid_hi, hi, seqlen_q, seqlen_k, Lk, diag, wl,
                wr, scale_log2, cap2, dropout_p, seed, bh, True, HAS_LEFT, HAS_RIGHT,
                HAS_SOFTCAP, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, BLOCK_M, DOT_PREC)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + (k0 + offs_n[:, None]) * stride_dkn
             + offs_d[None, :] * stride_dkd, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + (k0 + offs_n[:, None]) * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta,
    k_base, v_base, mask_base, ds_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    offs_m, offs_n0, offs_d, d_ok,
    lo, hi, seqlen_q, seqlen_k, Lk, diag, wl, wr, scale_log2, cap2, dropout_p, seed, bh,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_DS: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < seqlen_k
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s = _scores(qk, offs_m[:, None], offs_n[None, :], mask_base, stride_mm, stride_mn,
                    seqlen_q, seqlen_k, diag, wl, wr, scale_log2, cap2, MASKED, HAS_LEFT,
                    HAS_RIGHT, HAS_SOFTCAP, HAS_MASK, MASK_IS_BOOL)
        p = tl.math.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if STORE_DS:
            tl.store(ds_base + offs_m[:, None].to(tl.int64) * Lk + offs_n[None, :], ds,
                     mask=(offs_m < seqlen_q)[:, None] & n_ok[None, :])
        if HAS_SOFTCAP:
            ds = ds * _softcap_dt(qk, scale_log2, cap2)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq(
    Q,  # (B, Hq, Lq, D); varlen as in _attn_fwd
    K,  # (B, Hk, Lk, D)
    V,  # (B, Hk, Lk, D)
    Mask,  # broadcast view (B, Hq, Lq, Lk)
    DO,  # like Q
    LSE,  # fp32, as in _attn_fwd
    Delta,  # fp32, like LSE
    DQ,  # like Q
    DS,  # (B, Hq, Lq, Lk) fp32 contiguous, zero-filled; only with STORE_DS
    CuQ, CuK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh,
    Hq, Lq, Lk, GROUP, scale, scale_log2, cap2, bottom_right, wl, wr, dropout_p, seed,
    lq_bucket, lk_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, STORE_DS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    q0, seqlen_q, k0, seqlen_k = _seq(CuQ, CuK, b, Lq, Lk, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    diag = bottom_right * (seqlen_k - seqlen_q)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen_q
    qd_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + (q0 + offs_m[:, None]) * stride_qm
                + offs_d[None, :] * stride_qd, mask=qd_ok, other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + (q0 + offs_m[:, None]) * stride_gm
                 + offs_d[None, :] * stride_gd, mask=qd_ok, other=0.0)
    lse_off = b * stride_lb + h * stride_lh + q0
    lse = tl.load(LSE + lse_off + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + lse_off + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh + k0 * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + k0 * stride_vn
    mask_base = Mask + b * stride_mb + h * stride_mh
    ds_base = DS + bh.to(tl.int64) * Lq * Lk
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _span(start_m, seqlen_k, diag - wl, diag + wr,
                                   HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    if HAS_LEFT:
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, mask_base, ds_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            offs_m, offs_n0, offs_d, d_ok, lo, mid_lo, seqlen_q, seqlen_k, Lk, diag, wl, wr,
            scale_log2, cap2, dropout_p, seed, bh, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
            HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, STORE_DS, BLOCK_N, DOT_PREC)
    dq = _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, mask_base, ds_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_n0, offs_d, d_ok, mid_lo, mid_hi, seqlen_q, seqlen_k, Lk, diag, wl, wr,
        scale_log2, cap2, dropout_p, seed, bh, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
        HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, STORE_DS, BLOCK_N, DOT_PREC)
    dq = _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, mask_base, ds_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_n0, offs_d, d_ok, mid_hi, hi, seqlen_q, seqlen_k, Lk, diag, wl, wr,
        scale_log2, cap2, dropout_p, seed, bh, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
        HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, STORE_DS, BLOCK_N, DOT_PREC)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + (q0 + offs_m[:, None]) * stride_dqm
             + offs_d[None, :] * stride_dqd, (dq * scale).to(DQ.dtype.element_ty), mask=qd_ok)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(
    Out,  # (B, Hq, Lq, Lk) int8, 1 = kept
    Lq, Lk, seed, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
    tl.store(Out + bh.to(tl.int64) * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :],
             keep.to(tl.int8), mask=(offs_m < Lq)[:, None] & (offs_n < Lk)[None, :])


# ----------------------------------------------------------------------------- launchers
def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    # Under the interpreter one small config keeps CPU tests fast (autotuning would run every
    # candidate); BLOCK_M != BLOCK_N there on purpose, to exercise the causal block logic.
    if interpreting():
        shapes = shapes[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


_KEY = ["lq_bucket", "lk_bucket", "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "IS_VARLEN",
        "HAS_MASK", "HAS_DROPOUT"]
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Configs too big for shared memory at large head
# dims fail to compile and are dropped by the autotuner.
_FWD = _configs([(32, 16, 4, 1)] if interpreting() else [
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4),
    (64, 32, 4, 2), (16, 128, 4, 3), (16, 64, 4, 2)])


# dK/dV configs that spill registers on sm_90 (scripts/compile_check.py, Triton 3.6 and 3.9,
# fp16, non-causal, spill = ptxas' stack frame), by head-dim class (BLOCK_D > 64: "wide"):
# the autotuner never times them. (BLOCK_M, BLOCK_N, num_warps). The forward's and dQ's
# are pruned by _prune_spilling.
_SPILLS = {
    ("dkdv", False): {(32, 128, 4)},  # 72-128 B at D=64
    ("dkdv", True): {(32, 128, 4), (64, 128, 8), (64, 64, 4)},  # 984 / 48 / 176 B, D=128
}


def _spill_free(kind: str):
    """An early_config_prune dropping the configs of ``_SPILLS`` for this head dim (all of
    them kept if nothing would be left, e.g. on other GPUs the table does not describe)."""
    def prune(configs, named_args, **kwargs):
        wide = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64)) > 64
        bad = _SPILLS.get((kind, wide), set())
        kept = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) not in bad]
        return kept or configs
    return prune


def _prune_fwd(configs, named_args, **kwargs):
    # Decoding (a handful of queries) wastes most of a 64/128-row block: BLOCK_M = 16 configs
    # are for short query lengths only, and only they are tried there.
    lq = named_args.get("lq_bucket", kwargs.get("lq_bucket"))
    if lq is None:
        return configs
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == (lq <= 16)]
    return _prune_spilling(kept, named_args, **kwargs) or configs


def _prune_spilling(configs, named_args, **kwargs):
    # Head dim >= 128: 128-row tiles on 4 warps spill registers on sm_90 (ptxas, bf16: fwd
    # 440 B causal, 648 B window + softcap at 128 x 64; dQ 16-92 B at 128 x 32); their
    # 8-warp twins do not.
    if named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM", 0)) < 128:
        return configs
    kept = [c for c in configs if not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4)]
    return kept or configs


_DKDV = _configs([(16, 32, 4, 1)] if interpreting() else [
    (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 2)])
_DQ = _configs([(32, 16, 4, 1)] if interpreting() else [
    (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)])
_fwd_kernel = triton.autotune(_FWD, key=_KEY,
                              prune_configs_by={"early_config_prune": _prune_fwd})(_attn_fwd)
_dkdv_kernel = triton.autotune(_DKDV, key=_KEY, prune_configs_by={
    "early_config_prune": _spill_free("dkdv")})(_attn_bwd_dkdv)
_dq_kernel = triton.autotune(_DQ, key=_KEY + ["STORE_DS"],
                             prune_configs_by={"early_config_prune": _prune_spilling})(_attn_bwd_dq)


def _mask_view(mask: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor):
    """(tensor, strides, HAS_MASK, MASK_IS_BOOL): the mask expanded to (B, Hq, Lq, Lk) as a
    view, so broadcast dims have stride 0 and nothing is copied."""
    if mask is None:
        return like, (0, 0, 0, 0), False, False
    m = mask.expand(shape)
    if m.dtype == torch.bool:
        return m.view(torch.uint8), m.stride(), True, True
    return m, m.stride(), True, False


class _Problem:
    """What the three kernels of one attention call share: the (B, H, L, D) views (varlen:
    (1, H, total, D) with a zero batch stride, B = the number of sequences), the lengths the
    grid and the dropout counters use (varlen: the longest), the window and the constexprs.

    ``window`` = (left, right), -1 = unbounded; ``is_causal`` sets right = 0."""

    def __init__(self, q, k, mask, seed, dropout_p, is_causal, window, bottom_right, softcap,
                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            self.B, Hq, D = cu_seqlens_q.numel() - 1, q.shape[1], q.shape[2]
            self.Lq, self.Lk = max_seqlen_q, max_seqlen_k
            self.cu = (cu_seqlens_q, cu_seqlens_k)
        else:
            self.B, Hq, self.Lq, D = q.shape
            self.Lk = k.shape[2]
            self.cu = (q, q)  # unused pointers
        self.Hq = Hq
        wl, wr = window
        if is_causal:
            wr = 0
        m, self.m_strides, has_mask, is_bool = _mask_view(
            mask, (self.B, Hq, self.Lq, self.Lk), q)
        self.mask = m
        self.consts = dict(
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
            HAS_LEFT=wl >= 0, HAS_RIGHT=wr >= 0, HAS_SOFTCAP=softcap > 0.0,
            IS_VARLEN=self.varlen, HAS_MASK=has_mask, MASK_IS_BOOL=is_bool,
            HAS_DROPOUT=dropout_p > 0.0,
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        )
        self.buckets = (triton.next_power_of_2(self.Lq), triton.next_power_of_2(self.Lk))
        self.seed = int(seed.item()) if seed is not None and dropout_p > 0.0 else 0
        # Runtime scalars, in kernel order: cap2, bottom_right, wl, wr, dropout_p, seed.
        self.scalars = (softcap * LOG2E, int(bool(bottom_right)), max(wl, 0), max(wr, 0),
                        dropout_p, self.seed)

    def view(self, t):
        """The kernels' (B, H, L, D) view of q/k/v/out/grads."""
        return t.permute(1, 0, 2).unsqueeze(0) if self.varlen else t

    def strides(self, t4):
        st = t4.stride()
        return (0, *st[1:]) if self.varlen else st

    def new_out(self, q):
        if self.varlen:
            return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                    torch.empty((self.Hq, q.shape[0]), dtype=torch.float32, device=q.device))
        B, Hq, Lq, D = q.shape
        return (torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device),
                torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device))

    def lse_strides(self, lse):
        return (0, lse.stride(0)) if self.varlen else lse.stride()[:2]


def _fwd(q, k, v, mask, seed, dropout_p, is_causal, scale, window=(-1, -1), bottom_right=False,
         softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    P = _Problem(q, k, mask, seed, dropout_p, is_causal, window, bottom_right, softcap,
                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    q4, k4, v4 = P.view(q), P.view(k), P.view(v)
    Hq, Hk = q4.shape[1], k4.shape[1]
    out, lse = P.new_out(q)
    o4 = P.view(out)
    grid = lambda META: (triton.cdiv(P.Lq, META["BLOCK_M"]), P.B * Hq)
    _fwd_kernel[grid](
        q4, k4, v4, P.mask, o4, lse, *P.cu, *P.strides(q4), *P.strides(k4), *P.strides(v4),
        *P.strides(o4), *P.m_strides, *P.lse_strides(lse),
        Hq, P.Lq, P.Lk, Hq // Hk, scale * LOG2E, *P.scalars, *P.buckets, **P.consts)
    return out, lse


def _bwd(do, q, k, v, out, lse, mask, seed, dropout_p, is_causal, scale, need_ds,
         window=(-1, -1), bottom_right=False, softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
         max_seqlen_q=0, max_seqlen_k=0):
    P = _Problem(q, k, mask, seed, dropout_p, is_causal, window, bottom_right, softcap,
                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    q4, k4, v4, o4, do4 = P.view(q), P.view(k), P.view(v), P.view(out), P.view(do)
    Hq, Hk, D = q4.shape[1], k4.shape[1], q4.shape[3]
    delta = torch.empty_like(lse)
    block = 16 if interpreting() else 64
    # delta per query row; varlen rows are one (1, Hq, total_q) problem here.
    _attn_bwd_delta[(triton.cdiv(o4.shape[2], block), o4.shape[0] * Hq)](
        o4, do4, delta, *o4.stride(), *do4.stride(), Hq, o4.shape[2],
        HEAD_DIM=D, BLOCK_D=P.consts["BLOCK_D"], BLOCK_M=block)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dq4, dk4, dv4 = P.view(dq), P.view(dk), P.view(dv)
    # dS for a float mask that requires grad: a full (B, Hq, Lq, Lk) fp32 tensor, i.e. the
    # N x N memory the fused kernel otherwise avoids; only paid when the bias is learned.
    shape = (P.B, Hq, P.Lq, P.Lk) if need_ds else (0,)
    ds = torch.zeros(shape, dtype=torch.float32, device=q.device)
    common = (*P.strides(q4), *P.strides(k4), *P.strides(v4), *P.strides(do4))
    args = (Hq // Hk, scale, scale * LOG2E, *P.scalars, *P.buckets)
    _dkdv_kernel[lambda META: (triton.cdiv(P.Lk, META["BLOCK_N"]), P.B * Hk)](
        q4, k4, v4, P.mask, do4, lse, delta, dk4, dv4, *P.cu, *common,
        *P.strides(dk4), *P.strides(dv4), *P.m_strides, *P.lse_strides(lse),
        Hq, Hk, P.Lq, P.Lk, *args, **P.consts)
    _dq_kernel[lambda META: (triton.cdiv(P.Lq, META["BLOCK_M"]), P.B * Hq)](
        q4, k4, v4, P.mask, do4, lse, delta, dq4, ds, *P.cu, *common,
        *P.strides(dq4), *P.m_strides, *P.lse_strides(lse),
        Hq, P.Lq, P.Lk, *args, STORE_DS=need_ds, **P.consts)
    return dq, dk, dv, ds


def dropout_mask(seed: int, B: int, H: int, Lq: int, Lk: int, p: float,
                 device: torch.device | str) -> torch.Tensor:
    """The bool (B, H, Lq, Lk) keep mask (True = kept) that the kernels draw for ``seed``."""
    out = torch.empty((B, H, Lq, Lk), dtype=torch.int8, device=device)
    grid = (triton.cdiv(Lq, 32), triton.cdiv(Lk, 32), B * H)
    _dropout_mask_kernel[grid](out, Lq, Lk, int(seed), float(p), BLOCK_M=32, BLOCK_N=32)
    return out.bool()


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("nnfast::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],  # noqa: UP045 (torch's schema inference wants Optional)
    seed: Optional[torch.Tensor],  # noqa: UP045 (int64 (1,) on the CPU)
    dropout_p: float,
    is_causal: bool,
    scale: float,
    window_left: int = -1,
    window_right: int = -1,
    bottom_right: bool = False,
    softcap: float = 0.0,
    cu_seqlens_q: Optional[torch.Tensor] = None,  # noqa: UP045 (varlen: int32 (B + 1,))
    cu_seqlens_k: Optional[torch.Tensor] = None,  # noqa: UP045
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(q, k, v, attn_mask, seed, dropout_p, is_causal, scale, (window_left, window_right),
                bottom_right, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@attention_fwd.register_fake
def _(q, k, v, attn_mask, seed, dropout_p, is_causal, scale, window_left=-1, window_right=-1,
      bottom_right=False, softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
      max_seqlen_k=0):
    if cu_seqlens_q is not None:  # varlen: lse (Hq, total_q)
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    B, Hq, Lq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, Lq), dtype=torch.float32)


@torch.library.custom_op("nnfast::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: Optional[torch.Tensor],  # noqa: UP045
    seed: Optional[torch.Tensor],  # noqa: UP045
    dropout_p: float,
    is_causal: bool,
    scale: float,
    need_ds: bool,
    window_left: int = -1,
    window_right: int = -1,
    bottom_right: bool = False,
    softcap: float = 0.0,
    cu_seqlens_q: Optional[torch.Tensor] = None,  # noqa: UP045
    cu_seqlens_k: Optional[torch.Tensor] = None,  # noqa: UP045
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(grad_out, q, k, v, out, lse, attn_mask, seed, dropout_p, is_causal, scale,
                need_ds, (window_left, window_right), bottom_right, softcap, cu_seqlens_q,
                cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask, seed, dropout_p, is_causal, scale, need_ds,
      *rest):
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if need_ds else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, seed, dropout_p, is_causal, scale, *opts = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    cu_q, cu_k = (opts[4], opts[5]) if len(opts) > 4 else (None, None)
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed, cu_q, cu_k)
    ctx.args = (dropout_p, is_causal, scale)
    ctx.opts = tuple(opts[:4]), tuple(opts[6:])
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask, seed, cu_q, cu_k = ctx.saved_tensors
    need_ds = bool(attn_mask is not None and attn_mask.dtype != torch.bool
                   and ctx.needs_input_grad[3])
    head, tail = ctx.opts
    dq, dk, dv, ds = attention_bwd(grad_out, q, k, v, out, lse, attn_mask, seed, *ctx.args,
                                   need_ds, *head, *((cu_q, cu_k, *tail) if tail else ()))
    # dS summed over the mask's broadcast dims: a deterministic torch reduction.
    dbias = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if need_ds else None
    return (dq, dk, dv, dbias) + (None,) * (ctx.n_inputs - 4)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- entry
def draw_seed_tensor() -> torch.Tensor:
    """The dropout seed, int64 (1,) on the CPU, from torch's default CPU generator: so
    ``torch.manual_seed`` makes dropout reproducible (and a tensor, so torch.compile traces
    it instead of breaking the graph on ``.item()``)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


def draw_seed() -> int:
    """The seed the next dropout call will use after the same ``torch.manual_seed``, for
    ``dropout_mask(draw_seed(), ...)`` in tests."""
    return int(draw_seed_tensor().item())


def _natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The kernels' base-2 lse (+inf on fully masked rows) as the natural log-sum-exp of the
    scores (-inf on fully masked rows: the log of an empty sum)."""
    return torch.where(torch.isposinf(lse2), float("-inf"), lse2 * math.log(2.0))


def _why_reference(q, k, n_programs: int, Lq: int, Lk: int, dropout_p: float) -> str | None:
    """Why a call must run the PyTorch reference instead of the kernels, or None."""
    if q.numel() == 0 or k.numel() == 0:
        return "empty inputs"
    if dropout_p > 0.0 and Lq * Lk >= 2**31:
        return "dropout with Lq * Lk >= 2^31 (32-bit philox counters)"
    if n_programs > 65535:
        return "batch (or sequences) * heads > 65535 (grid limit)"
    return None


def _fallback(why: str, run_reference):
    warn_once(f"nnfast attention: {why} runs the PyTorch reference")
    return run_reference()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    *,
    window: tuple[int, int] = (-1, -1),
    bottom_right: bool = False,
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """Called by ``nnfast.functional.scaled_dot_product_attention`` after validation.

    ``window`` = (left, right) keys around the diagonal, -1 = unbounded; the diagonal is
    top-left (query i at key i) or, with ``bottom_right``, at key ``i + Lk - Lq``.
    ``softcap`` > 0: scores ``softcap * tanh(scale * q.k / softcap)``. ``return_lse``: also
    the natural log-sum-exp (B, Hq, Lq) fp32 of each row (no gradient flows through it).

    Without grad mode or inputs requiring grad, the custom op's autograd layer is bypassed:
    nothing is saved and the log-sum-exp is dropped right away."""
    B, Hq, Lq, _ = q.shape
    why = _why_reference(q, k, B * Hq, Lq, k.shape[2], dropout_p)
    if why is not None:
        from nnfast.reference.attention import attention as reference

        return _fallback(why, lambda: reference(
            q, k, v, attn_mask, dropout_p, is_causal, scale, window=window,
            bottom_right=bottom_right, softcap=softcap, return_lse=return_lse))
    seed = draw_seed_tensor() if dropout_p > 0.0 else None
    out, lse = attention_fwd(q, k, v, attn_mask, seed, dropout_p, is_causal, scale,
                             int(window[0]), int(window[1]), bool(bottom_right), float(softcap))
    return (out, _natural_lse(lse)) if return_lse else out


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """Called by ``nnfast.functional.varlen_attention`` after validation: q (total_q, Hq, D),
    k/v (total_k, Hk, D), sequence b at rows ``cu_seqlens[b] : cu_seqlens[b + 1]``; causal
    and window aligned bottom-right per sequence (flash-attention's varlen). One program per
    (query block of the longest sequence, sequence, head): blocks past a sequence's end exit
    at once, so no padding is ever computed. lse: (Hq, total_q) fp32, natural log."""
    n_programs = (cu_seqlens_q.numel() - 1) * q.shape[1]
    why = _why_reference(q, k, n_programs, max_seqlen_q, max_seqlen_k, dropout_p)
    if why is not None:
        from nnfast.reference.attention import varlen_attention as reference

        return _fallback(why, lambda: reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            is_causal, scale, window=window, softcap=softcap, return_lse=return_lse))
    seed = draw_seed_tensor() if dropout_p > 0.0 else None
    out, lse = attention_fwd(q, k, v, None, seed, dropout_p, is_causal, scale,
                             int(window[0]), int(window[1]), True, float(softcap),
                             cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))
    return (out, _natural_lse(lse)) if return_lse else out
