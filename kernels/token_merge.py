"""Convolutional token merging and expansion as GEMMs, forward and backward, bias fused.

Semantics (and the causal shift) are in ``nnfast/reference/token_merge.py``. Shapes:
``x (B, T, C_in)``, ``k`` the window, ``Tm = ceil(T / k)``, ``M = B * Tm`` windows.

Merge is one GEMM because a window of ``k`` tokens is ``k * C_in`` consecutive numbers in
memory (for tokens packed along the channel dim): ``Xw (M, k*C_in)`` is ``x`` itself read
with a row stride of ``k * C_in``, and ``Y = Xw @ W' + bias`` with ``W'[i*C_in + c, o] =
weight[o, c, i]``. The window's element ``(row r, feature f)`` of batch ``b = r // Tm``,
window ``w = r % Tm`` sits at flat token-major offset ``(w*k - shift) * C_in + f`` in batch
``b``: one division per window, none per element. The zero tail (``T`` not a multiple of
``k``) and the causal front padding (``shift = k - 1``) are masks on that flat offset
(``0 <= flat < T * C_in``), so nothing is padded or copied (only an ``x`` whose tokens are
not packed, token stride != C * channel stride, is copied first). Expansion is the same with the
window on the output: ``Yw (M, k*C_out) = X (M, C_in) @ W2 + bias[n % C_out]``, ``W2[c,
i*C_out + o] = weight[c, o, i]``, stored through the window (tokens past ``length`` masked).

Backward, with ``dY`` the upstream gradient:

* merge: ``dXw = dY @ W'^T`` (stored through the window: padding positions are dropped;
  causal tokens no window covers get zeros), ``dW' = Xw^T @ dY``, ``dbias = sum_rows dY``;
* expand: ``dX = dYw @ W2^T`` (read through the window: cropped tokens read as zeros),
  ``dW2 = X^T @ dYw``, ``dbias[o] = sum_{rows, i} dYw[:, i*C_out + o]``.

All six are one kernel, ``_gemm``: ``C = A @ B (+ bias)`` where each of A, B, C is either a
plain strided matrix (transposes are swapped strides) or the window view of a ``(B, T, C)``
tensor (``*_MODE`` constexprs). The weight gradients reduce over all ``M`` windows; when
their output has too few tiles to fill the GPU the reduction is split over ``S`` programs
along a second grid axis, each writing its own fp32 partial ``(S, ...)``, summed by torch
afterwards (deterministic, no atomics). ``dbias`` is fused into the same pass: the B operand
of both weight-gradient GEMMs is ``dY``, so the programs of the first row-block also store
the column sums of the ``dY`` tiles they load.

fp32 accumulation (``tl.dot``), IEEE fp32 products for fp32 inputs (no TF32). An fp32 weight
with fp16/bf16 activations is cast once to the activations' dtype (as autocast does);
gradients come back in each argument's own dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from nnfast._backend import interpreting

PLAIN, WIN_ROWS, WIN_COLS = 0, 1, 2  # operand modes: strided / rows are windows / cols are
# Weight-gradient GEMMs: each split reduces at least this many windows.
SPLIT_MIN_ROWS = 512


@triton.jit
def _tile(
    base,  # pointer of the operand
    rows,  # (R, 1) int64 logical row indices
    cols,  # (1, Q) int64 logical column indices
    n_rows,
    n_cols,
    stride_r,  # PLAIN only
    stride_c,
    n_win,  # windowed only: windows per sequence (Tm)
    KW,  # tokens per window (k)
    CW,  # channels per token
    shift,  # causal front shift in tokens
    T,  # valid tokens per sequence
    s_b,  # batch stride of the (B, T, CW) tensor; its token stride is CW * s_c
    s_c,  # channel stride
    MODE: tl.constexpr,  # PLAIN | WIN_ROWS (rows are windows) | WIN_COLS (cols are windows)
):
    """Pointers and mask of one tile of a logical matrix."""
    mask = (rows < n_rows) & (cols < n_cols)
    if MODE == 0:
        ptrs = base + rows * stride_r + cols * stride_c
    else:
        if MODE == 1:
            win = rows
            feat = cols
        else:
            win = cols
            feat = rows
        # int32 division (window counts fit; int64 division is several times slower on GPUs).
        b = win.to(tl.int32) // n_win
        w = win - b.to(tl.int64) * n_win
        # Token-major offset inside sequence b; negative = causal front padding.
        flat = (w * KW - shift) * CW + feat
        ptrs = base + b.to(tl.int64) * s_b + flat * s_c
        mask = mask & (flat >= 0) & (flat < T * CW)
    return ptrs, mask


@triton.jit
def _gemm(
    A,  # (M, K) logical
    B,  # (K, N) logical
    C,  # (M, N) logical; (S, M, N) partials when split (split stride `stride_cs`)
    BIAS,  # (bias_n,) read as bias[n % bias_n]; used when HAS_BIAS
    DBIAS,  # (S, N) fp32 column sums of B; written when HAS_DBIAS
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_cs,
    bias_n,
    k_split,  # reduction length of one split
    n_win,  # window geometry of the one windowed operand (see _tile)
    KW,
    CW,
    shift,
    T,
    s_b,
    s_c,
    m_bucket,  # autotune keys only: next powers of two of M, N, K
    n_bucket,
    k_bucket,
    A_MODE: tl.constexpr,
    B_MODE: tl.constexpr,
    C_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-blocks share the B column-blocks they load (L2 reuse).
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    k_lo = split.to(tl.int64) * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # dbias: elementwise partial sums of the B tiles, reduced across rows once after the loop
    # (a cross-thread reduction per step would sit on the GEMM's critical path).
    dbias = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        a_ptrs, a_mask = _tile(A, rm[:, None], kk[None, :], M, k_hi, stride_am, stride_ak,
                               n_win, KW, CW, shift, T, s_b, s_c, A_MODE)
        b_ptrs, b_mask = _tile(B, kk[:, None], rn[None, :], k_hi, N, stride_bk, stride_bn,
                               n_win, KW, CW, shift, T, s_b, s_c, B_MODE)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if HAS_DBIAS:
            dbias += b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    if HAS_DBIAS:
        if pid_m == 0:
            tl.store(DBIAS + split * N + rn, tl.sum(dbias, axis=0), mask=rn < N)
    if HAS_BIAS:
        bias = tl.load(BIAS + rn % bias_n, mask=rn < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    c_ptrs, c_mask = _tile(C + split.to(tl.int64) * stride_cs, rm[:, None], rn[None, :], M, N,
                           stride_cm, stride_cn, n_win, KW, CW, shift, T, s_b, s_c, C_MODE)
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=c_mask)


def _configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Under the interpreter one small tile
    # (several tiles and K-steps even at test sizes); on GPUs the Triton-tutorial matmul tiles.
    # Configs that overflow shared memory (fp32 at the big tiles) fail to compile and are
    # dropped by the autotuner.
    shapes = [(32, 32, 16, 4, 1)] if interpreting() else [
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 32, 4, 4), (128, 128, 32, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": kb}, num_warps=w, num_stages=s)
            for m, n, kb, w, s in shapes]


# Power-of-two size buckets, not the exact M, N, K: a new batch x length re-tunes only when
# it crosses a power of two (M and K grow with it).
_KEY = ["m_bucket", "n_bucket", "k_bucket", "A_MODE", "B_MODE", "C_MODE", "HAS_BIAS", "HAS_DBIAS",
        "DOT_PREC"]
_gemm_tuned = triton.autotune(_configs(), key=_KEY)(_gemm)


# ----------------------------------------------------------------------------- launchers
@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(rows: int, tiles: int, device: torch.device) -> int:
    """Splits of a weight-gradient reduction over ``rows`` windows: only as many as fill one
    wave of the GPU when the output has fewer tiles than SMs (each split costs an fp32 partial
    written and read back), each reducing at least SPLIT_MIN_ROWS windows."""
    target = _num_sms(device.index or 0) if device.type == "cuda" else 4
    return max(1, min(target // max(tiles, 1), rows // SPLIT_MIN_ROWS))


def _window(t: torch.Tensor, n_win: int, k: int, shift: int, T: int) -> tuple:
    """``(n_win, KW, CW, shift, T, s_b, s_c)`` of a packed ``(B, T, C)`` tensor."""
    return (n_win, k, t.shape[2], shift, T, t.stride(0), t.stride(2))


_NO_WINDOW = (1, 1, 1, 0, 0, 0, 0)


def _packed(t: torch.Tensor) -> torch.Tensor:
    """A ``(B, T, C)`` tensor whose tokens are packed (token stride = C * channel stride), the
    only condition the window view needs; anything else is copied."""
    return t if t.stride(1) == t.shape[2] * t.stride(2) else t.contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(B, T, C) -> (B*T, C)``, a view when the leading dims merge, else a copy. The row
    count is spelled out: ``-1`` is ambiguous for C = 0."""
    M = t.shape[0] * t.shape[1]
    try:
        return t.view(M, t.shape[-1])
    except RuntimeError:
        return t.reshape(M, t.shape[-1])


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch(a, a_strides, a_mode, b, b_strides, b_mode, c, c_strides, c_mode, M, N, K, window,
            bias=None, bias_n=1, dbias=None, splits=1, k_split=None, split_stride=0) -> None:
    if M == 0 or N == 0:
        return
    k_split = K if k_split is None else k_split

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)

    _gemm_tuned[grid](
        a, b, c, bias if bias is not None else c, dbias if dbias is not None else c,
        M, N, K, *a_strides, *b_strides, *c_strides, split_stride, bias_n, k_split,
        *window, *(triton.next_power_of_2(v) for v in (M, N, K)),
        A_MODE=a_mode, B_MODE=b_mode, C_MODE=c_mode, HAS_BIAS=bias is not None,
        HAS_DBIAS=dbias is not None, DOT_PREC=_dot_prec(a.dtype), GROUP_M=8,
    )  # fmt: skip


