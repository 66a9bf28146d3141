"""Flash attention backward kernels: delta = rowsum(dO * O), dK/dV (one program per key
block, looping over the GQA group's q heads and query blocks), dQ (and dS for a learned bias;
one program per query block), the dropout mask kernel, and their autotuning. The maths and
the flags are described in ``attention.py``."""

import triton
import triton.language as tl

from nnfast._backend import interpreting
from nnfast.kernels.attention_common import (
    _KEY,
    _configs,
    _dropout_keep,
    _scores,
    _seq,
    _softcap_dt,
    _span,
)


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
    EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Tiles are transposed, (BLOCK_N keys, BLOCK_M queries). Key rows past seqlen_k are
    # never stored, so their scores need no bounds mask (KEY_BOUND=False). The order below
    # keeps at most two (BLOCK_N, BLOCK_M) fp32 tiles alive (registers, not spills, on sm_90):
    # dV's product consumes P before dP exists; P is then folded into what dS needs.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < seqlen_q
        if EVEN_D:  # BLOCK_D == HEAD_DIM: no head-dim predicate per element
            qmask = m_ok[None, :]
            gmask = m_ok[:, None]
        else:
            qmask = d_ok[:, None] & m_ok[None, :]
            gmask = m_ok[:, None] & d_ok[None, :]
        qT = tl.load(q_base + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qm,
                     mask=qmask, other=0.0)  # (BLOCK_D, BLOCK_M)
        qkT = tl.dot(k, qT, input_precision=DOT_PREC)
        if HAS_SOFTCAP:  # d softcap / d score, taken before qkT dies
            dcap = _softcap_dt(qkT, scale_log2, cap2)
        # other=0, not +inf: a row past seqlen_q has q = 0 (so a score of 0 or -inf, its bias
        # reads 0), P <= 1 and dO = delta = 0, so it adds exactly 0 to dK and dV; a zero fill
        # needs no select after the pipelined copy, and so no row mask kept per stage.
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
        # Scores and dropout in coordinates shifted by -start_m on both axes: the tiles use
        # the loop-invariant offs_m0, not offs_m (which the software pipeliner would keep,
        # one copy per stage, in the score tile's layout).
        sT = _scores(qkT, offs_m0[None, :], (offs_n - start_m)[:, None],
                     mask_base + start_m * (stride_mm + stride_mn), stride_mm, stride_mn,
                     seqlen_q - start_m, seqlen_k - start_m, diag, wl, wr, scale_log2, cap2,
                     MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_MASK, MASK_IS_BOOL, False)
        pT = tl.math.exp2(sT - lse[None, :])  # (BLOCK_N, BLOCK_M), >= 0
        do = tl.load(do_base + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                     mask=gmask, other=0.0)  # (BLOCK_M, BLOCK_D)
        if HAS_DROPOUT:
            # Dropped entries carry -P: one tile holds P and the keep bit (P >= 0).
            keep = _dropout_keep(seed, bh, offs_m0[None, :], (offs_n + start_m * Lk)[:, None],
                                 Lk, dropout_p)
            pT = tl.where(keep, pT, -pT)
            r = 1.0 / (1.0 - dropout_p)
            dv = tl.dot((tl.maximum(pT, 0.0) * r).to(do.dtype), do, dv,
                        input_precision=DOT_PREC)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        if HAS_SOFTCAP:
            pT = pT * dcap
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        if HAS_DROPOUT:  # dS = P (dP_kept / (1 - p) - delta); a dropped entry: -P delta
            dsT = tl.where(pT > 0.0, pT * (dpT * r - delta[None, :]), pT * delta[None, :])
        else:
            dsT = pT * (dpT - delta[None, :])
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
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
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
                HAS_SOFTCAP, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, BLOCK_M, EVEN_D, DOT_PREC)
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base,
            stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn,
            offs_n, offs_m0, offs_d, d_ok, mid_lo, mid_hi, seqlen_q, seqlen_k, Lk, diag, wl,
            wr, scale_log2, cap2, dropout_p, seed, bh, False, HAS_LEFT, HAS_RIGHT,
            HAS_SOFTCAP, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, BLOCK_M, EVEN_D, DOT_PREC)
        if HAS_LEFT:  # the left edge of the window
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base,
                stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn,
                offs_n, offs_m0, offs_d, d_ok, mid_hi, hi, seqlen_q, seqlen_k, Lk, diag, wl,
                wr, scale_log2, cap2, dropout_p, seed, bh, True, HAS_LEFT, HAS_RIGHT,
                HAS_SOFTCAP, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, BLOCK_M, EVEN_D, DOT_PREC)
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
    BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Blocks of the unmasked loop (not MASKED) lie inside [0, seqlen_k) (``_span``): their
    # loads need no key mask, which the software pipeliner would otherwise keep per stage.
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < seqlen_k
        if MASKED:
            kv_ok = n_ok[:, None] & d_ok[None, :]
        else:
            kv_ok = d_ok[None, :]
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if EVEN_D and not MASKED:
            k = tl.load(k_ptrs)  # (BLOCK_N, BLOCK_D)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if HAS_SOFTCAP:  # d softcap / d score, taken before qk dies
            dcap = _softcap_dt(qk, scale_log2, cap2)
        s = _scores(qk, offs_m[:, None], offs_n[None, :], mask_base, stride_mm, stride_mn,
                    seqlen_q, seqlen_k, diag, wl, wr, scale_log2, cap2, MASKED, HAS_LEFT,
                    HAS_RIGHT, HAS_SOFTCAP, HAS_MASK, MASK_IS_BOOL)
        p = tl.math.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if HAS_SOFTCAP and not STORE_DS:  # one tile fewer alive while dP is computed
            p = p * dcap
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if STORE_DS:  # the bias gradient: dS before the softcap derivative
            tl.store(ds_base + offs_m[:, None].to(tl.int64) * Lk + offs_n[None, :], ds,
                     mask=(offs_m < seqlen_q)[:, None] & n_ok[None, :])
            if HAS_SOFTCAP:
                ds = ds * dcap
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
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
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
            HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, STORE_DS, BLOCK_N, EVEN_D, DOT_PREC)
    dq = _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, mask_base, ds_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_n0, offs_d, d_ok, mid_lo, mid_hi, seqlen_q, seqlen_k, Lk, diag, wl, wr,
        scale_log2, cap2, dropout_p, seed, bh, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
        HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, STORE_DS, BLOCK_N, EVEN_D, DOT_PREC)
    dq = _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, mask_base, ds_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_n0, offs_d, d_ok, mid_hi, hi, seqlen_q, seqlen_k, Lk, diag, wl, wr,
        scale_log2, cap2, dropout_p, seed, bh, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
        HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, STORE_DS, BLOCK_N, EVEN_D, DOT_PREC)
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


