"""Shared Triton helpers of the flash attention kernels (``attention_fwd``,
``attention_bwd``): dropout keep bits, soft-capping, the scores of a tile, a sequence's
bounds, loop bounds over a window, and the autotune config plumbing. The maths is described
in ``attention.py``."""

import triton
import triton.language as tl

from nnfast._backend import interpreting


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
    KEY_BOUND: tl.constexpr = True,  # mask keys past Lk (dK/dV: those rows are never stored)
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
        if KEY_BOUND:
            ok = kj < Lk
            if HAS_RIGHT:
                ok = ok & (kj <= qi + diag + wr)
            if HAS_LEFT:
                ok = ok & (kj >= qi + diag - wl)
        elif HAS_RIGHT:  # dK/dV masks only at a window edge: HAS_RIGHT or HAS_LEFT holds
            ok = kj <= qi + diag + wr
            if HAS_LEFT:
                ok = ok & (kj >= qi + diag - wl)
        else:
            ok = kj >= qi + diag - wl
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



# ----------------------------------------------------------------------------- autotuning
def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    # Under the interpreter one small config keeps CPU tests fast (autotuning would run every
    # candidate); BLOCK_M != BLOCK_N there on purpose, to exercise the causal block logic.
    if interpreting():
        shapes = shapes[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


_KEY = ["lq_bucket", "lk_bucket", "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "IS_VARLEN",
        "HAS_MASK", "HAS_DROPOUT"]
