"""The output head every language-model family shares: hidden states -> ``(logits, loss)``.

One contract for all of ``nnfast.models`` (decoders, encoders, encoder-decoders):

* no targets: ``(logits, None)``;
* targets, default: ``(None, loss)`` through ``nnfast.functional.linear_cross_entropy``, which
  never materializes the ``(B*T, V)`` logits (that memory is why training is fast), so there
  are none to return;
* targets and ``return_logits=True`` (or a config with ``fused_loss=False``): ``(logits, loss)``,
  the logits computed once and the loss by ``torch.nn.functional.cross_entropy`` on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as torch_F

from nnfast import functional as F


def lm_output(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    return_logits: bool = False,
    fused: bool = True,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``h`` (..., C) hidden states, ``weight`` (V, C) the head -> ``(logits, loss)`` as above."""
    if targets is not None and fused and not return_logits:
        loss = F.linear_cross_entropy(h, weight, targets, bias=bias, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing)
        return None, loss
    logits = torch_F.linear(h, weight, bias)  # (..., V)
    if targets is None:
        return logits, None
    loss = torch_F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                                 ignore_index=ignore_index, label_smoothing=label_smoothing)
    return logits, loss
