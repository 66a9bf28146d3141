"""Reference for the fused (gated) activation: ``act(x) * up``, or ``act(x)`` when ``up`` is
None. Computed in fp32 from plain differentiable ops (autograd gives the gradients), the
result cast back to the input's dtype, as the kernel does.

Activations: ``"silu"`` (SwiGLU), ``"gelu"`` (exact, via erf), ``"gelu_tanh"`` (the tanh
approximation, ``torch.nn.functional.gelu(approximate='tanh')``, GPT-2 / T5 v1.1).
"""

from __future__ import annotations

import math

import torch

_SQRT_1_2 = 1.0 / math.sqrt(2.0)
_SQRT_2_PI = math.sqrt(2.0 / math.pi)


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """``name``'s activation of an fp32 tensor, written out so the formulas are on the page."""
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x * _SQRT_1_2))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_PI * (x + 0.044715 * x * x * x)))
    raise ValueError(f"activation must be 'silu', 'gelu' or 'gelu_tanh', got {name!r}")


def act_mul(x: torch.Tensor, up: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``activation(x) * up`` (or ``activation(x)``), fp32 compute, output in ``x``'s dtype."""
    y = apply_activation(x.float(), activation)
    if up is not None:
        y = y * up.float()
    return y.to(x.dtype)