def _weight_grad(a, a_strides, a_mode, b, b_strides, b_mode, M, N, K, window, device):
    """``(A @ B, column sums of B)`` in fp32 for a reduction over K = all windows."""
    if K == 0:  # no windows (empty batch): zero gradients
        return (torch.zeros(M, N, dtype=torch.float32, device=device),
                torch.zeros(N, dtype=torch.float32, device=device))
    splits = _num_splits(K, triton.cdiv(M, 128) * triton.cdiv(N, 128), device)
    k_split = -(-K // splits)
    k_split = -(-k_split // 64) * 64  # whole BLOCK_K steps inside each split
    splits = -(-K // k_split)
    part = torch.empty(splits, M, N, dtype=torch.float32, device=device)
    dbias = torch.empty(splits, N, dtype=torch.float32, device=device)
    _launch(a, a_strides, a_mode, b, b_strides, b_mode, part, (N, 1), PLAIN, M, N, K, window,
            dbias=dbias, splits=splits, k_split=k_split, split_stride=M * N)
    return part.sum(0), dbias.sum(0)


def merge_forward(x, weight, bias, k: int, causal: bool) -> torch.Tensor:
    x = _packed(x)
    B, T, Cin = x.shape
    Cout = weight.shape[0]
    Tm = -(-T // k)
    # wt[o, i*Cin + c] = weight[o, c, i]: row o of W'^T, window features contiguous.
    wt = weight.permute(0, 2, 1).reshape(Cout, k * Cin).to(x.dtype)  # (Cout, k*Cin)
    y = torch.empty(B, Tm, Cout, dtype=x.dtype, device=x.device)
    # B[f, o] = wt[o, f]: the transpose by strides (wt may be a view of a permuted weight).
    _launch(x, (0, 0), WIN_ROWS, wt, (wt.stride(1), wt.stride(0)), PLAIN, y, (Cout, 1), PLAIN,
            B * Tm, Cout, k * Cin, _window(x, Tm, k, k - 1 if causal else 0, T),
            bias=bias, bias_n=Cout)
    return y


def merge_backward(dy, x, weight, k: int, causal: bool):
    """``(dx, dweight, dbias_fp32)``."""
    x = _packed(x)
    B, T, Cin = x.shape
    Cout = weight.shape[0]
    Tm = -(-T // k)
    M, K = B * Tm, k * Cin
    dy2 = _rows(dy)  # (M, Cout)
    wt = weight.permute(0, 2, 1).reshape(Cout, K).to(x.dtype)  # (Cout, k*Cin)
    dx = torch.empty(B, T, Cin, dtype=x.dtype, device=x.device)
    if causal and T > 0:
        # Tokens after (Tm - 1) * k are in no window: their gradient is zero.
        dx[:, (Tm - 1) * k + 1 :].zero_()
    shift = k - 1 if causal else 0
    # dXw (M, K) = dY (M, Cout) @ W'^T (Cout, K), stored through the window.
    _launch(dy2, dy2.stride(), PLAIN, wt, wt.stride(), PLAIN, dx, (0, 0), WIN_ROWS,
            M, K, Cout, _window(dx, Tm, k, shift, T))
    # dW' (K, Cout) = Xw^T (K, M) @ dY (M, Cout); dbias = column sums of dY.
    dw, db = _weight_grad(x, (0, 0), WIN_COLS, dy2, dy2.stride(), PLAIN, K, Cout, M,
                          _window(x, Tm, k, shift, T), x.device)
    dw = dw.view(k, Cin, Cout).permute(2, 1, 0)  # [i*Cin + c, o] -> (Cout, Cin, k)
    return dx, dw.to(weight.dtype).contiguous(), db


def expand_forward(x, weight, bias, k: int, length: int) -> torch.Tensor:
    B, Tm, Cin = x.shape
    Cout = weight.shape[1]
    x2 = _rows(x)  # (M, Cin)
    # w2[c, i*Cout + o] = weight[c, o, i]
    w2 = weight.permute(0, 2, 1).reshape(Cin, k * Cout).to(x.dtype)  # (Cin, k*Cout)
    y = torch.empty(B, length, Cout, dtype=x.dtype, device=x.device)
    _launch(x2, x2.stride(), PLAIN, w2, w2.stride(), PLAIN, y, (0, 0), WIN_ROWS,
            B * Tm, k * Cout, Cin, _window(y, Tm, k, 0, length), bias=bias, bias_n=Cout)
    return y


def expand_backward(dy, x, weight, k: int):
    """``(dx, dweight, dbias_fp32)``; ``dy`` is ``(B, length, C_out)``."""
    dy = _packed(dy)
    B, Tm, Cin = x.shape
    Cout = weight.shape[1]
    M, N = B * Tm, k * Cout
    x2 = _rows(x)  # (M, Cin)
    w2 = weight.permute(0, 2, 1).reshape(Cin, N).to(x.dtype)  # (Cin, k*Cout)
    win = _window(dy, Tm, k, 0, dy.shape[1])
    dx = torch.empty(B, Tm, Cin, dtype=x.dtype, device=x.device)
    # dX (M, Cin) = dYw (M, k*Cout) @ W2^T (k*Cout, Cin); cropped tokens read as zeros.
    _launch(dy, (0, 0), WIN_ROWS, w2, (w2.stride(1), w2.stride(0)), PLAIN, dx, (Cin, 1), PLAIN,
            M, Cin, N, win)
    # dW2 (Cin, k*Cout) = X^T (Cin, M) @ dYw (M, k*Cout); dbias sums dYw's columns per o.
    dw, db = _weight_grad(x2, (x2.stride(1), x2.stride(0)), PLAIN, dy, (0, 0), WIN_ROWS,
                          Cin, N, M, win, x.device)
    dw = dw.view(Cin, k, Cout).permute(0, 2, 1)  # [c, i*Cout + o] -> (Cin, Cout, k)
    return dx, dw.to(weight.dtype).contiguous(), db.view(k, Cout).sum(0)


# ----------------------------------------------------------------------------- custom ops
# The backward ops always return a dbias (fp32, (C_out,)): a custom op cannot return an
# optional tensor; autograd drops it when there is no bias.
@torch.library.custom_op("nnfast::token_merge_fwd", mutates_args=())
def _merge_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, causal: bool
) -> torch.Tensor:
    return merge_forward(x, weight, bias, k, causal)


@_merge_fwd_op.register_fake
def _(x, weight, bias, k, causal):
    return x.new_empty(x.shape[0], -(-x.shape[1] // k), weight.shape[0])


@torch.library.custom_op("nnfast::token_merge_bwd", mutates_args=())
def _merge_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, k: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return merge_backward(dy, x, weight, k, causal)


@_merge_bwd_op.register_fake
def _(dy, x, weight, k, causal):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape[0], dtype=torch.float32))


def _merge_setup(ctx, inputs, output):
    x, weight, bias, k, causal = inputs
    ctx.save_for_backward(x, weight)
    ctx.k, ctx.causal = k, causal
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _merge_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw, db = _merge_bwd_op(dy, x, weight, ctx.k, ctx.causal)
    db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dx, dw, db, None, None


_merge_fwd_op.register_autograd(_merge_backward, setup_context=_merge_setup)


@torch.library.custom_op("nnfast::token_expand_fwd", mutates_args=())
def _expand_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, length: int
) -> torch.Tensor:
    return expand_forward(x, weight, bias, k, length)


@_expand_fwd_op.register_fake
def _(x, weight, bias, k, length):
    return x.new_empty(x.shape[0], length, weight.shape[1])


@torch.library.custom_op("nnfast::token_expand_bwd", mutates_args=())
def _expand_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return expand_backward(dy, x, weight, k)


@_expand_bwd_op.register_fake
def _(dy, x, weight, k):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape[1], dtype=torch.float32))


def _expand_setup(ctx, inputs, output):
    x, weight, bias, k, length = inputs
    ctx.save_for_backward(x, weight)
    ctx.k = k
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _expand_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw, db = _expand_bwd_op(dy, x, weight, ctx.k)
    db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dx, dw, db, None, None


_expand_fwd_op.register_autograd(_expand_backward, setup_context=_expand_setup)


# ----------------------------------------------------------------------------- entry points
def token_merge(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, causal: bool
) -> torch.Tensor:
    """``(B, T, C_in) -> (B, ceil(T / k), C_out)``; inputs validated by ``nnfast.functional``."""
    return _merge_fwd_op(x, weight, bias, int(k), bool(causal))


def token_expand(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, length: int | None
) -> torch.Tensor:
    """``(B, T_m, C_in) -> (B, length, C_out)``, ``length`` defaulting to ``T_m * k``."""
    length = x.shape[1] * k if length is None else int(length)
    return _expand_fwd_op(x, weight, bias, int(k), length)
