"""Fused linear + cross-entropy: ``cross_entropy(x @ W.T + b, target)`` without the
``(N, V)`` logits of the whole batch ever existing (Liger-Kernel's scheme).

The rows are processed in chunks. For each chunk:

1. ``logits = x_chunk @ W.T (+ b)`` with cuBLAS, in the input's dtype (an fp32 weight
   under bf16 autocast is cast once, as autocast casts a Linear's weight);
2. one Triton program per row computes ``lse = logsumexp(logits)`` online (pass 1 over
   the vocabulary in blocks) and the row's loss, then (pass 2) overwrites the logits IN
   PLACE with ``dloss/dlogits``;
3. ``grad_x_chunk = dlogits @ W`` and ``grad_W += dlogits.T @ x_chunk`` (fp32 buffer),
   ``grad_b += dlogits.sum(0)``.

So the gradients are computed in the FORWARD, when autograd will need them: the logits
are never stored, and the backward only multiplies the stored gradients by the incoming
scalar ``grad_output``. Peak memory is one chunk of logits plus an fp32 ``(V, C)`` buffer.

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

Deterministic: cuBLAS matmuls of fixed shapes, one program per row, no atomics.
Out-of-range targets (not ``ignore_index``) are not checked (that would need a device
sync): their ``z_t`` reads as 0.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from nnfast._backend import interpreting

# Largest fp32-equivalent size of one chunk of logits (rows * V * 4 bytes). The chunk
# is stored in the input's dtype, so a bf16 chunk takes half of this. Tests shrink it
# to force many chunks.
CHUNK_BYTES = 512 * 1024 * 1024
# Vocabulary block of one loop iteration in the row kernel.
MAX_BLOCK_V = 4096
# Leading dimension of the logits buffer rounded up to this many elements, so that
# cuBLAS and the kernel see aligned rows even for V = 50257.
ROW_ALIGN = 64


@triton.jit
def _ce_rows(
    logits_ptr,  # (R, V) with row stride `stride_row`, input dtype; gets dloss/dlogits
    stride_row,
    target_ptr,  # (R,) int32/int64
    loss_ptr,  # (R,) fp32 per-row loss
    scale_ptr,  # (R,) fp32 per-row gradient scale (read only when HAS_SCALE)
    V,
    ignore_index,
    smoothing,  # label smoothing eps, fp32
    HAS_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    t = tl.load(target_ptr + row).to(tl.int64)
    valid = t != ignore_index
    in_range = valid & (t >= 0) & (t < V)
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: online logsumexp. Every block holds at least one real column, so the
    # block max is finite and exp(m - m_new) is 0 (not NaN) on the first block.
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
    z_t = tl.load(ptr + t, mask=in_range, other=0.0).to(tl.float32)
    loss = lse - (1.0 - smoothing) * z_t - smoothing * sum_z / V
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

    if HAS_GRAD:
        # Pass 2: overwrite the logits with the gradient (the row is hot in L2).
        if HAS_SCALE:
            s = tl.load(scale_ptr + row).to(tl.float32)
        else:
            s = 1.0
        eps_v = smoothing / V
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - eps_v
            g = tl.where(cols == t, g - (1.0 - smoothing), g)
            g = tl.where(valid, g * s, 0.0)
            tl.store(ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
def _chunk_rows(N: int, V: int) -> int:
    """Rows per chunk: at most CHUNK_BYTES of fp32-equivalent logits, chunks balanced."""
    max_rows = max(1, CHUNK_BYTES // (4 * V))
    n_chunks = triton.cdiv(max(N, 1), max_rows)
    return triton.cdiv(max(N, 1), n_chunks)


@functools.cache
def _fp32_out_mm_ok(device: str) -> bool:
    """Whether ``addmm(..., out_dtype=float32)`` (cuBLAS fp16/bf16 in, fp32 out, torch
    >= 2.8) works here; probed once on a tiny case and checked against fp32."""
    try:
        a = torch.randn(8, 16, device=device, dtype=torch.bfloat16)
        b = torch.randn(16, 4, device=device, dtype=torch.bfloat16)
        c = torch.ones(8, 4, device=device, dtype=torch.float32)
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
        return bool(torch.allclose(c, 1 + a.float() @ b.float(), atol=1e-2, rtol=1e-2))
    except Exception:  # any failure means: use the fallback
        return False


def _accumulate_wgrad(grad_w: torch.Tensor, dlogits: torch.Tensor, x: torch.Tensor) -> None:
    """grad_w (V, C) fp32 += dlogits.T (V, R) @ x (R, C), accumulated in fp32 across
    chunks: rounding each chunk's partial to bf16 would add error per chunk."""
    if dlogits.dtype == torch.float32:
        grad_w.addmm_(dlogits.t(), x)
    elif dlogits.is_cuda and _fp32_out_mm_ok(str(dlogits.device)):
        torch.addmm(grad_w, dlogits.t(), x, out_dtype=torch.float32, out=grad_w)
    elif dlogits.is_cuda:
        grad_w += torch.mm(dlogits.t(), x).float()
    else:  # CPU (interpreter): fp32 matmul, exact enough and simple
        grad_w.addmm_(dlogits.t().float(), x.float())


