"""Cross-entropy kernels: the fused ``cross_entropy(x @ W.T + b, target)`` without the
``(N, V)`` logits of the whole batch ever existing (Liger-Kernel's scheme), and a plain
``cross_entropy(logits, target)`` on given logits.

Fused linear + cross-entropy. The rows are processed in chunks. For each chunk:

1. ``logits = x_chunk @ W.T (+ b)`` with cuBLAS, in the input's dtype (an fp32 weight
   under bf16 autocast is cast once, as autocast casts a Linear's weight);
2. one Triton program per row computes ``lse = logsumexp(logits)`` online (pass 1 over
   the vocabulary in blocks) and the row's loss, then (pass 2) overwrites the logits IN
   PLACE with ``dloss/dlogits`` (times 1/n_valid for "mean", as ``F.cross_entropy``'s
   own fp32 -> low-precision gradient is scaled);
3. ``grad_x_chunk = dlogits @ W`` written straight into grad_x (x's dtype), and
   ``grad_W += dlogits.T @ x_chunk`` in ``accum_dtype`` (default: the weight's dtype;
   fp32 accumulation inside each GEMM, one rounding per chunk; the first chunk writes
   with beta=0, so grad_W is never zero-filled), ``grad_b += dlogits.sum(0)`` in fp32.

So the gradients are computed in the FORWARD, when autograd will need them: the logits
are never stored, and the backward only multiplies the stored gradients IN PLACE by the
incoming scalar ``grad_output`` (one pass over grad_W, no new buffer). The unused
gradient outputs are non-differentiable and not materialized (no zero (V, C) buffer).
Memory beyond the inputs, the weight and the gradients: one chunk of logits, sized to at
most half the weight's bytes, plus the weight's low-precision cast where autocast needs
one (half an fp32 weight): at most 1x the weight's bytes (``benchmarks/
test_cross_entropy.py`` measures it).

Derivation, with smoothing ``eps`` over ``V`` classes (torch's definition: the target
distribution is ``(1 - eps) * onehot(t) + eps / V``):

    loss = lse - (1 - eps) * z_t - (eps / V) * sum_j z_j
    dloss/dz_j = softmax(z)_j - (1 - eps) * [j == t] - eps / V

Rows whose target is ``ignore_index`` have loss 0 and gradient 0. ``reduction="mean"``
divides by the number of non-ignored rows, clamped to at least 1: an all-ignored batch
gives 0 and zero gradients (``F.cross_entropy`` gives NaN).

``reduction="none"`` gets a per-row ``grad_output``, which cannot be applied to an
already summed ``grad_W``; that path computes only the losses in the forward and
recomputes the chunks in the backward with the per-row scale folded into the kernel
(one extra logits matmul, same peak memory).

Plain cross-entropy on logits: the forward (pass 1) stores each row's loss and lse; the
backward (pass 2 alone) writes ``dlogits`` from the logits and the lse, scaled by the
incoming gradient, into a new tensor of the logits' dtype. Nothing of size (N, V) is kept
besides the logits autograd holds anyway.

Deterministic: cuBLAS matmuls of fixed shapes, one program per row, no atomics.
Out-of-range targets (not ``ignore_index``) are not checked here (that would need a
device sync; ``nnfast.functional`` validates them): their ``z_t`` reads as 0.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from nnfast._backend import interpreting

# Largest fp32-equivalent size of one chunk of logits (rows * V * 4 bytes), on top of the
# weight-relative bound in _chunk_rows. Tests shrink it to force many chunks.
CHUNK_BYTES = 512 * 1024 * 1024
# One chunk of logits (and its fp32 copies, where a fallback needs them) takes at most
# this fraction of the weight's bytes: with the weight's cast, at most 1x in all.
CHUNK_OF_WEIGHT = 0.5
# Vocabulary block of one loop iteration in the row kernel.
MAX_BLOCK_V = 4096
# Leading dimension of the logits buffer rounded up to this many elements, so that
# cuBLAS and the kernel see aligned rows even for V = 50257.
ROW_ALIGN = 64


@triton.jit
def _ce_rows(
    logits_ptr,  # (R, V), row stride `stride_row`, any float dtype
    stride_row,
    grad_ptr,  # (R, V), row stride `stride_grad`: dloss/dlogits (may be logits_ptr)
    stride_grad,
    target_ptr,  # (R,) int32/int64
    loss_ptr,  # (R,) fp32 per-row loss (written by FORWARD)
    lse_ptr,  # (R,) fp32 per-row logsumexp (written by FORWARD, read otherwise)
    scale_ptr,  # gradient scale: row r reads scale_ptr[r * stride_scale]
    stride_scale,
    V,
    ignore_index,
    smoothing,  # label smoothing eps, fp32
    FORWARD: tl.constexpr,  # pass 1: lse and loss
    HAS_GRAD: tl.constexpr,  # pass 2: the gradient
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    t = tl.load(target_ptr + row).to(tl.int64)
    valid = t != ignore_index
    offs = tl.arange(0, BLOCK_V)

    if FORWARD:
        # Online logsumexp. Every block holds at least one real column, so the block
        # max is finite and exp(m - m_new) is 0 (not NaN) on the first block.
        m = float("-inf")
        d = 0.0
        sum_z = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            z = tl.load(ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
            sum_z += tl.sum(tl.where(mask, z, 0.0), 0)
        lse = m + tl.log(d)
        in_range = valid & (t >= 0) & (t < V)
        z_t = tl.load(ptr + t, mask=in_range, other=0.0).to(tl.float32)
        loss = lse - (1.0 - smoothing) * z_t - smoothing * sum_z / V
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
        tl.store(lse_ptr + row, lse)
    else:
        lse = tl.load(lse_ptr + row)

    if HAS_GRAD:
        # The row is hot in L2 after pass 1 (fused path) or read once (plain backward).
        s = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
        eps_v = smoothing / V
        gptr = grad_ptr + row * stride_grad
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - eps_v
            g = tl.where(cols == t, g - (1.0 - smoothing), g)
            g = tl.where(valid, g * s, 0.0)
            tl.store(gptr + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
def _launch_rows(logits, grad, target, loss, lse, scale, label_smoothing, ignore_index,
                 forward: bool, has_grad: bool) -> None:
    """One program per row of ``logits`` (R, V); ``scale`` is 0-d (every row) or (R,)."""
    R, V = logits.shape
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    num_warps = 1 if interpreting() else (16 if block_v >= 4096 else 8)
    _ce_rows[(R,)](
        logits, logits.stride(0), grad, grad.stride(0), target, loss, lse,
        scale, scale.stride(0) if scale.dim() else 0,
        V, ignore_index, label_smoothing,
        FORWARD=forward, HAS_GRAD=has_grad, BLOCK_V=block_v, num_warps=num_warps,
    )


@functools.cache
def _fp32_out_mm_ok(device: str) -> bool:
    """Whether ``addmm(..., out_dtype=float32)`` (cuBLAS fp16/bf16 in, fp32 out, torch
    >= 2.8; not on CPU) works here; probed once on a tiny case and checked against fp32."""
    try:
        a = torch.randn(8, 16, device=device, dtype=torch.bfloat16)
        b = torch.randn(16, 4, device=device, dtype=torch.bfloat16)
        c = torch.ones(8, 4, device=device, dtype=torch.float32)
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
        return bool(torch.allclose(c, 1 + a.float() @ b.float(), atol=1e-2, rtol=1e-2))
    except Exception:  # any failure means: use the fallback
        return False


def _needs_fp32_copies(accum: torch.dtype, x: torch.Tensor) -> bool:
    """Whether a (V, C) fp32 accumulation from low-precision chunks must cast the chunks."""
    return accum != x.dtype and not _fp32_out_mm_ok(str(x.device))


def _accumulate_wgrad(grad_w: torch.Tensor, dlogits: torch.Tensor, x: torch.Tensor,
                      first: bool) -> None:
    """grad_w (V, C) (+)= dlogits.T (V, R) @ x (R, C): the GEMM accumulates in fp32 and
    rounds into grad_w's dtype once per chunk; the first chunk overwrites (beta=0), so
    grad_w may start uninitialized."""
    beta = 0 if first else 1
    if grad_w.dtype == dlogits.dtype:
        torch.addmm(grad_w, dlogits.t(), x, beta=beta, out=grad_w)
    elif not _needs_fp32_copies(grad_w.dtype, x):
        torch.addmm(grad_w, dlogits.t(), x, beta=beta, out_dtype=grad_w.dtype, out=grad_w)
    else:  # fp32 copies of the chunk (counted in the chunk's memory budget)
        torch.addmm(grad_w, dlogits.t().to(grad_w.dtype), x.to(grad_w.dtype), beta=beta,
                    out=grad_w)


def _chunk_rows(N: int, V: int, C: int, ld: int, x_dtype: torch.dtype,
                w_dtype: torch.dtype, fp32_copies: bool = False) -> int:
    """Rows per chunk: at most CHUNK_BYTES of fp32-equivalent logits and at most
    CHUNK_OF_WEIGHT of the weight's bytes for one chunk (its fp32 copies included),
    chunks balanced."""
    row_bytes = ld * x_dtype.itemsize + (4 * (ld + C) if fp32_copies else 0)
    weight_budget = int(CHUNK_OF_WEIGHT * V * C * w_dtype.itemsize)
    max_rows = max(1, min(CHUNK_BYTES // (4 * V), weight_budget // row_bytes))
    n_chunks = triton.cdiv(max(N, 1), max_rows)
    return triton.cdiv(max(N, 1), n_chunks)


def _chunked(
    x: torch.Tensor,  # (N, C)
    weight: torch.Tensor,  # (V, C)
    target: torch.Tensor,  # (N,)
    bias: torch.Tensor | None,  # (V,)
    ignore_index: int,
    label_smoothing: float,
    need: tuple[bool, bool, bool],  # gradients wanted for (x, weight, bias)
    scale: torch.Tensor,  # fp32 gradient scale: 0-d (every row) or (N,)
    accum_dtype: torch.dtype,  # grad_w's dtype
):
    """Per-row losses (N,) fp32 and the gradients times ``scale`` (empty where not
    wanted): grad_x (N, C) in x's dtype, grad_w (V, C) in accum_dtype, grad_b (V,) fp32."""
    N, C = x.shape
    V = weight.shape[0]
    x = x.contiguous()
    target = target.contiguous()
    w = weight.to(x.dtype).contiguous()  # autocast's cast of the Linear weight
    b = None if bias is None else bias.to(x.dtype)
    any_grad = any(need)
    loss = torch.empty(N, device=x.device, dtype=torch.float32)
    lse = torch.empty(N, device=x.device, dtype=torch.float32)
    # Distinct empty tensors where a gradient is not wanted (custom op outputs may not alias).
    grad_x = torch.empty_like(x) if need[0] else x.new_empty(0)
    grad_w = (torch.empty(V, C, device=x.device, dtype=accum_dtype) if need[1]
              else x.new_empty(0))
    grad_b = torch.zeros(V, device=x.device, dtype=torch.float32) if need[2] else x.new_empty(0)

    ld = triton.cdiv(V, ROW_ALIGN) * ROW_ALIGN
    copies = need[1] and _needs_fp32_copies(accum_dtype, x)
    rows = _chunk_rows(N, V, C, ld, x.dtype, weight.dtype, copies)
    buf = torch.empty(min(rows, N) * ld, device=x.device, dtype=x.dtype)
    for start in range(0, N, rows):
        end = min(start + rows, N)
        R = end - start
        xc = x[start:end]  # (R, C)
        logits = buf[: R * ld].view(R, ld)[:, :V]  # (R, V), row stride ld
        if b is None:
            torch.mm(xc, w.t(), out=logits)
        else:
            torch.addmm(b, xc, w.t(), out=logits)
        _launch_rows(logits, logits, target[start:end], loss[start:end], lse[start:end],
                     scale[start:end] if scale.dim() else scale, label_smoothing,
                     ignore_index, forward=True, has_grad=any_grad)
        if not any_grad:
            continue
        # logits now holds dloss/dlogits (R, V)
        if need[0]:
            torch.mm(logits, w, out=grad_x[start:end])
        if need[1]:
            _accumulate_wgrad(grad_w, logits, xc, first=start == 0)
        if need[2]:
            grad_b += logits.sum(0, dtype=torch.float32)
    if need[1] and N == 0:
        grad_w.zero_()
    return loss, grad_x, grad_w, grad_b


