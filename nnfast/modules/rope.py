"""``RotaryEmbedding``: rotary position embedding with its cos/sin tables cached.

Layout (the whole library's): q ``(B, H, T, D)``, k ``(B, Hk, T, D)`` (Hk may be fewer
heads than H, as in GQA). ``dim`` is the rotary dim: the first ``dim`` channels of each head
rotate, the other ``D - dim`` pass through unchanged (partial rotary, e.g. GPT-NeoX/Phi).
Token t sits at position ``offset + t`` or at ``position_ids[..., t]`` (``(T,)`` or ``(B, T)``).
``interleaved=False`` pairs channels (i, i + dim/2) (GPT-NeoX / Hugging Face);
``interleaved=True`` pairs (2i, 2i+1) (Meta's Llama checkpoints).

The tables are computed once, in float32 (angles in float64), and kept as non-persistent
buffers: they follow ``.to(device)`` but are not in the state dict, and a dtype cast of
the model (``.half()``, ``.to(torch.bfloat16)``) leaves them float32.
"""

from __future__ import annotations

import torch
from torch import nn

from nnfast import functional as F
from nnfast.reference.rope import rotary_cos_sin


class RotaryEmbedding(nn.Module):
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self,
        dim: int,
        max_seq_len: int,
        base: float = 10000.0,
        interleaved: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim (the rotary dim) must be a positive even number, got {dim}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.base = float(base)
        self.interleaved = interleaved
        cos, sin = rotary_cos_sin(max_seq_len, dim, self.base, device=device)
        self.register_buffer("cos", cos, persistent=False)  # (max_seq_len, dim // 2) fp32
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.half()/.to(dtype) would cast the tables; rebuilding them in fp32 on the new
        # device keeps them exact (a round trip through fp16 would not).
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            self.cos, self.sin = rotary_cos_sin(
                self.max_seq_len, self.dim, self.base, device=self.cos.device
            )
        return self

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` ``(B, H, T, D)`` and ``k`` ``(B, Hk, T, D)``; returns ``(q, k)``."""
        if position_ids is None:
            last = offset + q.shape[2] - 1 if q.dim() == 4 else offset
            if offset < 0 or last >= self.max_seq_len:
                raise ValueError(
                    f"positions {offset}..{last} requested but the rotary table has "
                    f"max_seq_len={self.max_seq_len} rows; raise max_seq_len"
                )
        elif (
            position_ids.device.type == "cpu"
            and position_ids.numel()
            and not torch.compiler.is_compiling()
        ):
            # Checked only where it costs no device sync; on GPUs the kernel turns an
            # out-of-range position into NaN instead of reading out of bounds.
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0 or hi >= self.max_seq_len:
                raise ValueError(
                    f"position_ids span {lo}..{hi} but the rotary table has "
                    f"max_seq_len={self.max_seq_len} rows; raise max_seq_len"
                )
        return F.apply_rotary(
            q, k, self.cos, self.sin,
            position_ids=position_ids, offset=offset, interleaved=self.interleaved,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}, "
            f"interleaved={self.interleaved}"
        )
