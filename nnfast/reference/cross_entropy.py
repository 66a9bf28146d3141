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

import torch
import torch.nn.functional as F


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
    x = input.reshape(-1, input.shape[-1])  # (N, C)
    t = target.reshape(-1).long()  # (N,)
    w = weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    logits = F.linear(x, w, b).float()  # (N, V) fp32
    loss = _fp32_cross_entropy(logits, t, ignore_index, reduction, label_smoothing)
    return loss.reshape(target.shape) if reduction == "none" else loss


def _fp32_cross_entropy(logits, t, ignore_index, reduction, label_smoothing):
    if reduction == "mean":
        # torch's mean divides by the number of non-ignored targets; clamp so 0/0 -> 0.
        total = F.cross_entropy(
            logits, t, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
        )
        n_valid = (t != ignore_index).sum().clamp(min=1)
        return total / n_valid
    return F.cross_entropy(
        logits, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
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
