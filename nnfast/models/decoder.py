"""One decoder-only transformer for GPT-2 and Llama2 (and whatever else fits): the two
families differ by ``DecoderConfig``, not by code. Reads bottom-up: config -> norm/MLP
factories -> block -> model.

Pre-norm blocks with the residual add fused into the next norm: a block takes
``(h, residual)`` where ``h`` is the previous sublayer's output and ``residual`` the stream
before it, and ``norm.forward_residual(h, residual)`` returns ``(norm(h + residual),
h + residual)`` in one pass. The last add happens in the final norm. Mathematically this is
the usual ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``.

Under autocast the residual stream is kept in the autocast dtype (as llm.c does): the fused
norms take input and residual in one dtype, and a bf16 stream halves its memory traffic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import nnfast
from nnfast.models.flops import MFUMixin
from nnfast.models.head import lm_output


@dataclass
class DecoderConfig:
    vocab_size: int = 50257  # tokens in the vocabulary (a data tokenizer may override it)
    block_size: int = 1024  # longest sequence: rows of the position table / RoPE tables
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads
    n_embd: int = 768  # model width d
    n_kv_head: int | None = None  # key/value heads (GQA when < n_head); None: n_head
    hidden_dim: int | None = None  # MLP width; None: 4d (gelu) or Llama's rule (swiglu)
    multiple_of: int = 256  # Llama: the derived SwiGLU width rounds up to a multiple of this
    ffn_dim_multiplier: float | None = None  # Llama: optional factor on the SwiGLU width
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    norm_eps: float = 1e-5  # epsilon of every norm
    mlp: str = "gelu"  # "gelu": fc -> GELU(tanh) -> proj (GPT-2); "gelu_exact": the erf GELU
    # (nanoGPT's nn.GELU(); on a CPU ~2x cheaper than tanh's); "swiglu" (Llama)
    pos: str = "learned"  # "learned" absolute position table (GPT-2) or "rope" (Llama)
    rope_base: float = 10000.0  # RoPE's theta base
    rope_interleaved: bool = False  # RoPE pairs (2i, 2i+1) as Meta's checkpoints; else half-split
    bias: bool = True  # biases in the Linear layers and LayerNorms
    tie_embeddings: bool = True  # the output head's weight IS the token embedding's
    dropout: float = 0.0  # embedding, attention-probability and residual dropout
    init_std: float = 0.02  # std of the normal init; residual projections get /sqrt(2 n_layer)
    fused_loss: bool = True  # loss by nnfast's chunked linear+CE; False: logits + F.cross_entropy
    window_size: int | None = None  # sliding window: each query sees its last w tokens (Mistral)
    window_every: int = 1  # layers 0, k, 2k, ... are windowed, the rest global (Gemma 2: 2)
    attn_softcap: float | None = None  # attention logits softcap * tanh(s / softcap) (Gemma 2)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        choices = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "gelu_exact", "swiglu"),
                   "pos": ("learned", "rope")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.window_size is not None and self.window_size < 1:
            raise ValueError(f"window_size must be >= 1 (or None), got {self.window_size}")
        if self.window_every < 1:
            raise ValueError(f"window_every must be >= 1, got {self.window_every}")
        if self.attn_softcap is not None and not self.attn_softcap > 0:
            raise ValueError(f"attn_softcap must be > 0 (or None), got {self.attn_softcap}")
        if self.hidden_dim is None:
            if self.mlp in ("gelu", "gelu_exact"):
                self.hidden_dim = 4 * self.n_embd
            else:
                # Llama: 2/3 of 4d keeps SwiGLU's three matrices at the cost of GELU's two,
                # then round up to a multiple of `multiple_of` for matmul-friendly shapes.
                hidden = int(2 * 4 * self.n_embd / 3)
                if self.ffn_dim_multiplier is not None:
                    hidden = int(self.ffn_dim_multiplier * hidden)
                self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def make_norm(config: DecoderConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nnfast.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
    return nnfast.RMSNorm(config.n_embd, eps=config.norm_eps)


def make_mlp(config: DecoderConfig) -> nn.Module:
    if config.mlp in ("gelu", "gelu_exact"):
        activation = "gelu_tanh" if config.mlp == "gelu" else "gelu"
        return nnfast.MLP(config.n_embd, config.hidden_dim, bias=config.bias,
                          activation=activation, dropout=config.dropout)
    return nnfast.SwiGLU(config.n_embd, config.hidden_dim, bias=config.bias,
                         dropout=config.dropout)


def make_attention(config: DecoderConfig, layer: int = 0) -> nn.Module:
    local = config.window_size is not None and layer % config.window_every == 0
    return nnfast.SelfAttention(
        config.n_embd, config.n_head, config.n_kv_head, causal=True, bias=config.bias,
        dropout=config.dropout, rope=config.pos == "rope", rope_base=config.rope_base,
        rope_interleaved=config.rope_interleaved, max_seq_len=config.block_size,
        window_size=(config.window_size - 1, 0) if local else None,
        softcap=config.attn_softcap,
    )


def packed_positions(cu_seqlens: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(B, T) position of each token inside its document, for documents
    ``cu_seqlens[d] : cu_seqlens[d + 1]`` of the B*T tokens taken row after row."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens)  # (B*T,)
    return (torch.arange(starts.numel(), device=starts.device) - starts).view(shape)


class Block(nn.Module):
    """Pre-norm block: attention then MLP, each added to the residual stream."""

    def __init__(self, config: DecoderConfig, layer: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = make_attention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cache=None, packed=None):
        """``h``: the previous sublayer's output (B, T, d), or the embeddings in block 0
        (``residual`` None). Returns this block's MLP output and the stream before it.
        ``packed``: ``(cu_seqlens, max_seqlen, position_ids)`` for packed documents."""
        if residual is None:
            residual, x = h, self.norm1(h)
        else:
            x, residual = self.norm1.forward_residual(h.to(residual.dtype), residual)
        if packed is None:
            h = self.attn(x, cache=cache)
        else:
            cu, max_len, pos = packed
            h = self.attn(x, position_ids=pos, cu_seqlens=cu, max_seqlen=max_len)
        x, residual = self.norm2.forward_residual(h.to(residual.dtype), residual)
        return self.mlp(x), residual


class Decoder(MFUMixin, nn.Module):
    """``forward(idx, targets=None) -> (logits, loss)``; see ``forward`` for when logits is None."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd) if c.pos == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.norm_f = make_norm(c)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one Parameter, two uses
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's init, used for Llama too: N(0, init_std) for every Linear and embedding,
        zero biases, unit norm weights, and the projections that write into the residual
        stream (attention ``proj``, MLP ``proj``/``down``) scaled by 1/sqrt(2 n_layer) so the
        stream's variance does not grow with depth (GPT-2 paper, sec. 2.3)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nnfast.LayerNorm, nnfast.RMSNorm)):
                module.reset_parameters()
        for block in self.blocks:
            for lin in (block.attn.proj, getattr(block.mlp, "proj", None),
                        getattr(block.mlp, "down", None)):
                if lin is not None:
                    nn.init.normal_(lin.weight, std=std / math.sqrt(2 * self.config.n_layer))

    # ------------------------------------------------------------------ forward
    def _check_idx(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
            got = getattr(idx, "dtype", type(idx))
            raise ValueError(f"idx must be an int32/int64 tensor, got {got}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must be (batch, time) with time >= 1, got {tuple(idx.shape)}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}"
            )
        if targets is not None and tuple(targets.shape) != tuple(idx.shape):
            raise ValueError(
                f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}"
            )
        # A GPU gather with a bad id dies with a device-side assert; one small sync is cheaper
        # than a lost run. Skipped while torch.compile traces (it would break the graph).
        if not torch.compiler.is_compiling():
            lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one device sync
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"token ids must be in [0, {self.config.vocab_size}), got {lo}..{hi}"
                )

    def hidden_states(self, idx: torch.Tensor, caches: list | None = None,
                      cu_seqlens: torch.Tensor | None = None,
                      max_seqlen: int | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d). With ``caches`` (``make_caches``) the tokens
        continue the cached sequence: they sit at positions ``caches[0].pos ..``, attend to
        the cached keys, and are appended to the caches. With ``cu_seqlens`` the B*T tokens
        are packed documents (see ``forward``)."""
        pos0 = 0 if caches is None else caches[0].pos
        x = self.wte(idx)  # (B, T, d)
        packed = None
        if cu_seqlens is not None:
            if caches is not None:
                raise ValueError("cu_seqlens (packed documents) cannot continue KV caches")
            pos = packed_positions(cu_seqlens, tuple(idx.shape))  # restart per document
            packed = (cu_seqlens, max_seqlen, pos)
        else:
            pos = torch.arange(pos0, pos0 + idx.shape[1], device=idx.device)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        h, residual = self.drop(x), None
        for i, block in enumerate(self.blocks):
            h, residual = block(h, residual, None if caches is None else caches[i], packed)
        return self.norm_f.forward_residual(h.to(residual.dtype), residual)[0]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        last_only: bool = False,
        ignore_index: int = -100,
        return_logits: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``idx`` (B, T) int token ids, ``targets`` (B, T) int or None.

        Without targets: ``(logits, None)``, logits (B, T, V), or (B, 1, V) with
        ``last_only`` (generation needs only the last position).
        With targets: ``(None, loss)`` by default; the loss comes from
        ``nnfast.functional.linear_cross_entropy`` over the hidden states and the head
        weight, which never materializes the (B*T, V) logits, so there are none to return.
        With ``return_logits=True`` (or ``config.fused_loss=False``): ``(logits, loss)``, the
        loss by ``F.cross_entropy`` on the logits. Targets equal to ``ignore_index`` do not
        count. The contract of every ``nnfast.models`` family (``nnfast.models.head``).
        ``cu_seqlens`` (int32, with ``max_seqlen``): the B*T tokens of ``idx``, row after
        row, are whole documents ``cu_seqlens[d] : cu_seqlens[d + 1]`` (no document crosses
        a row end): each attends only within itself, its positions (learned or RoPE) start
        at 0, and no padding is computed (``nnfast.functional.varlen_attention``).
        """
        self._check_idx(idx, targets)
        h = self.hidden_states(idx, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)  # (B, T, d)
        if targets is None and last_only:
            h = h[:, -1:]
        return lm_output(h, self.lm_head.weight, targets, return_logits=return_logits,
                         fused=self.config.fused_loss, ignore_index=ignore_index)

    # ------------------------------------------------------------------ generation
    def make_caches(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> list:
        """One empty ``nnfast.KVCache`` per layer on the model's device; ``dtype`` defaults to
        what attention sees: autocast's dtype when autocast is on, else the weights'."""
        c, w = self.config, self.wte.weight
        if dtype is None:
            on = torch.is_autocast_enabled(w.device.type)
            dtype = torch.get_autocast_dtype(w.device.type) if on else w.dtype
        return [
            nnfast.KVCache(batch_size, max_len, c.n_kv_head, c.head_dim, dtype, w.device)
            for _ in range(c.n_layer)
        ]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T); returns (B, T + new).

        ``temperature == 0`` is greedy. ``top_k`` keeps the k likeliest tokens, ``top_p`` the
        smallest set whose probability reaches p (nucleus). With ``use_cache`` the prompt
        runs in one pass and each new token alone against the KV cache; the context is the
        last ``block_size`` tokens, and once the cache is full the remaining tokens are
        computed as the uncached path does (the whole window recomputed), so both paths give
        the same tokens.
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        self._check_idx(idx[:, -self.config.block_size:])
        was_training = self.training
        self.eval()
        try:
            return self._generate(idx, max_new_tokens, temperature, top_k, top_p, use_cache,
                                  generator)
        finally:
            self.train(was_training)

    def _generate(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator):
        block = self.config.block_size
        caches = None
        window = idx[:, -block:]
        if use_cache and max_new_tokens > 0:
            max_len = min(block, window.shape[1] + max_new_tokens)
            caches = self.make_caches(idx.shape[0], max_len)
            logits = self.lm_head(self.hidden_states(window, caches)[:, -1])  # (B, V)
        for i in range(max_new_tokens):
            if caches is None:
                logits = self(idx[:, -block:], last_only=True)[0][:, -1]  # (B, V)
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, nxt.to(idx.dtype)), dim=1)
            if caches is not None and i + 1 < max_new_tokens:
                if caches[0].pos < caches[0].max_len:
                    logits = self.lm_head(self.hidden_states(nxt, caches)[:, -1])
                else:
                    caches = None  # full: fall back to recomputing the window
        return idx

    # ------------------------------------------------------------------ accounting
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, each shared tensor counted once. ``exclude_embeddings`` drops the
        position table and an untied token table (lookups, no FLOPs); a tied table stays
        because it is also the output head's matmul."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul parameter plus
        attention's 12 * n_layer * n_head * head_dim * T (PaLM's appendix B; the causal
        half is not subtracted, as in nanoGPT and llm.c, so MFUs compare)."""
        c = self.config
        T = seq_len or c.block_size
        attention = 12 * c.n_layer * c.n_head * c.head_dim * T
        return 6 * self.num_params(exclude_embeddings=True) + attention


def check_sampling(max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate_uncached(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, window: int,
                      temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The sampling loop of models without a KV cache: each new token from a full forward
    over the last ``window`` tokens, in eval mode (the mode is restored afterwards)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    model._check_idx(idx[:, -window:])
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = model(idx[:, -window:], last_only=True)[0][:, -1]  # (B, V)
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, nxt.to(idx.dtype)), dim=1)
    finally:
        model.train(was_training)
    return idx


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` (B, V) -> (B, 1); temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
