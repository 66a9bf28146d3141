"""Native attention modules on ``nnfast.functional.scaled_dot_product_attention``, the ones
nnfast's models use: ``SelfAttention`` (fused QKV, GQA/MQA, RoPE, KV cache), ``CrossAttention``
(encoder-decoder) and ``KVCache``. Layout (B, T, C) in and out; masks in SDPA's convention
(bool True = take part, or a float added to the scores), broadcastable to (B, H, T, S).

The ``torch.nn.MultiheadAttention`` drop-in ``Attention`` and ``patch(model)`` live in
``nnfast.modules.mha`` and are re-exported here.

One deliberate difference from PyTorch everywhere: a query that may attend to no key at all
(a fully masked row) gives a zero output row where PyTorch gives NaN.
"""

from __future__ import annotations

import torch
from torch import nn

from nnfast import functional as F
from nnfast.modules.mha import Attention, patch
from nnfast.modules.rope import RotaryEmbedding

__all__ = ["Attention", "CrossAttention", "KVCache", "SelfAttention", "patch"]


class KVCache:
    """Preallocated keys and values of one attention layer for incremental decoding.

    ``k``, ``v``: ``(batch_size, n_kv_heads, max_len, head_dim)``; positions ``0 .. pos-1``
    are filled. ``SelfAttention`` writes the new tokens at ``pos`` and advances ``pos``.
    Use one cache per layer; ``reset()`` starts a new sequence without reallocating.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        if min(batch_size, max_len, n_kv_heads, head_dim) < 1:
            raise ValueError(
                "batch_size, max_len, n_kv_heads and head_dim must be positive, got "
                f"{batch_size}, {max_len}, {n_kv_heads}, {head_dim}"
            )
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` ``(B, Hk, T, D)`` at ``pos``; return all keys and values so far,
        ``(B, Hk, pos + T, D)`` views of the buffers. Does not advance ``pos``."""
        B, Hk, T, D = k.shape
        if (B, Hk, D) != (self.k.shape[0], self.k.shape[1], self.k.shape[3]):
            raise ValueError(
                f"new keys {tuple(k.shape)} do not fit the cache's (B, Hk, *, D) = "
                f"{tuple(self.k.shape)}"
            )
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.pos} cached + {T} new tokens > max_len={self.max_len}; "
                "allocate a longer cache or reset() it"
            )
        self.k[:, :, self.pos:end] = k
        self.v[:, :, self.pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def __repr__(self) -> str:
        return f"KVCache(shape={tuple(self.k.shape)}, dtype={self.k.dtype}, pos={self.pos})"


def _with_causal(mask: torch.Tensor | None, T: int, S: int, offset: int, device) -> torch.Tensor:
    """``mask`` restricted to causal attention, bottom-right aligned: query i sits at absolute
    position ``offset + i`` and sees keys ``j <= offset + i``. Bool result for bool or no mask,
    float (-inf where not allowed) for a float mask."""
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=offset)  # (T, S)
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, float("-inf"))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, GQA/MQA, optional RoPE and a
    KV cache for generation.

    ``qkv.weight`` rows: ``[q heads | k heads | v heads]``, each head ``head_dim`` rows.
    ``n_kv_heads < n_heads`` is GQA: k and v are never repeated in memory.
    ``rope``: rotate the first ``rotary_dim`` (default ``head_dim``) channels of q and k.
    ``scale``: the softmax scale (default ``1/sqrt(head_dim)``; T5 uses 1.0).
    ``dropout``: on the attention probabilities (training only) and on the output.
    ``window_size``: ``(left, right)`` keys around each query's diagonal (-1 = unbounded;
    causal forces right = 0): ``(w - 1, 0)`` is Mistral's sliding window of ``w`` tokens.
    ``softcap``: Gemma 2's ``softcap * tanh(scores / softcap)``.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        causal: bool = True,
        bias: bool = False,
        dropout: float = 0.0,
        rope: bool = False,
        rotary_dim: int | None = None,
        rope_base: float = 10000.0,
        rope_interleaved: bool = False,
        max_seq_len: int = 2048,
        scale: float | None = None,
        window_size: tuple[int, int] | None = None,
        softcap: float | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        # Validated once here, with the functional API's rules and messages.
        (self.window_size, self.softcap) = F._check_extras(window_size, softcap)
        if n_heads < 1 or dim % n_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of n_heads ({n_heads})")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.dim, self.n_heads, self.n_kv_heads = dim, n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.causal, self.dropout_p, self.scale = causal, dropout, scale
        kw = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias, **kw)
        self.proj = nn.Linear(n_heads * self.head_dim, dim, bias=bias, **kw)
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = None
        if rope:
            rotary_dim = self.head_dim if rotary_dim is None else rotary_dim
            self.rotary = RotaryEmbedding(
                rotary_dim, max_seq_len, rope_base, rope_interleaved, device=device
            )

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """``x`` (B, T, dim) -> (B, T, dim).

        ``attn_mask``: SDPA convention, broadcastable to (B, H, T, S) with S = T, or
        ``cache.pos + T`` with a cache; combined with the causal mask when ``causal``.
        ``cache``: keys/values of earlier tokens; the T new tokens sit at positions
        ``cache.pos ..`` (RoPE offset too) and ``cache.pos`` advances by T.
        ``position_ids``: RoPE positions (T,) or (B, T) instead of ``offset + t``.
        ``cu_seqlens`` (int32, ``max_seqlen``): packed documents. The B*T tokens, row after
        row, are documents ``cu_seqlens[d] : cu_seqlens[d + 1]`` that attend only within
        themselves (``nnfast.functional.varlen_attention``, no padding); pass
        ``position_ids`` that restart per document for RoPE. No mask or cache with it.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, T, {self.dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        H, Hk, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hk * D, Hk * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hk, D).transpose(1, 2)  # (B, Hk, T, D)
        v = v.view(B, T, Hk, D).transpose(1, 2)  # (B, Hk, T, D)
        offset = 0 if cache is None else cache.pos
        if self.rotary is not None:
            q, k = self.rotary(q, k, position_ids=position_ids, offset=offset)
        if cu_seqlens is not None:
            return self._packed(q, k, v, cu_seqlens, max_seqlen, attn_mask, cache)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hk, offset + T, D) each
            # A cache may be in another dtype than the activations (e.g. fp32 under autocast).
            k, v = k.to(q.dtype), v.to(q.dtype)
        S = k.shape[2]
        is_causal = False
        if self.causal:
            if attn_mask is None:
                # Bottom-right (below): with a cache the T new queries are the last T keys.
                is_causal = True
            else:
                attn_mask = _with_causal(attn_mask, T, S, offset, x.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal, scale=self.scale, enable_gqa=Hk != H,
            window_size=self.window_size, softcap=self.softcap,
            causal_alignment="bottom_right",  # T == S: the same as PyTorch's top-left
        )  # (B, H, T, D)
        if cache is not None:
            cache.pos += T
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H * D)
        return self.resid_dropout(self.proj(y))

    def _packed(self, q, k, v, cu_seqlens, max_seqlen, attn_mask, cache) -> torch.Tensor:
        """Packed documents through varlen attention: q (B, H, T, D) -> (B, T, dim)."""
        if attn_mask is not None or cache is not None:
            raise ValueError("cu_seqlens (packed documents) takes no attn_mask and no cache")
        B, H, T, D = q.shape
        # (B, H, T, D) -> (B*T, H, D): row after row, the layout cu_seqlens indexes.
        q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v))
        y = F.varlen_attention(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=self.causal,
            window_size=self.window_size, softcap=self.softcap, scale=self.scale,
            dropout_p=self.dropout_p if self.training else 0.0,
        )  # (B*T, H, D)
        return self.resid_dropout(self.proj(y.reshape(B, T, H * D)))

    def extra_repr(self) -> str:
        extra = ""
        if self.window_size != (-1, -1):
            extra += f", window_size={self.window_size}"
        if self.softcap:
            extra += f", softcap={self.softcap}"
        return (
            f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
            f"causal={self.causal}, dropout={self.dropout_p}{extra}"
        )


class CrossAttention(nn.Module):
    """Encoder-decoder attention: queries from ``x`` (B, T, dim), keys and values from
    ``memory`` (B, S, kv_dim). For generation, compute ``memory_kv = project_memory(memory)``
    once and pass it to every step instead of ``memory``."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        kv_dim: int | None = None,
        *,
        bias: bool = False,
        dropout: float = 0.0,
        scale: float | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if n_heads < 1 or dim % n_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of n_heads ({n_heads})")
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.kv_dim = dim if kv_dim is None else kv_dim
        self.dropout_p, self.scale = dropout, scale
        kw = {"device": device, "dtype": dtype}
        self.q = nn.Linear(dim, dim, bias=bias, **kw)
        # k and v in one GEMM: rows [:dim] of the weight are k's, the rest v's.
        self.kv = nn.Linear(self.kv_dim, 2 * dim, bias=bias, **kw)
        self.proj = nn.Linear(dim, dim, bias=bias, **kw)
        self.resid_dropout = nn.Dropout(dropout)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``memory`` (B, S, kv_dim) -> ``(k, v)``, each (B, H, S, head_dim)."""
        if memory.dim() != 3 or memory.shape[-1] != self.kv_dim:
            raise ValueError(f"memory must be (B, S, {self.kv_dim}), got {tuple(memory.shape)}")
        B, S, _ = memory.shape
        k, v = self.kv(memory).split(self.dim, dim=-1)
        k = k.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        v = v.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x`` (B, T, dim) -> (B, T, dim). ``attn_mask`` (SDPA convention) broadcastable
        to (B, H, T, S), e.g. the encoder's key padding as (B, 1, 1, S)."""
        if (memory is None) == (memory_kv is None):
            raise ValueError("pass exactly one of memory and memory_kv")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, T, {self.dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        k, v = self.project_memory(memory) if memory_kv is None else memory_kv
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.scale,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.dim)  # (B, T, dim)
        return self.resid_dropout(self.proj(y))
