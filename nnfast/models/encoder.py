"""The one encoder stack and the one decoder stack that BERT, T5 and the original Transformer
share, plus the encoder-decoder model that T5 and the Transformer subclass. What differs
between the three is config, not code:

============  ===========  ========  =======================  ==================  =====
model         norm place   norm      positions                MLP                 bias
============  ===========  ========  =======================  ==================  =====
BERT          post         LayerNorm learned + token types    GELU (erf)          yes
T5 (v1.1)     pre          RMSNorm   relative bias (buckets)  gated GELU (tanh)   no
Transformer   post         LayerNorm sinusoidal               ReLU                yes
============  ===========  ========  =======================  ==================  =====

Masks follow SDPA's convention (bool True = take part, or a float added to the scores). Key
padding is ``(B, S)`` bool -> ``(B, 1, 1, S)``; T5's learned relative bias is a float
``(1, H, T, S)`` (with the padding folded in as -inf it becomes ``(B, H, T, S)``) that reaches
the attention kernel as an additive mask, whose gradient the kernel returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import nnfast
from nnfast.models.flops import MFUMixin
from nnfast.models.head import lm_output

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "gated-gelu", "relu")
POSITIONS = ("learned", "sinusoidal", "relative")


# ----------------------------------------------------------------------------- config
@dataclass
class EncDecConfig:
    """Fields of an encoder-decoder model (T5, Transformer). BERT has its own config with the
    same stack fields (the stacks read only ``n_embd, n_head, hidden_dim, norm, norm_eps,
    prenorm, mlp, bias, dropout, attn_scale``)."""

    vocab_size: int = 32000  # the tokenizer's vocabulary; special tokens are appended above it
    block_size: int = 512  # longest encoder input and longest decoder sequence
    n_layer: int = 6  # encoder layers
    n_dec_layer: int | None = None  # decoder layers; None: n_layer
    n_head: int = 8
    n_embd: int = 512
    hidden_dim: int | None = None  # MLP width; None: 4 * n_embd
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    prenorm: bool = False  # pre-LN (T5) or post-LN (BERT, Transformer)
    mlp: str = "relu"
    pos: str = "sinusoidal"
    bias: bool = True
    dropout: float = 0.1
    attn_scale: float | None = None  # softmax scale; None: 1/sqrt(head_dim); T5: 1.0
    tie_embeddings: bool = True  # output head shares the token embedding
    scale_embeddings: bool = True  # Transformer: embeddings * sqrt(d)
    rel_buckets: int = 32  # T5's relative-position buckets ...
    rel_max_distance: int = 128  # ... and the distance where the log buckets end
    label_smoothing: float = 0.0
    init_std: float = 0.02
    # Decoder states * d^-0.5 before the head; None: when the head is tied (T5). Hugging
    # Face's T5 ties the head always and says by this flag whether to scale.
    scale_decoder_output: bool | None = None

    def __post_init__(self) -> None:
        check_stack_config(self, ("vocab_size", "block_size", "n_layer"))
        if self.n_dec_layer is None:
            self.n_dec_layer = self.n_layer
        if self.pos not in POSITIONS:
            raise ValueError(f"pos must be one of {POSITIONS}, got {self.pos!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    n_special = 0  # overridden by subclasses: PAD, EOS, ... live at ids vocab_size ..

    @property
    def total_vocab(self) -> int:
        """Rows of the embedding: the tokenizer's vocabulary plus the special tokens."""
        return self.vocab_size + self.n_special

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def check_stack_config(c, positive: tuple[str, ...]) -> None:
    """Validate the stack fields shared by every config here; derive ``hidden_dim``."""
    for name in (*positive, "n_head", "n_embd"):
        if getattr(c, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(c, name)}")
    if c.n_embd % c.n_head:
        raise ValueError(f"n_embd ({c.n_embd}) must be divisible by n_head ({c.n_head})")
    if c.norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {c.norm!r}")
    if c.mlp not in MLPS:
        raise ValueError(f"mlp must be one of {MLPS}, got {c.mlp!r}")
    if not 0.0 <= c.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {c.dropout}")
    if c.hidden_dim is None:
        c.hidden_dim = 4 * c.n_embd


