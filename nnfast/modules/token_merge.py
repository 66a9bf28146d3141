"""Convolutional token merging (``k`` tokens -> 1) and expansion (1 -> ``k``) on ``(B, T, C)``.

Parameters are named and shaped as ``nn.Conv1d(in_dim, out_dim, k, stride=k)`` and
``nn.ConvTranspose1d(in_dim, out_dim, k, stride=k)``, so their state dicts load as they are,
and they are initialized the same way (``reset_parameters`` of those modules).
"""

from __future__ import annotations

import torch
from torch import nn

from nnfast import functional as F


def _init(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    # nn.Conv1d / nn.ConvTranspose1d's init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
    # for the weight, the same bound for the bias.
    bound = fan_in**-0.5
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


class TokenMerge(nn.Module):
    """``(B, T, in_dim) -> (B, ceil(T / k), out_dim)``: each window of ``k`` tokens becomes
    one (zero-padded tail). ``causal=True`` shifts right by ``k - 1`` first, so merged token
    ``j`` sees input tokens up to ``j * k`` only (Hourglass Transformers)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        k: int,
        bias: bool = True,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.in_dim, self.out_dim, self.k, self.causal = in_dim, out_dim, k, causal
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, k, **factory))
        self.bias = nn.Parameter(torch.empty(out_dim, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init(self.weight, self.bias, self.in_dim * self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.token_merge(x, self.weight, self.bias, self.k, self.causal)

    def extra_repr(self) -> str:
        return (f"{self.in_dim}, {self.out_dim}, k={self.k}, bias={self.bias is not None}, "
                f"causal={self.causal}")


class TokenExpand(nn.Module):
    """``(B, T_m, in_dim) -> (B, length, out_dim)``: each token becomes ``k`` tokens;
    ``length`` (default ``T_m * k``) crops back to the sequence length before merging."""

    def __init__(
        self, in_dim: int, out_dim: int, k: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.in_dim, self.out_dim, self.k = in_dim, out_dim, k
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim, k, **factory))
        self.bias = nn.Parameter(torch.empty(out_dim, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # ConvTranspose1d's fan_in (as torch computes it from weight dim 1): out_dim * k.
        _init(self.weight, self.bias, self.out_dim * self.k)

    def forward(self, x: torch.Tensor, length: int | None = None) -> torch.Tensor:
        return F.token_expand(x, self.weight, self.bias, self.k, length)

    def extra_repr(self) -> str:
        return f"{self.in_dim}, {self.out_dim}, k={self.k}, bias={self.bias is not None}"
