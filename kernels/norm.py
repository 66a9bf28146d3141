"""RMSNorm and LayerNorm as one Triton kernel family (``RMS`` constexpr flag), with an
optional fused residual add: ``s = x + residual`` is written out and ``norm(s)`` computed
in the same pass (pre-norm blocks).

Forward, per row of h (= x, or s rounded to the input's dtype, as the reference does):
    LayerNorm: mean = sum(h) / n,  rstd = 1 / sqrt(sum((h - mean)^2) / n + eps)
    RMSNorm:   mean = 0,           rstd = 1 / sqrt(sum(h^2) / n + eps)
    xhat = (h - mean) * rstd,      y = xhat * w + b
mean and rstd (fp32) are saved for the backward.

Backward. With g = dy * w (the gradient of xhat), differentiating xhat through rstd
(and, for LayerNorm, through mean) gives
    RMSNorm:   dh = rstd * (g - xhat * mean(g * xhat))
    LayerNorm: dh = rstd * (g - xhat * mean(g * xhat) - mean(g))
and dw = sum_rows(dy * xhat), db = sum_rows(dy). With a residual, s feeds both the norm
and the caller, so dx = dresidual = dh + ds.
dw/db are deterministic: each program loops over its own rows, accumulates per-column
partial sums, and writes them to row ``pid`` of a (programs, n) fp32 buffer that torch
sums afterwards; no atomics.

Two code paths in each kernel, chosen by ``ONE_PASS``: short rows sit in registers as a
(ROWS, BLOCK) tile (several rows per program for small n); longer rows (n > MAX_FUSED_FWD in
the forward, n > MAX_FUSED_BWD in the backward) are streamed in BLOCK-sized chunks,
re-reading h instead of holding it.
"""

import functools

import torch
import triton
import triton.language as tl