# ----------------------------------------------------------------------------- pieces
def make_norm(c) -> nn.Module:
    if c.norm == "layernorm":
        return nnfast.LayerNorm(c.n_embd, eps=c.norm_eps, bias=c.bias)
    return nnfast.RMSNorm(c.n_embd, eps=c.norm_eps)  # T5: no mean subtraction, no bias


class ReluMLP(nn.Module):
    """Vaswani's position-wise FFN ``proj(relu(fc(x)))`` (plain PyTorch: no kernel to fuse)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden_dim, bias=bias)
        self.proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(torch.relu(self.fc(x))))


def make_mlp(c) -> nn.Module:
    if c.mlp == "relu":
        return ReluMLP(c.n_embd, c.hidden_dim, c.bias, c.dropout)
    if c.mlp == "gated-gelu":
        return nnfast.GatedMLP(c.n_embd, c.hidden_dim, bias=c.bias, activation="gelu_tanh",
                               dropout=c.dropout)
    return nnfast.MLP(c.n_embd, c.hidden_dim, bias=c.bias, activation=c.mlp, dropout=c.dropout)


def sinusoidal_table(n: int, dim: int) -> torch.Tensor:
    """Vaswani's PE: ``sin(p / 10000^(2i/d))`` in even channels, ``cos`` in odd ones. (n, dim)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