# ----------------------------------------------------------------------------- autotuning
# (BLOCK_M, BLOCK_N, num_warps, num_stages). dK/dV keeps a BLOCK_N-key fp32 dK and dV in
# registers (2 * BLOCK_N * BLOCK_D / threads each): 128 keys on 8 warps at D=128 already
# take 128 of the 255 registers, so the query step shrinks (32 -> 16) before the key block
# does. dQ keeps one (BLOCK_M, BLOCK_D) accumulator.
_DKDV = _configs([(16, 32, 4, 1)] if interpreting() else [
    (64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3), (16, 128, 8, 2),
    (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 8, 2)])
_DQ = _configs([(32, 16, 4, 1)] if interpreting() else [
    (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)])

# Configs that spill registers on sm_90 (scripts/compile_check.py, fp16/bf16, Triton 3.9 and
# 3.6, spill = ptxas' stack frame), by (kernel, head-dim class, flag class): "wide" is
# BLOCK_D > 64 (D = 80..128); "flags" a launch with any of _HEAVY's flags, else "causal"
# (HAS_RIGHT alone) or "plain"; "paired" a "flags" launch with two or more of _PAIRED (its
# own entry for dK/dV at D=128 only). The autotuner never times them. Worst measured spill
# in brackets (3.9 / 3.6 where they differ).
_DKDV_FLAGS = ("HAS_MASK", "HAS_DROPOUT", "HAS_SOFTCAP", "HAS_LEFT", "IS_VARLEN")
_DQ_FLAGS = ("HAS_MASK", "HAS_SOFTCAP", "HAS_LEFT", "STORE_DS")
_PAIRED = ("HAS_DROPOUT", "IS_VARLEN", "HAS_SOFTCAP", "HAS_LEFT")
_HEAVY = {("dkdv", False): _DKDV_FLAGS, ("dkdv", True): _DKDV_FLAGS,
          ("dq", False): _DQ_FLAGS, ("dq", True): _DQ_FLAGS + ("IS_VARLEN",)}
