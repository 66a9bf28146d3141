"""RMSNorm / LayerNorm in plain PyTorch: the CPU path, the test oracle and the benchmark
baseline for ``nnfast.kernels.norm``.

Statistics and the affine step run in fp32 and only the result is rounded to the
input's dtype, as PyTorch's own fused kernels do; the residual sum ``s`` is rounded to
the input's dtype first (it is what the next block reads), then normalized.
"""

from __future__ import annotations

import torch


def layer_norm(
    x: torch.Tensor,
    n: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, s)``: ``s = x + residual`` (``None`` without a residual), ``y = norm(s or x)``
    over the trailing dims whose sizes multiply to ``n``."""
    s = x + residual if residual is not None else None
    h = (s if s is not None else x).float()
    rows = h.reshape(-1, n)  # (M, n)
    if rms:
        rows = rows * torch.rsqrt(rows.square().mean(-1, keepdim=True) + eps)
    else:
        centered = rows - rows.mean(-1, keepdim=True)
        rows = centered * torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    y = rows.reshape(x.shape)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), s