def relative_bucket(rel: torch.Tensor, bidirectional: bool, n_buckets: int,
                    max_distance: int) -> torch.Tensor:
    """T5's bucket of ``rel = key_pos - query_pos``: exact buckets for small distances,
    logarithmic ones up to ``max_distance``, one last bucket beyond; the encoder splits the
    buckets between both directions, the decoder (causal) uses them all for the past."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        n_buckets //= 2
        bucket = bucket + (rel > 0).long() * n_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    exact = n_buckets // 2
    # clamp(min=1) only keeps log() finite where `is_small` discards the value anyway.
    large = exact + (torch.log(rel.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                     * (n_buckets - exact)).long()
    large = large.clamp(max=n_buckets - 1)
    return bucket + torch.where(rel < exact, rel, large)


class RelativePositionBias(nn.Module):
    """T5's learned bias: one scalar per (bucket, head), shared by all layers of a stack."""

    def __init__(self, n_head: int, n_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.n_buckets, self.max_distance = n_buckets, max_distance
        self.bidirectional = bidirectional
        self.table = nn.Embedding(n_buckets, n_head)

    def forward(self, T: int, S: int, offset: int = 0) -> torch.Tensor:
        """Bias ``(1, H, T, S)`` for queries at positions ``offset ..`` and keys at ``0 .. S-1``."""
        device = self.table.weight.device
        q = torch.arange(offset, offset + T, device=device)[:, None]  # (T, 1)
        k = torch.arange(S, device=device)[None, :]  # (1, S)
        buckets = relative_bucket(k - q, self.bidirectional, self.n_buckets, self.max_distance)
        return self.table(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, S)


def key_padding(mask: torch.Tensor | None, bias: torch.Tensor | None = None):
    """Combine a key-padding mask (B, S) bool (True = real token) with an optional float bias
    (1, H, T, S) into one SDPA mask: bool (B, 1, 1, S), float (B, H, T, S), or the bias."""
    if mask is None:
        return bias
    m = mask[:, None, None, :]  # (B, 1, 1, S)
    if bias is None:
        return m
    return bias.masked_fill(~m, float("-inf"))


def to_autocast(x: torch.Tensor) -> torch.Tensor:
    """Embeddings into autocast's dtype: the residual stream then has one dtype, which the
    fused add + norm of the post-LN layers requires (as the decoder does; llm.c too)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def check_ids(name: str, ids: torch.Tensor, vocab: int, max_len: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32/int64 tensor, got {getattr(ids, 'dtype', ids)}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must be (batch, time) with time >= 1, got {tuple(ids.shape)}")
    if ids.shape[1] > max_len:
        raise ValueError(f"{name} length {ids.shape[1]} exceeds block_size {max_len}")
    if not torch.compiler.is_compiling():  # a bad id on a GPU is a device-side assert
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} ids must be in [0, {vocab}), got {lo}..{hi}")


def check_mask(name: str, mask: torch.Tensor | None, ids: torch.Tensor) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"{name} must be a bool tensor of shape {tuple(ids.shape)} "
                         f"(True = real token), got {mask.dtype} {tuple(mask.shape)}")


# ----------------------------------------------------------------------------- layers
def _attention(c, causal: bool) -> nnfast.SelfAttention:
    return nnfast.SelfAttention(c.n_embd, c.n_head, causal=causal, bias=c.bias,
                                dropout=c.dropout, scale=c.attn_scale)


def _sublayer(prenorm: bool, norm: nn.Module, x: torch.Tensor, fn) -> torch.Tensor:
    """Pre-LN: ``x + fn(norm(x))``; post-LN: ``norm(x + fn(x))`` (the add fused in the norm)."""
    if prenorm:
        return x + fn(norm(x))
    return norm.forward_residual(fn(x), x)[0]


class EncoderLayer(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.prenorm = c.prenorm
        self.norm1, self.attn = make_norm(c), _attention(c, causal=False)
        self.norm2, self.mlp = make_norm(c), make_mlp(c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = _sublayer(self.prenorm, self.norm1, x, lambda h: self.attn(h, attn_mask=mask))
        return _sublayer(self.prenorm, self.norm2, x, self.mlp)


class DecoderLayer(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.prenorm = c.prenorm
        self.norm1, self.attn = make_norm(c), _attention(c, causal=True)
        self.norm2 = make_norm(c)
        self.cross = nnfast.CrossAttention(c.n_embd, c.n_head, bias=c.bias, dropout=c.dropout,
                                           scale=c.attn_scale)
        self.norm3, self.mlp = make_norm(c), make_mlp(c)

    def forward(self, x, self_mask, memory, cross_mask, cache=None, memory_kv=None):
        x = _sublayer(self.prenorm, self.norm1, x,
                      lambda h: self.attn(h, attn_mask=self_mask, cache=cache))
        x = _sublayer(self.prenorm, self.norm2, x,
                      lambda h: self.cross(h, memory if memory_kv is None else None,
                                           attn_mask=cross_mask, memory_kv=memory_kv))
        return _sublayer(self.prenorm, self.norm3, x, self.mlp)


class EncoderStack(nn.Module):
    """``n_layer`` encoder layers (+ the final norm of a pre-LN stack)."""

    def __init__(self, c, n_layer: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(n_layer))
        self.norm_f = make_norm(c) if c.prenorm else None
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x if self.norm_f is None else self.drop(self.norm_f(x))


class DecoderStack(nn.Module):
    """``n_layer`` decoder layers: causal self-attention (KV-cached in generation),
    cross-attention to the encoder's output, MLP."""

    def __init__(self, c, n_layer: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(n_layer))
        self.norm_f = make_norm(c) if c.prenorm else None
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, self_mask, memory, cross_mask, caches=None, memory_kvs=None):
        for i, layer in enumerate(self.layers):
            x = layer(x, self_mask, memory, cross_mask,
                      None if caches is None else caches[i],
                      None if memory_kvs is None else memory_kvs[i])
        return x if self.norm_f is None else self.drop(self.norm_f(x))


