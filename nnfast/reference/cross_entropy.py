"""Reference for the fused linear + cross-entropy: ``F.linear`` then ``F.cross_entropy``
(and for the plain ``cross_entropy`` on logits).

It materializes the whole ``(N, V)`` logits (that is what the kernel avoids); it is the
CPU path, the test oracle and the benchmark baseline.

Dtypes follow autocast: the projection runs in ``input``'s dtype (an fp32 ``weight``, e.g.
a tied embedding under bf16 autocast, is cast the way autocast casts a Linear's weight;
its gradient comes back in fp32 through the cast), the loss is computed in fp32 and
returned in fp32.

One deliberate difference from ``F.cross_entropy``: ``reduction="mean"`` with every target
equal to ``ignore_index`` returns 0, not NaN (0/0), so that a batch of padding does not
poison a training run. Its gradient is then 0 too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    accum_dtype: torch.dtype | None = None,  # the kernel's option; autograd's GEMM is exact
) -> torch.Tensor:
    x = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])  # (N, C)
    t = target if target.dim() == 1 else target.reshape(-1)  # (N,)
    t = t if t.dtype == torch.int64 else t.long()
    w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
    logits = F.linear(x, w, b)  # (N, V)
    logits = logits if logits.dtype == torch.float32 else logits.float()  # fp32 loss
    loss = _fp32_cross_entropy(logits, t, ignore_index, reduction, label_smoothing)
    return loss.reshape(target.shape) if reduction == "none" else loss


def _fp32_cross_entropy(logits, t, ignore_index, reduction, label_smoothing):
    """The loss of fp32 logits (N, V) and int64 targets (N,), nnfast's mean rule."""
    if reduction == "mean" and logits.is_cpu and not torch.compiler.is_compiling():
        # torch's mean divides by the number of non-ignored targets: 0/0 = NaN when there
        # are none, where nnfast returns 0 (the sum, gradient 0 too). Looking at the result
        # (a host read, free on a CPU) costs less than checking the targets first; the
        # targets are looked at only for a NaN. (Compiled, a host read breaks the graph.)
        loss = torch._C._nn.cross_entropy_loss(logits, t, None, 1, ignore_index, label_smoothing)
        if not math.isnan(loss.detach()) or bool((t != ignore_index).any()):
            return loss
        reduction = "sum"
    elif reduction == "mean":  # on a GPU (no sync) or compiled: divide by the clamped count
        total = F.cross_entropy(
            logits, t, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
        )
        return total / (t != ignore_index).sum().clamp(min=1)
    # F.cross_entropy's op without its Python wrapper (reduction enum: none 0, mean 1, sum 2).
    return torch._C._nn.cross_entropy_loss(
        logits, t, None, _REDUCTIONS[reduction], ignore_index, label_smoothing
    )


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> torch.Tensor:
    """``F.cross_entropy`` of logits (N, V) computed in fp32, returned in their dtype
    (the same mean-over-nothing = 0 rule as above)."""
    loss = _fp32_cross_entropy(input.float(), target.long(), ignore_index, reduction,
                               label_smoothing)
    return loss.to(input.dtype)
