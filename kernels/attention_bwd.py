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
    _prune_spilling,
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


# ----------------------------------------------------------------------------- autotuning
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


_DKDV = _configs([(16, 32, 4, 1)] if interpreting() else [
    (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 2)])
_DQ = _configs([(32, 16, 4, 1)] if interpreting() else [
    (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)])
_dkdv_kernel = triton.autotune(_DKDV, key=_KEY, prune_configs_by={
    "early_config_prune": _spill_free("dkdv")})(_attn_bwd_dkdv)
_dq_kernel = triton.autotune(_DQ, key=_KEY + ["STORE_DS"],
                             prune_configs_by={"early_config_prune": _prune_spilling})(_attn_bwd_dq)