def _chunked(
    x: torch.Tensor,  # (N, C)
    weight: torch.Tensor,  # (V, C)
    target: torch.Tensor,  # (N,)
    bias: torch.Tensor | None,  # (V,)
    ignore_index: int,
    label_smoothing: float,
    need: tuple[bool, bool, bool],  # gradients wanted for (x, weight, bias)
    row_scale: torch.Tensor | None = None,  # (N,) fp32 per-row gradient scale
):
    """Per-row losses (N,) fp32 and the unscaled gradients (empty where not wanted):
    grad_x (N, C) in x's dtype, grad_w (V, C) fp32, grad_b (V,) fp32."""
    N, C = x.shape
    V = weight.shape[0]
    x = x.contiguous()
    target = target.contiguous()
    w = weight.to(x.dtype).contiguous()  # autocast's cast of the Linear weight
    b = None if bias is None else bias.to(x.dtype)
    any_grad = any(need)
    loss = torch.empty(N, device=x.device, dtype=torch.float32)
    # Distinct empty tensors where a gradient is not wanted (custom op outputs may not alias).
    grad_x = torch.empty_like(x) if need[0] else x.new_empty(0)
    grad_w = torch.zeros(V, C, device=x.device, dtype=torch.float32) if need[1] else x.new_empty(0)
    grad_b = torch.zeros(V, device=x.device, dtype=torch.float32) if need[2] else x.new_empty(0)

    rows = _chunk_rows(N, V)
    ld = triton.cdiv(V, ROW_ALIGN) * ROW_ALIGN
    buf = torch.empty(min(rows, N) * ld, device=x.device, dtype=x.dtype)
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    num_warps = 1 if interpreting() else (16 if block_v >= 4096 else 8)
    for start in range(0, N, rows):
        end = min(start + rows, N)
        R = end - start
        xc = x[start:end]  # (R, C)
        logits = buf[: R * ld].view(R, ld)[:, :V]  # (R, V), row stride ld
        if b is None:
            torch.mm(xc, w.t(), out=logits)
        else:
            torch.addmm(b, xc, w.t(), out=logits)
        _ce_rows[(R,)](
            logits,
            ld,
            target[start:end],
            loss[start:end],
            row_scale[start:end] if row_scale is not None else loss[start:end],
            V,
            ignore_index,
            label_smoothing,
            HAS_GRAD=any_grad,
            HAS_SCALE=row_scale is not None,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
        if not any_grad:
            continue
        # logits now holds dloss/dlogits (R, V)
        if need[0]:
            torch.mm(logits, w, out=grad_x[start:end])
        if need[1]:
            _accumulate_wgrad(grad_w, logits, xc)
        if need[2]:
            grad_b += logits.sum(0, dtype=torch.float32)
    return loss, grad_x, grad_w, grad_b


# ----------------------------------------------------------------------------- custom ops
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad_x, grad_w, grad_b): the reduced loss and, for mean/sum, the
    gradients for grad_output = 1 (empty where not wanted, and always for 'none')."""
    need = (need_x, need_weight, need_bias)
    if reduction == "none":
        need = (False, False, False)  # recomputed in the backward with per-row scales
    with torch.autocast(x.device.type, enabled=False):
        loss, gx, gw, gb = _chunked(x, weight, target, bias, ignore_index, label_smoothing, need)
        if reduction == "none":
            return loss, gx, gw, gb
        total = loss.sum()
        if reduction == "mean":
            # Divide on the device (no sync); gradients are scaled after the fp32
            # accumulation rather than inside the kernel, where fp16 would underflow.
            n_valid = (target != ignore_index).sum().clamp(min=1).to(torch.float32)
            total = total / n_valid
            gx = (gx.float() / n_valid).to(gx.dtype) if need[0] else gx
            gw = gw.div_(n_valid) if need[1] else gw
            gb = gb.div_(n_valid) if need[2] else gb
        return total, gx, gw, gb


@_fwd_op.register_fake
def _(x, weight, target, bias, ignore_index, reduction, label_smoothing, need_x, need_weight,
      need_bias):
    N, C = x.shape
    V = weight.shape[0]
    grads = reduction != "none"
    loss = x.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    gx = x.new_empty((N, C) if grads and need_x else (0,))
    gw = x.new_empty((V, C) if grads and need_weight else (0,), dtype=torch.float32)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction='none' backward: recompute the chunks with grad_loss (N,) per row."""
    with torch.autocast(x.device.type, enabled=False):
        scale = grad_loss.to(torch.float32).contiguous()
        need = (need_x, need_weight, need_bias)
        _, gx, gw, gb = _chunked(x, weight, target, bias, ignore_index, label_smoothing, need,
                                 row_scale=scale)
    return gx, gw, gb