def init_weights(model: nn.Module, std: float) -> None:
    """N(0, std) Linear/Embedding weights, zero biases, unit norms (BERT's init; used for all)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nnfast.LayerNorm, nnfast.RMSNorm)):
            m.reset_parameters()


# ----------------------------------------------------------------------------- encoder-decoder
class EncoderDecoder(MFUMixin, nn.Module):
    """T5 and the Transformer: ``forward(src, tgt_in, targets=None, src_mask=None)``.

    ``src`` (B, S) encoder ids, ``src_mask`` (B, S) bool (True = real; None: derived as
    ``src != pad_id``), ``tgt_in`` (B, T) decoder input (targets shifted right behind a start
    token), ``targets`` (B, T) with -100 where nothing is predicted. The decoder needs no
    padding mask: it is causal, so a real position never sees the padding after it.
    """

    def __init__(self, config: EncDecConfig) -> None:
        super().__init__()
        self.config = c = config
        self.pad_id = c.vocab_size  # the first special token; subclasses name the others
        self.wte = nn.Embedding(c.total_vocab, c.n_embd)
        if c.pos == "sinusoidal":
            self.register_buffer("pe", sinusoidal_table(c.block_size, c.n_embd), persistent=False)
        self.wpe = nn.Embedding(c.block_size, c.n_embd) if c.pos == "learned" else None
        self.enc_bias = self.dec_bias = None
        if c.pos == "relative":
            self.enc_bias = RelativePositionBias(c.n_head, c.rel_buckets, c.rel_max_distance, True)
            self.dec_bias = RelativePositionBias(c.n_head, c.rel_buckets, c.rel_max_distance,
                                                 False)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = EncoderStack(c, c.n_layer)
        self.decoder = DecoderStack(c, c.n_dec_layer)
        self.lm_head = nn.Linear(c.n_embd, c.total_vocab, bias=False)
        init_weights(self, c.init_std)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    # ------------------------------------------------------------------ pieces
    def embed(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        c = self.config
        x = self.wte(ids)  # (B, T, d)
        if c.scale_embeddings:
            x = x * math.sqrt(c.n_embd)
        if c.pos == "sinusoidal":
            x = x + self.pe[offset:offset + ids.shape[1]]
        elif self.wpe is not None:
            x = x + self.wpe(torch.arange(offset, offset + ids.shape[1], device=ids.device))
        return self.drop(to_autocast(x))

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, S, d)."""
        c = self.config
        check_ids("src", src, c.total_vocab, c.block_size)
        check_mask("src_mask", src_mask, src)
        if src_mask is None:
            src_mask = src != self.pad_id
        bias = None if self.enc_bias is None else self.enc_bias(src.shape[1], src.shape[1])
        return self.encoder(self.embed(src), key_padding(src_mask, bias))

    def decode(self, tgt_in, memory, src_mask, caches=None, memory_kvs=None) -> torch.Tensor:
        """Decoder hidden states (B, T, d), scaled for a tied head as T5 does."""
        c = self.config
        offset = 0 if caches is None else caches[0].pos
        if offset + tgt_in.shape[1] > c.block_size:
            raise ValueError(f"decoder length {offset + tgt_in.shape[1]} exceeds block_size "
                             f"{c.block_size}")
        self_bias = None
        if self.dec_bias is not None:
            self_bias = self.dec_bias(tgt_in.shape[1], offset + tgt_in.shape[1], offset)
        cross_mask = key_padding(src_mask)
        h = self.decoder(self.embed(tgt_in, offset), self_bias, memory, cross_mask, caches,
                         memory_kvs)
        scale = c.scale_decoder_output
        if scale or (scale is None and c.tie_embeddings and c.pos == "relative"):
            h = h * c.n_embd ** -0.5  # T5 rescales before a tied head (mesh-tensorflow)
        return h

    def _src_mask(self, src, src_mask):
        return src != self.pad_id if src_mask is None else src_mask

    def forward(self, src, tgt_in, targets=None, src_mask=None, *, return_logits: bool = False):
        """``(logits (B, T, V), None)`` without targets, else ``(None, loss)`` from the fused
        linear + cross-entropy (label smoothing from the config), or ``(logits, loss)`` with
        ``return_logits=True`` (``nnfast.models.head``)."""
        c = self.config
        check_ids("tgt_in", tgt_in, c.total_vocab, c.block_size)
        if targets is not None and tuple(targets.shape) != tuple(tgt_in.shape):
            raise ValueError(f"targets must have tgt_in's shape {tuple(tgt_in.shape)}, "
                             f"got {tuple(targets.shape)}")
        memory = self.encode(src, src_mask)
        h = self.decode(tgt_in, memory, self._src_mask(src, src_mask))
        return lm_output(h, self.lm_head.weight, targets, return_logits=return_logits,
                         label_smoothing=c.label_smoothing)

    # ------------------------------------------------------------------ generation
    def make_caches(self, batch_size: int, max_len: int, dtype=None) -> list:
        c, w = self.config, self.wte.weight
        if dtype is None:
            on = torch.is_autocast_enabled(w.device.type)
            dtype = torch.get_autocast_dtype(w.device.type) if on else w.dtype
        return [nnfast.KVCache(batch_size, max_len, c.n_head, c.head_dim, dtype, w.device)
                for _ in range(c.n_dec_layer)]

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_new_tokens: int, start_id: int,
                 eos_id: int | None = None, src_mask: torch.Tensor | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding: ``(B, 1 + n)`` ids beginning with ``start_id``. With ``use_cache``
        the encoder's keys/values are projected once per layer and the decoder's own keys and
        values are cached; without, the whole prefix is recomputed each step (same tokens).
        Rows that emitted ``eos_id`` continue with padding."""
        c = self.config
        max_new_tokens = min(max_new_tokens, c.block_size - 1)
        was_training = self.training
        self.eval()
        try:
            src_mask = self._src_mask(src, src_mask)
            memory = self.encode(src, src_mask)
            out = torch.full((src.shape[0], 1), start_id, dtype=torch.long, device=src.device)
            caches = kvs = None
            if use_cache:
                caches = self.make_caches(src.shape[0], max_new_tokens + 1)
                kvs = [layer.cross.project_memory(memory) for layer in self.decoder.layers]
            done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
            for _ in range(max_new_tokens):
                step_in = out[:, -1:] if use_cache else out
                h = self.decode(step_in, memory, src_mask, caches, kvs)[:, -1]  # (B, d)
                nxt = self.lm_head(h).argmax(-1)  # (B,)
                nxt = torch.where(done, self.pad_id, nxt)
                out = torch.cat((out, nxt[:, None]), dim=1)
                if eos_id is not None:
                    done |= nxt == eos_id
                    if bool(done.all()):
                        break
            return out
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ accounting
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, shared ones once; ``exclude_embeddings`` drops an untied token table
        and the position tables (lookups, no matmul FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
            for b in (self.enc_bias, self.dec_bias):
                if b is not None:
                    n -= b.table.weight.numel()
        return n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward) counting one encoder token and one
        decoder token per position (their lengths are similar in these tasks): 6 per matmul
        parameter plus 12 * layers * d * T for each attention (self, self, cross)."""
        c = self.config
        T = seq_len or c.block_size
        attention = 12 * (c.n_layer + 2 * c.n_dec_layer) * c.n_embd * T
        return 6 * self.num_params(exclude_embeddings=True) + attention


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Argmax accuracy over the positions whose target is not -100 (0 when there are none)."""
    keep = targets != -100
    n = int(keep.sum())
    if n == 0:
        return 0.0
    return float((logits.argmax(-1)[keep] == targets[keep]).sum()) / n


__all__ = ["DecoderStack", "EncDecConfig", "EncoderDecoder", "EncoderStack"]