def _grad_scale(target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """0-d fp32 gradient scale of a reduced loss: 1/n_valid for mean (n_valid clamped to
    >= 1, computed on the device: no sync), 1 for sum."""
    if reduction == "mean":
        n_valid = (target != ignore_index).sum().clamp(min=1).to(torch.float32)
        return 1.0 / n_valid
    return torch.ones((), device=target.device, dtype=torch.float32)


def _reduce(loss: torch.Tensor, scale: torch.Tensor, reduction: str) -> torch.Tensor:
    return loss if reduction == "none" else loss.sum() * scale


# ----------------------------------------------------------------------------- linear CE ops
@torch.library.custom_op("nnfast::cross_entropy_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    accum_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad_x, grad_w, grad_b): the reduced loss and, for mean/sum, the
    gradients for grad_output = 1 (empty where not wanted, and always for 'none')."""
    need = (need_x, need_weight, need_bias)
    if reduction == "none":
        need = (False, False, False)  # recomputed in the backward with per-row scales
    with torch.autocast(x.device.type, enabled=False):
        scale = _grad_scale(target, ignore_index, reduction)
        loss, gx, gw, gb = _chunked(x, weight, target, bias, ignore_index, label_smoothing,
                                    need, scale, accum_dtype)
        return _reduce(loss, scale, reduction), gx, gw, gb


@_fwd_op.register_fake
def _(x, weight, target, bias, ignore_index, reduction, label_smoothing, need_x, need_weight,
      need_bias, accum_dtype):
    N, C = x.shape
    V = weight.shape[0]
    grads = reduction != "none"
    loss = x.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    gx = x.new_empty((N, C) if grads and need_x else (0,))
    gw = x.new_empty((V, C), dtype=accum_dtype) if grads and need_weight else x.new_empty(0)
    gb = x.new_empty((V,) if grads and need_bias else (0,), dtype=torch.float32)
    return loss, gx, gw, gb


@torch.library.custom_op("nnfast::cross_entropy_bwd", mutates_args=())
def _bwd_op(
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    accum_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction='none' backward: recompute the chunks with grad_loss (N,) per row."""
    with torch.autocast(x.device.type, enabled=False):
        scale = grad_loss.to(torch.float32).contiguous()
        need = (need_x, need_weight, need_bias)
        _, gx, gw, gb = _chunked(x, weight, target, bias, ignore_index, label_smoothing, need,
                                 scale, accum_dtype)
    return gx, gw, gb


@_bwd_op.register_fake
def _(grad_loss, x, weight, target, bias, ignore_index, label_smoothing, need_x, need_weight,
      need_bias, accum_dtype):
    N, C = x.shape
    V = weight.shape[0]
    gx = x.new_empty((N, C) if need_x else (0,))
    gw = x.new_empty((V, C), dtype=accum_dtype) if need_weight else x.new_empty(0)
    gb = x.new_empty((V,) if need_bias else (0,), dtype=torch.float32)
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    x, weight, target, bias, ignore_index, reduction, label_smoothing, nx, nw, nb, acc = inputs
    ctx.reduction = reduction
    ctx.args = (ignore_index, label_smoothing, nx, nw, nb, acc)
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    # The stored gradients are outputs nobody differentiates: no zero (V, C) gradient
    # is made for them in the backward.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    if reduction == "none":
        ctx.save_for_backward(x, weight, target, bias)
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_unused):
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    if ctx.reduction == "none":
        x, weight, target, bias = ctx.saved_tensors
        gx, gw, gb = _bwd_op(grad_loss, x, weight, target, bias, *ctx.args)
    else:
        # The forward computed the gradients for grad_output = 1: scale them by it, in
        # place (the stored gradients are used once; a second backward through the same
        # graph fails autograd's saved-tensor version check instead of scaling twice).
        gx, gw, gb = ctx.saved_tensors
        g = grad_loss.to(torch.float32)
        _, _, nx, nw, nb, _ = ctx.args
        gx = gx.mul_(g) if nx else gx
        gw = gw.mul_(g) if nw else gw
        gb = gb.mul_(g) if nb else gb
    _, _, nx, nw, nb, _ = ctx.args
    dx = gx if nx else None
    dw = gw.to(w_dtype) if nw else None  # no copy unless accum_dtype differs
    db = gb.to(b_dtype) if nb else None
    return dx, dw, None, db, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- plain CE ops
@torch.library.custom_op("nnfast::plain_cross_entropy_fwd", mutates_args=())
def _plain_fwd_op(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss in the logits' dtype, per-row lse fp32) of logits (N, V)."""
    N = logits.shape[0]
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    if N:
        _launch_rows(logits, logits, target, loss, lse, loss, label_smoothing, ignore_index,
                     forward=True, has_grad=False)
    scale = _grad_scale(target, ignore_index, reduction)
    return _reduce(loss, scale, reduction).to(logits.dtype), lse


@_plain_fwd_op.register_fake
def _(logits, target, ignore_index, reduction, label_smoothing):
    N = logits.shape[0]
    loss = logits.new_empty((N,) if reduction == "none" else ())
    return loss, logits.new_empty((N,), dtype=torch.float32)


@torch.library.custom_op("nnfast::plain_cross_entropy_bwd", mutates_args=())
def _plain_bwd_op(
    grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, reduction: str, label_smoothing: float,
) -> torch.Tensor:
    """dloss/dlogits (N, V) in the logits' dtype, times the incoming gradient."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    scale = grad_loss.to(torch.float32)
    if reduction != "none":
        scale = scale * _grad_scale(target, ignore_index, reduction)
    if logits.shape[0]:
        _launch_rows(logits, grad, target, lse, lse, scale.contiguous(), label_smoothing,
                     ignore_index, forward=False, has_grad=True)
    return grad


@_plain_bwd_op.register_fake
def _(grad_loss, logits, target, lse, ignore_index, reduction, label_smoothing):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _plain_setup_context(ctx, inputs, output):
    logits, target, ignore_index, reduction, label_smoothing = inputs
    ctx.args = (ignore_index, reduction, label_smoothing)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, target, output[1])


def _plain_backward(ctx, grad_loss, _unused):
    logits, target, lse = ctx.saved_tensors
    return _plain_bwd_op(grad_loss, logits, target, lse, *ctx.args), None, None, None, None


_plain_fwd_op.register_autograd(_plain_backward, setup_context=_plain_setup_context)


# ----------------------------------------------------------------------------- entries
def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    accum_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    x = input.reshape(-1, input.shape[-1])  # (N, C)
    t = target.reshape(-1)  # (N,)
    grad = torch.is_grad_enabled()
    need_x = grad and x.requires_grad
    need_w = grad and weight.requires_grad
    need_b = grad and bias is not None and bias.requires_grad
    loss = _fwd_op(x, weight, t, bias, ignore_index, reduction, label_smoothing,
                   need_x, need_w, need_b, accum_dtype or weight.dtype)[0]
    return loss.reshape(target.shape) if reduction == "none" else loss


def cross_entropy(input, target, ignore_index: int, reduction: str, label_smoothing: float):
    """``F.cross_entropy`` of logits ``input`` (N, V) (last dim contiguous or copied)."""
    logits = input if input.stride(-1) == 1 else input.contiguous()
    return _plain_fwd_op(logits, target.contiguous(), ignore_index, reduction,
                         label_smoothing)[0]
