"""Rotary position embedding (RoPE) in plain PyTorch: the CPU path, the test oracle and
the benchmark baseline for ``nnfast.kernels.rope``.

Layout: q ``(B, H, T, D)``, k ``(B, Hk, T, D)``; ``cos``/``sin`` float32
``(max_seq_len, rotary_dim // 2)``. Only the first ``rotary_dim`` channels of a head rotate.
Channel pair i (``i < rotary_dim // 2``) is rotated by the angle ``pos * theta_i`` with
``theta_i = base ** (-2i / rotary_dim)``:

* half-split (GPT-NeoX / Hugging Face): the pair is ``(x[i], x[i + rotary_dim // 2])``;
* interleaved (Meta's Llama): the pair is ``(x[2i], x[2i + 1])``.

``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``.
"""

from __future__ import annotations

import torch


def rotary_cos_sin(
    max_seq_len: int, rotary_dim: int, base: float = 10000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(cos, sin)`` tables of shape ``(max_seq_len, rotary_dim // 2)``.

    The angles are formed in float64: at position 10^5 an fp32 angle is off by ~4e-3 rad
    (its ulp), which would be an error far above fp16's in the rotated values.
    """
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    i = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device)
    theta = base ** (-i / rotary_dim)  # (rotary_dim // 2,)
    pos = torch.arange(max_seq_len, dtype=torch.float64, device=device)
    angles = torch.outer(pos, theta)  # (max_seq_len, rotary_dim // 2)
    return angles.cos().float(), angles.sin().float()


def _gather(table: torch.Tensor, position_ids: torch.Tensor | None, offset: int, T: int):
    """The table's rows for each token, shaped to broadcast against ``(B, H, T, R/2)``
    (a ``(T, R/2)`` table broadcasts as it is; each indexing op costs microseconds)."""
    if position_ids is None:
        return table if offset == 0 and T == table.shape[0] else table.narrow(0, offset, T)
    rows = table[position_ids.long()]  # (T, R/2) or (B, T, R/2)
    return rows[None, None] if position_ids.dim() == 1 else rows[:, None]


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    offset: int,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (computed in fp32, returned in the input dtype)."""
    T = q.shape[2]
    c = _gather(cos, position_ids, offset, T)
    s = _gather(sin, position_ids, offset, T)
    c, s = _full_tables(c, s, interleaved)
    return _rotate(q, c, s, interleaved), _rotate(k, c, s, interleaved)


def _full_tables(cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    """(..., R/2) cos/sin rows -> (..., R) ones matching each channel of the rotated part:
    cos on both members of a pair, -sin on its first and +sin on its second member."""
    if interleaved:
        return (torch.stack((cos, cos), dim=-1).flatten(-2),
                torch.stack((-sin, sin), dim=-1).flatten(-2))
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    """``x * cos + swap(x) * sin`` on the first R channels, swap exchanging each pair's
    members: (x1 cos - x2 sin, x2 cos + x1 sin) per pair, as addcmul rounds it (one rounding
    of each product, then of the sum). Whole-width ops: a roll (half-split) or a flip of the
    pair dim (interleaved) instead of splitting into halves and concatenating them again,
    two ops where that took six (and their backward as many)."""
    rot_dim = cos.shape[-1]
    # fp16/bf16 are upcast; fp32 is used as it is (no copy).
    xf = x.float() if x.element_size() < 4 else x
    D = xf.shape[-1]
    # split rather than slicing: its backward is one cat, where each slice's backward
    # would allocate a zero tensor of the full size and copy into it.
    rot, rest = (xf, None) if rot_dim == D else xf.split([rot_dim, D - rot_dim], dim=-1)
    if interleaved:
        swapped = rot.unflatten(-1, (rot_dim // 2, 2)).flip(-1).flatten(-2)
    else:
        swapped = rot.roll(rot_dim // 2, dims=-1)
    y = torch.addcmul(rot * cos, swapped, sin)
    if rest is not None:
        y = torch.cat((y, rest), dim=-1)
    return y if y.dtype == x.dtype else y.to(x.dtype)
