"""Reference for convolutional token merging and expansion, on nnfast's ``(B, T, C)`` layout.

``token_merge``: each window of ``k`` consecutive tokens becomes one token, a strided 1-D
convolution (kernel ``k``, stride ``k``) with ``nn.Conv1d``'s weight ``(C_out, C_in, k)``::

    out[b, j, o] = bias[o] + sum_{i < k, c} x[b, j*k + i - s, c] * weight[o, c, i]

with ``s = 0``, or ``s = k - 1`` when ``causal`` (Hourglass Transformers, Nawrot et al.
2021: the sequence is shifted right by ``k - 1`` before merging). Tokens outside ``[0, T)``
read as zeros, so a ``T`` that is not a multiple of ``k`` is zero-padded at the tail and
there are always ``ceil(T / k)`` merged tokens.

Causal: merged token ``j`` sees input tokens ``j*k - k + 1 .. j*k`` (none after ``j*k``);
tokens after ``(ceil(T / k) - 1) * k`` reach no merged token. After ``token_expand``
(token ``t`` of the expansion comes from merged token ``t // k``), position ``t`` depends
only on input tokens ``<= (t // k) * k <= t``, and on merged tokens ``<= t // k``, so a
causal model between the two keeps the whole stack causal.

``token_expand``: the inverse, ``nn.ConvTranspose1d(C_in, C_out, k, stride=k)`` with weight
``(C_in, C_out, k)``: merged token ``j`` becomes tokens ``j*k .. j*k + k - 1``::

    out[b, j*k + i, o] = bias[o] + sum_c x[b, j, c] * weight[c, o, i]

cropped to the first ``length`` tokens (default ``T_merged * k``).

Computed in the input's dtype with the weight and bias cast to it (what autocast does for a
convolution); the fp32 path is the test oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def merged_length(T: int, k: int) -> int:
    """Merged tokens for ``T`` input tokens: ``ceil(T / k)``, causal or not."""
    return -(-T // k)


def token_merge(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, causal: bool
) -> torch.Tensor:
    """``(B, T, C_in) -> (B, ceil(T / k), C_out)``; see the module docstring."""
    T = x.shape[1]
    Tm = merged_length(T, k)
    shift = k - 1 if causal else 0
    xc = x.transpose(1, 2)  # (B, C_in, T), conv1d's layout
    # Shift right by `shift` (zeros in front), zero-pad the tail to Tm*k, then keep exactly
    # Tm*k positions: in the causal case the last tokens may fall off the end.
    xc = F.pad(xc, (shift, max(0, Tm * k - T - shift)))[..., : Tm * k]  # (B, C_in, Tm*k)
    b = bias.to(x.dtype) if bias is not None else None
    if xc.numel() == 0:  # T = 0 or C_in = 0: conv1d raises or returns the wrong shape
        B, C_in = xc.shape[:2]
        windows = xc.reshape(B, C_in, Tm, k).permute(0, 2, 1, 3).reshape(B, Tm, C_in * k)
        y = windows @ weight.to(x.dtype).reshape(weight.shape[0], C_in * k).T  # (B, Tm, C_out)
        return y + b if b is not None else y
    y = F.conv1d(xc, weight.to(x.dtype), b, stride=k)  # (B, C_out, Tm)
    return y.transpose(1, 2)  # (B, Tm, C_out)


def token_expand(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, length: int | None
) -> torch.Tensor:
    """``(B, T_m, C_in) -> (B, length, C_out)``; see the module docstring."""
    b = bias.to(x.dtype) if bias is not None else None
    if x.numel() == 0:  # T_m = 0 or C_in = 0: conv_transpose1d raises or misshapes
        B, Tm, C_in = x.shape
        C_out = weight.shape[1]
        y = x @ weight.to(x.dtype).reshape(C_in, C_out * k)  # (B, T_m, C_out * k)
        y = y.reshape(B, Tm, C_out, k).transpose(2, 3).reshape(B, Tm * k, C_out)
        y = y + b if b is not None else y
        return y if length is None else y[:, :length]
    y = F.conv_transpose1d(x.transpose(1, 2), weight.to(x.dtype), b, stride=k)  # (B, C_out, T_m*k)
    if length is not None:
        y = y[..., :length]
    return y.transpose(1, 2)  # (B, length, C_out)
