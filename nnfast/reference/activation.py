"""Reference for the fused (gated) activation: ``act(x) * up``, or ``act(x)`` when ``up`` is
None. Computed in fp32 (fp16/bf16 inputs are upcast; fp32 ones are used as they are) with
PyTorch's own activation functions (autograd gives the gradients), the result cast back to
the input's dtype, as the kernel does.

Activations: ``"silu"`` (SwiGLU, ``x * sigmoid(x)``), ``"gelu"`` (exact,
``0.5 x (1 + erf(x / sqrt 2))``), ``"gelu_tanh"`` (the tanh approximation,
``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, GPT-2 / T5 v1.1). The fused
``F.silu`` / ``F.gelu`` compute exactly these formulas in one pass each way; spelled out
with separate ops they cost several times the memory traffic on the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for the compute; fp32 (and fp64) tensors are used without a copy."""
    return t.float() if t.element_size() < 4 else t


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """``name``'s activation of ``x``, in ``x``'s dtype."""
    if name == "silu":
        return torch._C._nn.silu(x)  # F.silu's op without its Python wrapper
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"activation must be 'silu', 'gelu' or 'gelu_tanh', got {name!r}")


def act_mul(x: torch.Tensor, up: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``activation(x) * up`` (or ``activation(x)``), fp32 compute, output in ``x``'s dtype."""
    y = apply_activation(_fp32(x), activation)
    if up is not None:
        y = y * _fp32(up)
    return y if y.dtype == x.dtype else y.to(x.dtype)