@_bwd_op.register_fake
def _(grad_loss, x, weight, target, bias, ignore_index, label_smoothing, need_x, need_weight,
      need_bias):
    N, C = x.shape
    V = weight.shape[0]
    gx = x.new_empty((N, C) if need_x else (0,))
    gw = x.new_empty((V, C) if need_weight else (0,), dtype=torch.float32)
    gb = x.new_empty((V,) if need_bias else (0,), dtype=torch.float32)
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    x, weight, target, bias, ignore_index, reduction, label_smoothing, nx, nw, nb = inputs
    ctx.reduction = reduction
    ctx.args = (ignore_index, label_smoothing, nx, nw, nb)
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
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
        # The forward computed the gradients for grad_output = 1: scale them by it.
        gx, gw, gb = ctx.saved_tensors
        g = grad_loss.to(torch.float32)
        gx = (gx.float() * g).to(x_dtype)
        gw = gw * g
        gb = gb * g
    _, _, nx, nw, nb = ctx.args
    dx = gx if nx else None
    dw = gw.to(w_dtype) if nw else None
    db = gb.to(b_dtype) if nb else None
    return dx, dw, None, db, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- entry
def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> torch.Tensor:
    x = input.reshape(-1, input.shape[-1])  # (N, C)
    t = target.reshape(-1)  # (N,)
    grad = torch.is_grad_enabled()
    need_x = grad and x.requires_grad
    need_w = grad and weight.requires_grad
    need_b = grad and bias is not None and bias.requires_grad
    loss = _fwd_op(x, weight, t, bias, ignore_index, reduction, label_smoothing,
                   need_x, need_w, need_b)[0]
    return loss.reshape(target.shape) if reduction == "none" else loss
