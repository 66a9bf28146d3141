"""Transformer MLPs over nnfast's fused activation kernel.

``GatedMLP`` (SwiGLU for Llama, gated GELU for T5 v1.1) runs gate and up as ONE GEMM:
``gate_up`` is a single ``Linear(dim, 2 * hidden_dim)`` whose output's first half
(``[..., :hidden_dim]``) is the gate and second half (``[..., hidden_dim:]``) is up, i.e.
``gate_up.weight = cat([w1, w3])`` in Llama's names (w1 = gate, w3 = up). The halves go to the
kernel as strided views of that one tensor (row stride ``2 * hidden_dim``), so splitting them
copies nothing, and the backward saves that one tensor rather than two copies of it.

``MLP`` is GPT-2's: ``fc`` -> GELU (tanh approximation by default) -> ``proj``, the GELU
running through the same kernel (``GATED=False``).
"""

from __future__ import annotations

import torch
from torch import nn

from nnfast import functional as F

GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _activate(x: torch.Tensor, up: torch.Tensor | None, activation: str) -> torch.Tensor:
    if activation == "silu":
        if up is None:
            raise ValueError("activation 'silu' is only available gated (silu_mul)")
        return F.silu_mul(x, up)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    if up is None:
        return F.gelu(x, approximate=approximate)
    return F.gelu_mul(x, up, approximate=approximate)


class GatedMLP(nn.Module):
    """``down(act(x @ w_gate.T) * (x @ w_up.T))``, then dropout.

    ``activation``: ``"silu"`` (SwiGLU, Llama), ``"gelu_tanh"`` (gated GELU, T5 v1.1) or
    ``"gelu"`` (exact erf GELU).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        bias: bool = False,
        activation: str = "silu",
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in GATED_ACTIVATIONS:
            raise ValueError(f"activation must be one of {GATED_ACTIVATIONS}, got {activation!r}")
        self.dim, self.hidden_dim, self.activation = dim, hidden_dim, activation
        # One GEMM for gate and up: rows [:hidden_dim] of the weight are the gate's, the rest up's.
        self.gate_up = nn.Linear(dim, 2 * hidden_dim, bias=bias, device=device, dtype=dtype)
        self.down = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)  # (..., 2 * hidden_dim)
        # Views, not copies: (..., hidden_dim) each with row stride 2 * hidden_dim.
        gate, up = h.split(self.hidden_dim, dim=-1)
        return self.dropout(self.down(_activate(gate, up, self.activation)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class SwiGLU(GatedMLP):
    """Llama's MLP: ``down(silu(x @ w1.T) * (x @ w3.T))``, ``gate_up.weight = cat([w1, w3])``."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        bias: bool = False,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(dim, hidden_dim, bias, "silu", dropout, device, dtype)


class MLP(nn.Module):
    """GPT-2's MLP: ``proj(gelu(fc(x)))``, then dropout. ``activation``: ``"gelu_tanh"``
    (GPT-2's ``approximate='tanh'``) or ``"gelu"`` (exact, BERT)."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        bias: bool = True,
        activation: str = "gelu_tanh",
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"activation must be 'gelu' or 'gelu_tanh', got {activation!r}")
        self.dim, self.hidden_dim, self.activation = dim, hidden_dim, activation
        self.fc = nn.Linear(dim, hidden_dim, bias=bias, device=device, dtype=dtype)
        self.proj = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(_activate(self.fc(x), None, self.activation)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
