"""RMSNorm / LayerNorm in plain PyTorch: the CPU path, the test oracle and the benchmark
baseline for ``nnfast.kernels.norm``.

Statistics and the affine step run in fp32 and only the result is rounded to the
input's dtype, as PyTorch's own fused kernels do; the residual sum ``s`` is rounded to
the input's dtype first (it is what the next block reads), then normalized.

The normalization itself is ``F.layer_norm`` / ``F.rms_norm`` on the fp32 rows: fused
forward and backward, where the same formulas spelled out as separate ops cost several
passes over the activations. fp16/bf16 inputs are upcast to fp32 first (so PyTorch's
kernel, whatever it does internally for low precision, sees fp32); fp32 inputs are
normalized as they are, without a copy.
"""

from __future__ import annotations

import torch


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for the compute; fp32 (and fp64) tensors are used without a copy."""
    return t.float() if t.element_size() < 4 else t


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
    h = _fp32(s if s is not None else x)
    if n == 1 and not rms:
        return _cast(_layer_norm_1(h, weight, bias, eps), x.dtype), s
    # Normalize over the last dim when that is the whole normalized size (the usual case: no
    # reshapes, whose autograd nodes cost more than the op at small sizes); else over rows
    # of n (a view for contiguous input). Parameters may be fp32 next to fp16 activations:
    # cast to the compute dtype (no copy when it matches) and flatten to (n,) (a view).
    rows = h if h.dim() > 0 and h.shape[-1] == n else h.reshape(-1, n)  # (..., n)
    w = None if weight is None else _param(weight, n, h.dtype)
    # torch.rms_norm / torch.layer_norm: what F.rms_norm / F.layer_norm call after their
    # __torch_function__ check (the C++ op does that check too), a microsecond less per call.
    if rms:
        y = torch.rms_norm(rows, (n,), w, eps)
    else:
        b = None if bias is None else _param(bias, n, h.dtype)
        y = torch.layer_norm(rows, (n,), w, b, eps, torch.backends.cudnn.enabled)
    y = y if rows is h else y.reshape(x.shape)
    return _cast(y, x.dtype), s


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call where it is a no-op (it costs microseconds)."""
    return t if t.dtype == dtype else t.to(dtype)


def _param(p: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    return _cast(p if p.dim() == 1 else p.reshape(n), dtype)


def _layer_norm_1(h, weight, bias, eps):
    """LayerNorm over one element per row, written out. ``x - mean`` is exactly 0, so
    ``y = bias`` and ``dx = 0`` exactly; the formula keeps that exact (the mean's backward,
    ``g - mean(g)``, cancels exactly), where F.layer_norm's fused backward leaves rounding
    noise of ~rstd * ulp(g), rstd = 1/sqrt(eps) ~ 316, which an oracle must not have."""
    rows = h.reshape(-1, 1)  # (M, 1)
    centered = rows - rows.mean(-1, keepdim=True)
    y = (centered * torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)).reshape(h.shape)
    if weight is not None:
        y = y * weight.to(h.dtype)
    if bias is not None:
        y = y + bias.to(h.dtype)
    return y
