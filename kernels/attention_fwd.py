"""Flash attention forward kernel (one program per query block, looping over key blocks)
and its autotuning. The maths and the flags are described in ``attention.py``.

Two ways in and out of memory, one kernel (constexpr ``USE_TMA``): Hopper's tensor memory
accelerator through host-built 4-d descriptors over the (B, H, L, D) views (one bulk copy
per tile, no per-element address or mask arithmetic, reads past a (b, h)'s rows zero-filled
and writes there dropped), or pointers (other GPUs, strides TMA cannot take). Varlen views
are (1, H, total, D): a descriptor bounds the whole pack, not a sequence, so there the rows
past a sequence's end are the next sequence's -- masked out of the scores (and V zeroed on
the edge blocks), and the output's last partial block is stored through pointers."""

import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from nnfast._backend import interpreting
from nnfast.kernels.attention_common import (
    _KEY,
    _configs,
    _dropout_keep,
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
def _desc_tile(desc, b, h, row, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [row, row + BLOCK_ROWS) of (b, h) through a 4-d (B, H, L, D) TMA descriptor."""
    return desc.load([b, h, row, 0]).reshape(BLOCK_ROWS, BLOCK_D)


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q,
    k_src, v_src,  # USE_TMA: K / V descriptors; else pointers at this (b, head)'s row 0
    desc_b, hk, k0,  # USE_TMA: the descriptors' batch and head, the sequence's first row
    mask_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    offs_m, offs_n0, offs_d,
    lo, hi, seqlen_q, seqlen_k, Lk, diag, wl, wr, scale_log2, cap2, dropout_p, seed, bh,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, SCALE_NEG: tl.constexpr,
    ROWSUM_DOT: tl.constexpr,
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
    # No warp specialisation (tl.range(..., warp_specialize=True)): on sm_90 with Triton
    # 3.6.0 and 3.9.0 it either fails to compile (4 warps: assertion "isa<scf::IfOp>(defOp)
    # || isa<scf::ForOp>(defOp)" in NVGPUWarpSpecialization's TaskIdPropagation) or is
    # silently dropped (8 warps: the same PTX as without it).
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        if USE_TMA:
            kT = _desc_tile(k_src, desc_b, hk, k0 + start_n, BLOCK_N, BLOCK_D).T
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
        if ROWSUM_DOT:  # (BLOCK_M, 16) copies of the normalizer, summed by the dot below
            l_i = l_i * alpha[:, None]
        else:
            l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer counts dropped entries too
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
            p = tl.where(keep, p, 0.0)
        if USE_TMA:
            v = _desc_tile(v_src, desc_b, hk, k0 + start_n, BLOCK_N, BLOCK_D)
            if MASKED and IS_VARLEN:  # the next sequence's rows: p is 0 there, V may be inf
                v = tl.where((offs_n < seqlen_k)[:, None], v, 0.0)
        else:
            v = _load(v_ptrs, (offs_n < seqlen_k)[:, None], d_ok[None, :], MASKED, D_MASK)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
        p_lo = p.to(v.dtype)
        acc = tl.dot(p_lo, v, acc, input_precision=DOT_PREC)
        if ROWSUM_DOT:
            l_i = tl.dot(p_lo, tl.full((BLOCK_N, 16), 1.0, v.dtype), l_i)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seed"])
def _attn_fwd(
    Q,  # (B, Hq, Lq, D); varlen: (1, Hq, total_q, D) with stride_qb = 0
    K,  # (B, Hk, Lk, D); varlen: (1, Hk, total_k, D) with stride_kb = 0
    V,  # like K
    Mask,  # broadcast view (B, Hq, Lq, Lk), bool as uint8 or float; unused without HAS_MASK
    Out,  # like Q (USE_TMA and not IS_VARLEN: a descriptor)
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
    USE_TMA: tl.constexpr,  # Q/K/V (and dense Out) are TMA descriptors of the views
    SCALE_NEG: tl.constexpr,  # scale < 0: the row max of scale * qk is scale * min(qk)
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
    if USE_TMA:  # Q, K, V, Out are descriptors; varlen's views have one batch entry
        desc_b = 0 if IS_VARLEN else b.to(tl.int32)
        h32, hk32 = h.to(tl.int32), hk.to(tl.int32)
        q0_32, k0_32 = q0.to(tl.int32), k0.to(tl.int32)
        q = _desc_tile(Q, desc_b, h32, q0_32 + start_m, BLOCK_M, BLOCK_D)
        k_src = K
        v_src = V
    else:
        desc_b, h32, hk32, q0_32, k0_32 = 0, 0, 0, 0, 0  # unused
        q = tl.load(Q + b * stride_qb + h * stride_qh + (q0 + offs_m[:, None]) * stride_qm
                    + offs_d[None, :] * stride_qd, mask=m_ok[:, None] & d_ok[None, :],
                    other=0.0)
        k_src = K + b * stride_kb + hk * stride_kh + k0 * stride_kn
        v_src = V + b * stride_vb + hk * stride_vh + k0 * stride_vn
    mask_base = Mask + b * stride_mb + h * stride_mh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # The row sums of p on the tensor cores: p @ ones(BLOCK_N, 16) accumulated in fp32 (16
    # equal columns, the smallest dot) instead of a BLOCK_N-wide FADD reduction and shuffles
    # per row and block: 40-55 fewer instructions a block at the headline tiles (sm_90, both
    # Triton versions). It sums the rounded p that the P @ V dot weighs V by, so the output
    # stays a convex combination of V's rows. Not with dropout (the normalizer counts the
    # dropped entries, the dot sees them zeroed), softcap (its tanh leaves no room: 30-50
    # more), or 16-row decode tiles (no warpgroup MMA there: twice the instructions). The
    # pruner's _over_smem restates this rule (its ones tile's shared memory).
    ROWSUM_DOT: tl.constexpr = USE_TMA and BLOCK_M > 16 and not (HAS_DROPOUT or HAS_SOFTCAP)
    if ROWSUM_DOT:
        l_i = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    else:
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Key blocks outside [lo, hi) are never visited (window / causal skipping); inside
    # [mid_lo, mid_hi) every key is in bounds and in the window of every row (no masking).
    lo, mid_lo, mid_hi, hi = _span(start_m, seqlen_k, diag - wl, diag + wr,
                                   HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    if HAS_LEFT:  # the left edge of the window
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, k_src, v_src, desc_b, hk32, k0_32, mask_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            offs_m, offs_n0, offs_d, lo, mid_lo, seqlen_q, seqlen_k, Lk, diag, wl, wr,
            scale_log2, cap2, dropout_p, seed, bh, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
            HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, IS_VARLEN, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
            USE_TMA, SCALE_NEG, ROWSUM_DOT)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_src, v_src, desc_b, hk32, k0_32, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_n0, offs_d, mid_lo, mid_hi, seqlen_q, seqlen_k, Lk, diag, wl, wr,
        scale_log2, cap2, dropout_p, seed, bh, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
        HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, IS_VARLEN, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
        USE_TMA, SCALE_NEG, ROWSUM_DOT)
    # The diagonal / right edge of the window and the tail, with bounds masking.
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_src, v_src, desc_b, hk32, k0_32, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_n0, offs_d, mid_hi, hi, seqlen_q, seqlen_k, Lk, diag, wl, wr,
        scale_log2, cap2, dropout_p, seed, bh, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
        HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT, IS_VARLEN, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
        USE_TMA, SCALE_NEG, ROWSUM_DOT)
    if ROWSUM_DOT:
        l_i = tl.max(l_i, 1)  # any column: they are equal
    empty = l_i == 0.0  # fully masked row: zero output, lse2 = +inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    if USE_TMA and not IS_VARLEN:  # rows past Lq are dropped by TMA
        Out.store([desc_b, h32, start_m, 0], out.to(Out.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    else:  # varlen: a descriptor's partial block would write over the next sequence
        tl.store(Out + b * stride_ob + h * stride_oh + (q0 + offs_m[:, None]) * stride_om
                 + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + b * stride_lb + h * stride_lh + q0 + offs_m, lse, mask=m_ok)


# ----------------------------------------------------------------------------- autotuning
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Configs too big for shared memory at large head
# dims fail to compile and are dropped by the autotuner. 128 x 128 comes with 3 and 2 stages:
# at head dim 128 three fill the H100's shared memory (225 KB of 227), two leave room (and
# the only room for the TMA path's row-sum ones tile: see _over_smem). The
# first config left after pruning is what `compile_check.py --quick` compiles: 128 x 64 w4
# at head dim 64, 128 x 128 w8 at 128 (the headline tiles of its loop bounds).
_FWD = _configs([(32, 16, 4, 1)] if interpreting() else [
    (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3),
    (128, 32, 4, 4), (64, 32, 4, 2), (16, 128, 4, 3), (16, 64, 4, 2)])


def _spills(c, block_d: int, tma: bool, dropout: bool, mask: bool, edges: bool) -> bool:
    """Configs that spill registers on sm_90 (ptxas via scripts/compile_check.py, Triton 3.6
    and 3.9, fp16/bf16). A 128- or 256-wide head block holds more of Q and the accumulator
    (16-424 B spilled beyond these limits). Dropout's philox draws one 32-bit number per
    score, so its tiles must hold few scores per thread (8-1192 B). The pointer path keeps
    addresses and masks in registers too: at 64 scores a thread it spills 8-64 B (128 x 64
    w4 even unmasked with Triton 3.9; 128 x 128 with a mask, or at head dim 128 with the
    window/causal edges or 2 stages). At head dim 256 it spills 8-48 B in every config (3.9;
    3.6 only with varlen, a mask or dropout); 64 x 32, the least, is kept."""
    m, n, w = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
    per_thread = m * n // (32 * w)
    big_d = block_d >= 128
    if (big_d and m == 128 and w == 4) or (block_d >= 256 and per_thread > 16):
        return True
    if dropout:  # (and the pointer path's decode tile 16 x 128 at a 128-wide head block)
        pointer_decode = not tma and big_d and (m, n) == (16, 128)
        return pointer_decode or per_thread > (16 if big_d or n < 64 else 32)
    if tma:  # decode's 16 x 64 at a 64-wide head block: 16 B at 72 registers (Triton 3.9)
        return (m, n) == (16, 64) and block_d == 64
    if (m, n, w) == (128, 64, 4):
        return True
    if (m, n, w) == (128, 128, 8):
        return mask or (big_d and (edges or c.num_stages == 2))
    return (m, n, w) == (64, 64, 4) and mask and big_d


def _over_smem(c, block_d: int, tma: bool, dropout: bool, softcap: bool) -> bool:
    """Configs that exceed the H100's 227 KB of shared memory (found at compile time, where
    the autotuner would drop them after a failed compile): the TMA path's row-sum dot
    (ROWSUM_DOT in _attn_fwd) adds a BLOCK_N x 16 tile of ones, 4 KB beside the three stages
    of 128 x 128 tiles at a 128-wide head block that took 225 KB."""
    rowsum = tma and not (dropout or softcap) and c.kwargs["BLOCK_M"] > 16
    return rowsum and block_d >= 128 and c.num_stages >= 3 and c.kwargs["BLOCK_N"] >= 128


def _prune_fwd(configs, named_args, **kwargs):
    # Decoding (a handful of queries) wastes most of a 64/128-row block: BLOCK_M = 16 configs
    # are for short query lengths only, and only they are tried there.
    arg = lambda name, default=None: named_args.get(name, kwargs.get(name, default))  # noqa: E731
    lq = arg("lq_bucket")
    if lq is None:
        return configs
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == (lq <= 16)]
    flags = dict(block_d=arg("BLOCK_D", 0), tma=bool(arg("USE_TMA", False)),
                 dropout=bool(arg("HAS_DROPOUT", False)), mask=bool(arg("HAS_MASK", False)),
                 edges=bool(arg("HAS_RIGHT", False) or arg("HAS_LEFT", False)))
    kept = [c for c in kept if not _spills(c, **flags) and not _over_smem(
        c, flags["block_d"], flags["tma"], flags["dropout"], bool(arg("HAS_SOFTCAP", False)))]
    return kept or configs


def _tma_block_shapes(nargs):
    """Pre-launch hook: a host descriptor carries its tile shape, so each config sets its own
    on the descriptors of the call (pointer arguments are left alone)."""
    for name, rows in (("Q", "BLOCK_M"), ("K", "BLOCK_N"), ("V", "BLOCK_N"), ("Out", "BLOCK_M")):
        if isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = [1, 1, nargs[rows], nargs["BLOCK_D"]]


for _c in _FWD:
    _c.pre_hook = _tma_block_shapes

# The memory path is part of the key: TMA and pointer loads may favour different tiles.
_fwd_kernel = triton.autotune(_FWD, key=[*_KEY, "USE_TMA"],
                              prune_configs_by={"early_config_prune": _prune_fwd})(_attn_fwd)