# Longest row held in registers in one tile; longer rows are processed in chunks. The
# backward keeps ~5 row-length fp32 vectors live (h, dy, w and the dw/db sums): at 8192
# that is 16 per thread at 16 warps, within the 128 registers a 512-thread block gets.
MAX_FUSED_FWD = 16384
MAX_FUSED_BWD = 8192
CHUNK = 4096


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _load_h(
    X,  # (M, N) input
    R,  # (M, N) residual (HAS_RES)
    S,  # (M, N) output x + residual, contiguous (STORE_S)
    x_off,  # offsets into X
    r_off,  # offsets into R
    s_off,  # offsets into S
    mask,
    HAS_RES: tl.constexpr,
    STORE_S: tl.constexpr,
):
    """The normalized input h in fp32; with a residual, s = x + r rounded to x's dtype."""
    x = tl.load(X + x_off, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + r_off, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        if STORE_S:
            tl.store(S + s_off, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _norm_fwd(
    X,  # (M, N) input, row stride stride_x, unit column stride
    R,  # (M, N) residual, row stride stride_r (HAS_RES)
    W,  # (N,) weight (HAS_W)
    B,  # (N,) bias (HAS_B)
    Y,  # (M, N) output, contiguous
    S,  # (M, N) x + residual, contiguous (HAS_RES)
    Mean,  # (M,) fp32 row means (LayerNorm only)
    Rstd,  # (M,) fp32 reciprocal standard deviations
    stride_x,
    stride_r,
    M,
    N,
    eps,
    RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program (ONE_PASS); 1 otherwise
    BLOCK: tl.constexpr,  # >= N when ONE_PASS, else the chunk length
    ONE_PASS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        rows = (pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # (ROWS,)
        row_mask = rows < M
        mask = row_mask[:, None] & (cols[None, :] < N)  # (ROWS, BLOCK)
        h = _load_h(X, R, S, rows[:, None] * stride_x + cols[None, :],
                    rows[:, None] * stride_r + cols[None, :], rows[:, None] * N + cols[None, :],
                    mask, HAS_RES, True)
        if RMS:
            xc = h
        else:
            mean = tl.sum(h, axis=1) / N
            xc = tl.where(mask, h - mean[:, None], 0.0)
            tl.store(Mean + rows, mean, mask=row_mask)
        # Two-pass variance (centered before squaring): no cancellation for large means.
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        tl.store(Rstd + rows, rstd, mask=row_mask)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # One row, streamed in chunks. 1-D tiles only, so every element stays with one thread.
        row = pid.to(tl.int64)
        x_row = row * stride_x
        r_row = row * stride_r
        s_row = row * N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for off in range(0, N, BLOCK):
            c = off + cols
            h = _load_h(X, R, S, x_row + c, r_row + c, s_row + c, c < N, HAS_RES, True)
            if RMS:
                acc += h * h
            else:
                acc += h
        if RMS:
            mean = 0.0
            var = tl.sum(acc, axis=0) / N
        else:
            mean = tl.sum(acc, axis=0) / N
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for off in range(0, N, BLOCK):
                c = off + cols
                h = _load_h(X, R, S, x_row + c, r_row + c, s_row + c, c < N, HAS_RES, False)
                d = tl.where(c < N, h - mean, 0.0)
                acc += d * d
            var = tl.sum(acc, axis=0) / N
            tl.store(Mean + row, mean)
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(Rstd + row, rstd)
        for off in range(0, N, BLOCK):
            c = off + cols
            h = _load_h(X, R, S, x_row + c, r_row + c, s_row + c, c < N, HAS_RES, False)
            y = (h - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + c, mask=c < N, other=0.0).to(tl.float32)
            tl.store(Y + s_row + c, y.to(Y.dtype.element_ty), mask=c < N)


@triton.jit
def _norm_bwd(
    DY,  # (M, N) gradient of y, row stride stride_dy, unit column stride
    DS,  # (M, N) gradient of s, row stride stride_ds (HAS_DS)
    H,  # (M, N) the normalized input (x, or s), row stride stride_h
    W,  # (N,) weight (HAS_W)
    Mean,  # (M,) fp32 (LayerNorm only)
    Rstd,  # (M,) fp32
    DX,  # (M, N) gradient of h (plus ds), contiguous
    DW,  # (P, N) fp32 per-program partial sums of dy * xhat (HAS_W)
    DB,  # (P, N) fp32 per-program partial sums of dy (HAS_DB)
    stride_dy,
    stride_ds,
    stride_h,
    M,
    N,
    blocks_per_program,  # row blocks (of ROWS rows) each program handles, consecutively
    RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_DS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    first = pid * blocks_per_program
    if ONE_PASS:
        col_mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        db = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, blocks_per_program):
            rows = ((first + i) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # (ROWS,)
            row_mask = rows < M
            mask = row_mask[:, None] & col_mask[None, :]  # (ROWS, BLOCK)
            c2d = cols[None, :]
            h = tl.load(H + rows[:, None] * stride_h + c2d, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + c2d, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
            if RMS:
                xhat = h * rstd[:, None]
            else:
                mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
                xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=1) / N
            if RMS:
                dx = (g - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, axis=1) / N
                dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_DS:
                dx += tl.load(DS + rows[:, None] * stride_ds + c2d, mask=mask, other=0.0).to(
                    tl.float32
                )
            tl.store(DX + rows[:, None] * N + c2d, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_W:
                dw += tl.sum(dy * xhat, axis=0)
            if HAS_DB:
                db += tl.sum(dy, axis=0)
        if HAS_W:
            tl.store(DW + pid * N + cols, dw, mask=col_mask)
        if HAS_DB:
            tl.store(DB + pid * N + cols, db, mask=col_mask)
    else:
        # Rows streamed in chunks (ROWS == 1): a first sweep for mean(g * xhat) and mean(g),
        # a second for dx. The partial sums are read-modify-written in 1-D tiles, so each
        # element's load and store happen in the same thread; DW/DB start zeroed.
        for i in range(0, blocks_per_program):
            row = (first + i).to(tl.int64)
            valid = row < M
            lim = tl.where(valid, N, 0)  # columns to touch: none past the last row
            rstd = tl.load(Rstd + row, mask=valid, other=0.0)
            if RMS:
                mean = 0.0
            else:
                mean = tl.load(Mean + row, mask=valid, other=0.0)
            acc1 = tl.zeros((BLOCK,), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
            for off in range(0, N, BLOCK):
                c = off + cols
                m = c < lim
                h = tl.load(H + row * stride_h + c, mask=m, other=0.0).to(tl.float32)
                g = tl.load(DY + row * stride_dy + c, mask=m, other=0.0).to(tl.float32)
                if HAS_W:
                    g = g * tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)
                acc1 += g * tl.where(m, (h - mean) * rstd, 0.0)
                acc2 += g
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            for off in range(0, N, BLOCK):
                c = off + cols
                m = c < lim
                h = tl.load(H + row * stride_h + c, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride_dy + c, mask=m, other=0.0).to(tl.float32)
                xhat = tl.where(m, (h - mean) * rstd, 0.0)
                if HAS_W:
                    g = dy * tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)
                else:
                    g = dy
                if RMS:
                    dx = (g - xhat * c1) * rstd
                else:
                    dx = (g - xhat * c1 - c2) * rstd
                if HAS_DS:
                    dx += tl.load(DS + row * stride_ds + c, mask=m, other=0.0).to(tl.float32)
                tl.store(DX + row * N + c, dx.to(DX.dtype.element_ty), mask=m)
                if HAS_W:
                    p = tl.load(DW + pid * N + c, mask=c < N, other=0.0)
                    tl.store(DW + pid * N + c, p + dy * xhat, mask=c < N)
                if HAS_DB:
                    p = tl.load(DB + pid * N + c, mask=c < N, other=0.0)
                    tl.store(DB + pid * N + c, p + dy, mask=c < N)


# ----------------------------------------------------------------------------- launchers
@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tile(n: int, max_fused: int) -> tuple[int, int, bool, int]:
    """(ROWS, BLOCK, ONE_PASS, num_warps) for rows of length n."""
    if n > max_fused:
        return 1, CHUNK, False, 8
    block = max(triton.next_power_of_2(n), 16)
    # Small rows: several per program so each program moves >= ~4K elements.
    rows = min(max(4096 // block, 1), 64)
    elems = rows * block
    num_warps = 4 if elems <= 1024 else 8 if elems <= 4096 else 16 if elems <= 8192 else 32
    return rows, block, True, num_warps


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def norm_fwd_impl(x, weight, bias, residual, eps: float, rms: bool):
    """x, residual: (M, n) with unit column stride; weight, bias: (n,) contiguous."""
    M, n = x.shape
    y = torch.empty((M, n), dtype=x.dtype, device=x.device)
    s = torch.empty((M, n) if residual is not None else (0,), dtype=x.dtype, device=x.device)
    mean = torch.empty((0 if rms else M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, s, mean, rstd
    rows, block, one_pass, num_warps = _tile(n, MAX_FUSED_FWD)
    dummy = rstd
    _norm_fwd[(triton.cdiv(M, rows),)](
        x, residual if residual is not None else x,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        y, s, mean if not rms else dummy, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0,
        M, n, eps,
        RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_RES=residual is not None, ROWS=rows, BLOCK=block, ONE_PASS=one_pass,
        num_warps=num_warps,
    )
    return y, s, mean, rstd


def norm_bwd_impl(dy, ds, h, weight, mean, rstd, rms: bool, has_bias: bool):
    """Returns (dx, dw, db); dw/db in fp32, empty when there is no weight/bias."""
    M, n = h.shape
    dy, ds = _unit_stride(dy), _unit_stride(ds)
    dx = torch.empty((M, n), dtype=h.dtype, device=h.device)
    rows, block, one_pass, num_warps = _tile(n, MAX_FUSED_BWD)
    row_blocks = triton.cdiv(M, rows)
    if h.device.type == "cuda":
        target = 2 * _sm_count(h.device.index if h.device.index is not None else 0)
    else:
        target = 4  # the interpreter runs programs one after another
    programs = max(min(row_blocks, target), 1)
    per_program = triton.cdiv(row_blocks, programs) if row_blocks else 0
    programs = triton.cdiv(row_blocks, per_program) if row_blocks else 1
    # Zeroed: the chunked path accumulates into them in place.
    alloc = torch.zeros if not one_pass else torch.empty
    has_w = weight is not None
    dw = alloc((programs if has_w else 0, n), dtype=torch.float32, device=h.device)
    db = alloc((programs if has_bias else 0, n), dtype=torch.float32, device=h.device)
    if M > 0:
        _norm_bwd[(programs,)](
            dy, ds if ds is not None else dy, h, weight if has_w else rstd,
            mean if not rms else rstd, rstd, dx, dw if has_w else rstd, db if has_bias else rstd,
            dy.stride(0), ds.stride(0) if ds is not None else 0, h.stride(0),
            M, n, per_program,
            RMS=rms, HAS_W=has_w, HAS_DB=has_bias, HAS_DS=ds is not None,
            ROWS=rows, BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps,
        )
    elif has_w or has_bias:
        dw.zero_()
        db.zero_()
    # The deterministic final reduction over programs, in fp32 (the caller casts).
    dw = dw.sum(0) if has_w else dw.new_empty(0)
    db = db.sum(0) if has_bias else db.new_empty(0)
    return dx, dw, db


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op(
    "nnfast::norm_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool rms)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
)
def _norm_fwd_op(x, weight, bias, residual, eps, rms):
    return norm_fwd_impl(x, weight, bias, residual, eps, rms)


@_norm_fwd_op.register_fake
def _(x, weight, bias, residual, eps, rms):
    M, n = x.shape
    return (
        x.new_empty((M, n)),
        x.new_empty((M, n) if residual is not None else (0,)),
        x.new_empty((0 if rms else M,), dtype=torch.float32),
        x.new_empty((M,), dtype=torch.float32),
    )


@torch.library.custom_op(
    "nnfast::norm_bwd",
    mutates_args=(),
    schema="(Tensor dy, Tensor? ds, Tensor h, Tensor? weight, Tensor mean, Tensor rstd,"
    " bool rms, bool has_bias) -> (Tensor, Tensor, Tensor)",
)
def _norm_bwd_op(dy, ds, h, weight, mean, rstd, rms, has_bias):
    return norm_bwd_impl(dy, ds, h, weight, mean, rstd, rms, has_bias)


@_norm_bwd_op.register_fake
def _(dy, ds, h, weight, mean, rstd, rms, has_bias):
    n = h.shape[1]
    f32 = torch.float32
    return (
        h.new_empty(h.shape),
        h.new_empty((n if weight is not None else 0,), dtype=f32),
        h.new_empty((n if has_bias else 0,), dtype=f32),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, rms = inputs
    _, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.rms = rms
    ctx.has_res = residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, ds, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    has_bias = ctx.bias_dtype is not None
    ds = ds if ctx.has_res else None
    dx, dw, db = _norm_bwd_op(dy, ds, h, weight, mean, rstd, ctx.rms, has_bias)
    return (
        dx,
        dw.to(weight.dtype) if weight is not None else None,
        db.to(ctx.bias_dtype) if has_bias else None,
        dx if ctx.has_res else None,
        None,
        None,
    )


_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- entry
def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) -> (M, n) with unit column stride (a view where possible)."""
    return _unit_stride(t.reshape(-1, n))


def layer_norm(
    x: torch.Tensor,
    n: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as ``nnfast.reference.norm.layer_norm``: ``(y, s)``."""
    if x.numel() == 0:  # nothing to normalize (n = 0 has no (M, n) view): the reference
        from nnfast.reference.norm import layer_norm as reference

        return reference(x, n, weight, bias, eps, rms, residual)
    w = weight.reshape(n).contiguous() if weight is not None else None
    b = bias.reshape(n).contiguous() if bias is not None else None
    r = _rows(residual, n) if residual is not None else None
    y, s, _, _ = _norm_fwd_op(_rows(x, n), w, b, r, eps, rms)
    return y.view(x.shape), (s.view(x.shape) if residual is not None else None)