_SPILLS = {
    ("dkdv", False, "plain"): set(),
    # 64x128 w8 [0 / 88 B], 64x64 w4 [64 B]; 32x128 w8 takes the big-tile place.
    ("dkdv", False, "causal"): {(64, 128, 8, 3), (64, 64, 4, 3)},
    # mask + dropout + softcap + window (D=64): 64x128 w8 [864 B], 32x128 w8 [128-176 B],
    # 16x128 w8 s3 [0 / 8 B], 32x64 w4 [56 B]; 16x128 w8 s2: 0.
    ("dkdv", False, "flags"): {(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 8, 2),
                               (16, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)},
    # D=128: 64x128 w8 [144-440 B], 32x128 w8 [0 plain, 32-48 B causal], 32x64 w4 [24-288 B],
    # 64x64 w4 [264 B]; 16x128 w8: 0.
    ("dkdv", True, "plain"): {(64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)},
    ("dkdv", True, "causal"): {(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 8, 2),
                               (32, 64, 4, 3), (64, 64, 4, 3)},
    # the same and 16x128 w8 s3 (8-72 B with dropout / softcap + window / varlen).
    ("dkdv", True, "flags"): {(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 8, 2),
                              (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 8, 3)},
    # and 16x128 w8 s2 (dropout + varlen [40 / 32 B], softcap + left window [8 B]): 16x64
    # w8 s2 holds half the dK/dV accumulators, 0 B (16 B / 0 with softcap + window + varlen
    # + dropout all four, under Triton 3.6). 16x64 with 1 or 3 stages, or 4 warps: 8-200 B.
    ("dkdv", True, "paired"): {(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 8, 2),
                               (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 8, 3),
                               (16, 128, 8, 2)},
    ("dq", False, "plain"): set(),
    ("dq", False, "causal"): set(),
    # bool/float mask + dropout + softcap (+ dS out), D=64: 128x32 w4 [128 B], 128x64 w8
    # [152 B], 64x64 w4 [40 B, bool mask + dropout].
    ("dq", False, "flags"): {(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)},
    # D=128: 128x32 w4 [176-320 B], 64x64 w4 [0 / 8-32 B]; with a window / softcap / mask /
    # varlen 128x64 w8 too [16-64 B; varlen 0 / 16 B].
    ("dq", True, "plain"): {(128, 32, 4, 3), (64, 64, 4, 3)},
    ("dq", True, "causal"): {(128, 32, 4, 3), (64, 64, 4, 3)},
    ("dq", True, "flags"): {(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)},
}


def _spill_free(kind: str):
    """An early_config_prune dropping the configs of ``_SPILLS`` for this launch's head-dim
    class and flags (all of them kept if nothing would be left, e.g. for D=256, where every
    dK/dV config spills)."""
    def prune(configs, named_args, **kwargs):
        def arg(name, default):
            return kwargs.get(name, named_args.get(name, default))
        wide = arg("BLOCK_D", 64) > 64
        cls = "flags" if any(arg(f, False) for f in _HEAVY[(kind, wide)]) else (
            "causal" if arg("HAS_RIGHT", False) else "plain")
        if cls == "flags" and sum(bool(arg(f, False)) for f in _PAIRED) >= 2:
            cls = "paired"  # a kind of "flags": its entry unless one of its own is given
        bad = _SPILLS.get((kind, wide, cls), _SPILLS[(kind, wide, "flags")])
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       c.num_stages) not in bad]
        return kept or configs
    return prune


_dkdv_kernel = triton.autotune(_DKDV, key=_KEY, prune_configs_by={
    "early_config_prune": _spill_free("dkdv")})(_attn_bwd_dkdv)
_dq_kernel = triton.autotune(_DQ, key=_KEY + ["STORE_DS"], prune_configs_by={
    "early_config_prune": _spill_free("dq")})(_attn_bwd_dq)
