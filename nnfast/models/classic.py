"""The classic small language models of Karpathy's makemore series, on the decoders' contract.

Each predicts the next token from the previous ``context`` tokens only:

* ``bigram``: one token of context. ``mode="neural"`` learns a (V, V) logit table by gradient
  descent; ``mode="count"`` is the counting model, ``log((counts + alpha) / row sum)``.
* ``mlp``: Bengio et al. 2003, "A Neural Probabilistic Language Model": embed the context,
  concatenate, one tanh hidden layer (optionally BatchNorm before the tanh), a linear head.
* ``wavenet``: the hierarchical model of makemore part 5 (after van den Oord et al. 2016):
  fuse consecutive pairs of the context (``FlattenConsecutive``), Linear -> BatchNorm ->
  tanh, log2(context) times, so the context is merged like a binary tree.
* ``resmlp``: the concatenated context embedding through pre-norm residual MLP blocks
  (``x + MLP(LayerNorm(x))``, nnfast's modules), a final norm and a linear head.

The trainer feeds (B, T) windows and next-token targets, so every model predicts at every
position t from tokens ``t - context + 1 .. t`` (left-padded with an extra ``pad`` token,
id ``vocab_size``, where the window starts): ``forward(idx (B, T), targets (B, T)) ->
(logits (B, T, V), loss)``. ``block_size`` is only the training window length: each position
is an independent example, so B * T examples per batch.

Causality: logits at t depend on tokens ``<= t`` only, exactly so in eval mode. In training
mode BatchNorm (``wavenet``, ``mlp`` with ``batchnorm``) normalizes with the statistics of
the whole batch, later positions included, as every BatchNorm model does; the validation
loss is measured in eval mode (running statistics), where nothing crosses positions.

Train on Tiny Shakespeare (characters; ``--preset count`` for the counting bigram)::

    python -m nnfast train --model wavenet --preset shakespeare-char --data shakespeare \
        --max-steps 2000 --lr 3e-3 --out runs/wavenet
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as torch_F
from torch import nn

import nnfast
from nnfast.models.decoder import Decoder, generate_uncached
from nnfast.models.flops import MFUMixin


# ----------------------------------------------------------------------------- configs
@dataclass
class _ContextConfig:
    vocab_size: int = 256  # tokens in the vocabulary (the trainer sets the tokenizer's)
    block_size: int = 64  # training window length T (positions predicted per sequence)

    def _check_positive(self, *names: str) -> None:
        for name in ("vocab_size", "block_size", *names):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def _check_context(self) -> None:
        # Generation feeds the last `context` tokens through the model's checks.
        if self.context > self.block_size:
            raise ValueError(
                f"context ({self.context}) must be <= block_size ({self.block_size})"
            )


@dataclass
class BigramConfig(_ContextConfig):
    mode: str = "neural"  # "neural": a learned (V, V) logit table; "count": a count table
    alpha: float = 1.0  # count mode: additive smoothing (1.0 = Laplace); 0 = raw frequencies

    def __post_init__(self) -> None:
        self._check_positive()
        if self.mode not in ("neural", "count"):
            raise ValueError(f"mode must be 'neural' or 'count', got {self.mode!r}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")

    @property
    def context(self) -> int:
        return 1


@dataclass
class MLPConfig(_ContextConfig):
    context: int = 8  # tokens the prediction sees (Bengio's n - 1)
    n_embd: int = 24  # embedding width per token
    n_hidden: int = 512  # tanh hidden layer width
    batchnorm: bool = False  # BatchNorm1d before the tanh (makemore part 3); off in Bengio
    dropout: float = 0.0  # dropout on the hidden layer

    def __post_init__(self) -> None:
        self._check_positive("context", "n_embd", "n_hidden")
        self._check_context()
        _check_dropout(self.dropout)


@dataclass
class WaveNetConfig(_ContextConfig):
    context: int = 8  # tokens the prediction sees; a power of 2 (one fusion level per 2x)
    n_embd: int = 24  # embedding width per token
    n_hidden: int = 128  # width of every fusion level

    def __post_init__(self) -> None:
        self._check_positive("context", "n_embd", "n_hidden")
        self._check_context()
        if self.context < 2 or self.context & (self.context - 1):
            raise ValueError(f"context must be a power of 2 >= 2, got {self.context}")

    @property
    def n_levels(self) -> int:
        return self.context.bit_length() - 1


@dataclass
class ResMLPConfig(_ContextConfig):
    context: int = 16  # tokens the prediction sees
    n_embd: int = 32  # embedding width per token (concatenated: context * n_embd)
    d_model: int = 192  # width of the residual stream
    n_layer: int = 3  # residual blocks
    hidden_dim: int | None = None  # MLP width; None: 4 * d_model
    dropout: float = 0.0  # dropout on each block's output
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self._check_positive("context", "n_embd", "d_model", "n_layer")
        self._check_context()
        _check_dropout(self.dropout)
        if self.hidden_dim is None:
            self.hidden_dim = 4 * self.d_model
        if self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be positive, got {self.hidden_dim}")


def _check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")


# ----------------------------------------------------------------------------- shared base
class ContextLM(MFUMixin, nn.Module):
    """Shared machinery: windows of the last ``context`` tokens at every position, the loss,
    generation and accounting. A subclass implements ``predict(w)``: (N, context) ids ->
    (N, V) logits, ids in ``[0, vocab_size]`` (``vocab_size`` is the pad)."""

    config: _ContextConfig
    _check_idx = Decoder._check_idx  # the same id/shape checks and messages as the decoders

    def predict(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def windows(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, context): row t holds tokens t - context + 1 .. t."""
        n = self.config.context
        padded = torch_F.pad(idx, (n - 1, 0), value=self.config.vocab_size)  # (B, T + n - 1)
        return padded.unfold(1, n, 1)  # (B, T, n), a view

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        last_only: bool = False,
        ignore_index: int = -100,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``idx`` (B, T) ids, ``targets`` (B, T) or None -> (logits (B, T, V), loss or None);
        with ``last_only`` the logits of the last position only, (B, 1, V). The logits are
        small here, so they are always returned (``return_logits`` is accepted for the shared
        contract of ``nnfast.models.head``)."""
        self._check_idx(idx, targets)
        w = self.windows(idx)  # (B, T, n)
        if last_only:
            w = w[:, -1:]
        B, T, n = w.shape
        logits = self.predict(w.reshape(B * T, n)).view(B, T, -1)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = torch_F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                     ignore_index=ignore_index)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T); returns (B, T + new).
        Each step sees the last ``context`` tokens (the pad before the start). Sampling as
        ``Decoder.generate``: temperature 0 is greedy, ``top_k``, ``top_p`` (nucleus)."""
        # eval mode inside: BatchNorm's running statistics, no counting in count mode
        return generate_uncached(self, idx, max_new_tokens, self.config.context, temperature,
                                 top_k, top_p, generator)

    # ------------------------------------------------------------------ accounting
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters; ``exclude_embeddings`` drops the lookup tables (no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per predicted token: 6 per matmul parameter (2 forward, 4 backward).
        Lookups count nothing, so a bigram's is 0. ``seq_len`` does not matter: each
        position costs the same (accepted for the decoders' signature)."""
        return 6 * self.num_params(exclude_embeddings=True)

    def _shrink_head(self, head: nn.Linear) -> None:
        # makemore's init: a 10x smaller output layer starts near the uniform distribution
        # (loss ~ log V) instead of confidently wrong.
        with torch.no_grad():
            head.weight.mul_(0.1)
            if head.bias is not None:
                head.bias.zero_()


# ----------------------------------------------------------------------------- bigram
class Bigram(ContextLM):
    """The next token from the current one alone.

    ``mode="count"`` has no trainable parameters: ``counts`` (a (V, V) int64 buffer, saved
    in checkpoints) is filled by ``fit(ids)``, or by ``forward`` in training mode, which
    adds each (token, target) pair of the batch after computing the loss with the counts
    so far (so the training loss is honest: measured before the batch is counted). Its
    loss is returned as a leaf that requires grad so that the trainer's ``backward`` is a
    no-op; the optimizer then steps over no parameters. Single process only: DDP refuses
    a model without trainable parameters (ranks would count separately anyway).
    """

    def __init__(self, config: BigramConfig) -> None:
        super().__init__()
        self.config = config
        V = config.vocab_size
        if config.mode == "neural":
            # Row i of the (V, V) embedding is the logits after token i. Zero init: the
            # uniform distribution, loss log V; a table has no symmetry to break.
            self.table = nn.Embedding(V, V)
            nn.init.zeros_(self.table.weight)
        else:
            self.register_buffer("counts", torch.zeros(V, V, dtype=torch.int64))

    def log_probs(self) -> torch.Tensor:
        """Count mode: the (V, V) table of log P(next | current), smoothed by ``alpha``."""
        c = self.counts.double() + self.config.alpha
        # A row never seen with alpha 0: uniform rather than 0/0.
        c = torch.where(c.sum(1, keepdim=True) > 0, c, torch.ones_like(c))
        return (c / c.sum(1, keepdim=True)).log().float()

    def predict(self, w: torch.Tensor) -> torch.Tensor:
        if self.config.mode == "neural":
            return self.table(w[:, 0])  # (N, V)
        return self.log_probs()[w[:, 0]]

    def windows(self, idx: torch.Tensor) -> torch.Tensor:
        return idx.unsqueeze(-1)  # (B, T, 1): one token of context, never a pad

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        last_only: bool = False,
        ignore_index: int = -100,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, loss = super().forward(idx, targets, last_only=last_only,
                                       ignore_index=ignore_index)
        if self.config.mode == "count" and targets is not None and self.training:
            keep = targets != ignore_index
            self.add_counts(idx[keep], targets[keep])
            if torch.is_grad_enabled():
                loss = loss.detach().requires_grad_()
        return logits, loss

    @torch.no_grad()
    def add_counts(self, current: torch.Tensor, nxt: torch.Tensor) -> None:
        """Count each pair ``(current[i], nxt[i])``."""
        if self.config.mode != "count":
            raise RuntimeError("add_counts needs mode='count'")
        ones = torch.ones(current.numel(), dtype=self.counts.dtype, device=self.counts.device)
        self.counts.index_put_((current.flatten(), nxt.flatten()), ones, accumulate=True)

    def fit(self, ids) -> Bigram:
        """Count every consecutive pair of ``ids`` (a 1-D sequence of token ids: tensor,
        numpy array or list; or a list of such sequences, pairs never crossing two).
        Adds to the counts so far; returns self."""
        if self.config.mode != "count":
            raise RuntimeError("fit needs mode='count' (the neural bigram trains by gradient)")
        many = isinstance(ids, (list, tuple)) and len(ids) > 0 and hasattr(ids[0], "__len__")
        seqs = ids if many else [ids]
        for seq in seqs:
            seq = torch.as_tensor(seq, dtype=torch.long, device=self.counts.device).flatten()
            if seq.numel() and (int(seq.min()) < 0 or int(seq.max()) >= self.config.vocab_size):
                raise ValueError(
                    f"token ids must be in [0, {self.config.vocab_size}), "
                    f"got {int(seq.min())}..{int(seq.max())}"
                )
            self.add_counts(seq[:-1], seq[1:])
        return self


# ----------------------------------------------------------------------------- MLP
class MLPLM(ContextLM):
    """Bengio et al. 2003: ``head(tanh([BN](fc(concat(emb(context))))))``."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size + 1, c.n_embd)  # + 1: the pad
        # BatchNorm has its own shift: a bias before it would be removed by the mean.
        self.fc = nn.Linear(c.context * c.n_embd, c.n_hidden, bias=not c.batchnorm)
        self.bn = nn.BatchNorm1d(c.n_hidden) if c.batchnorm else nn.Identity()
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.n_hidden, c.vocab_size)
        self._shrink_head(self.head)

    def predict(self, w: torch.Tensor) -> torch.Tensor:
        x = self.wte(w).flatten(1)  # (N, n * C)
        return self.head(self.drop(torch.tanh(self.bn(self.fc(x)))))


# ----------------------------------------------------------------------------- WaveNet
class FuseLevel(nn.Module):
    """(N, L, C) -> (N, L / 2, H): concatenate consecutive pairs (makemore's
    ``FlattenConsecutive(2)``), then Linear -> BatchNorm -> tanh."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * in_dim, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, C = x.shape
        x = self.fc(x.reshape(N, L // 2, 2 * C))  # (N, L / 2, H)
        # BatchNorm over every (example, position) pair, as makemore's fixed BatchNorm1d
        # that reduces over dims (0, 1): one set of statistics per channel.
        return torch.tanh(self.bn(x.flatten(0, 1)).view_as(x))


class WaveNet(ContextLM):
    """Embed the context, fuse pairs log2(context) times, a linear head."""

    def __init__(self, config: WaveNetConfig) -> None:
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size + 1, c.n_embd)
        widths = [c.n_embd] + [c.n_hidden] * c.n_levels
        self.levels = nn.ModuleList(FuseLevel(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(c.n_hidden, c.vocab_size)
        self._shrink_head(self.head)

    def predict(self, w: torch.Tensor) -> torch.Tensor:
        x = self.wte(w)  # (N, context, C)
        for level in self.levels:
            x = level(x)  # (N, L / 2, H)
        return self.head(x[:, 0])  # (N, V)


# ----------------------------------------------------------------------------- residual MLP
class ResBlock(nn.Module):
    def __init__(self, c: ResMLPConfig) -> None:
        super().__init__()
        self.norm = nnfast.LayerNorm(c.d_model, eps=c.norm_eps)
        self.mlp = nnfast.MLP(c.d_model, c.hidden_dim, dropout=c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class ResMLP(ContextLM):
    """``head(norm(blocks(proj(concat(emb(context))))))``, pre-norm residual blocks."""

    def __init__(self, config: ResMLPConfig) -> None:
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size + 1, c.n_embd)
        self.proj = nn.Linear(c.context * c.n_embd, c.d_model)
        self.blocks = nn.ModuleList(ResBlock(c) for _ in range(c.n_layer))
        self.norm_f = nnfast.LayerNorm(c.d_model, eps=c.norm_eps)
        self.head = nn.Linear(c.d_model, c.vocab_size)
        # Each block adds to the stream: scale its output projection by 1/sqrt(n_layer) so
        # the stream's variance at init does not grow with depth (as GPT-2's init).
        with torch.no_grad():
            for block in self.blocks:
                block.mlp.proj.weight.mul_(1 / math.sqrt(c.n_layer))
        self._shrink_head(self.head)

    def predict(self, w: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.wte(w).flatten(1))  # (N, d)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_f(x))  # (N, V)


# ----------------------------------------------------------------------------- presets
# `shakespeare-char` sizes were chosen for a short CPU run on Tiny Shakespeare (65 chars);
# the trainer sets vocab_size from the tokenizer, so presets leave it at the default.
BIGRAM_PRESETS = {
    "shakespeare-char": {"mode": "neural", "block_size": 64},
    "count": {"mode": "count", "block_size": 64},
    "debug": {"mode": "neural", "vocab_size": 97, "block_size": 16},
}
MLP_PRESETS = {
    "shakespeare-char": {"context": 8, "n_embd": 24, "n_hidden": 512, "block_size": 64},
    "bengio": {"context": 3, "n_embd": 10, "n_hidden": 200, "block_size": 64},
    "debug": {"vocab_size": 97, "block_size": 16, "context": 4, "n_embd": 8, "n_hidden": 32},
}
WAVENET_PRESETS = {
    "shakespeare-char": {"context": 8, "n_embd": 24, "n_hidden": 128, "block_size": 64},
    "debug": {"vocab_size": 97, "block_size": 16, "context": 8, "n_embd": 8, "n_hidden": 32},
}
RESMLP_PRESETS = {
    "shakespeare-char": {"context": 16, "n_embd": 32, "d_model": 192, "n_layer": 3,
                         "block_size": 64},
    "debug": {"vocab_size": 97, "block_size": 16, "context": 8, "n_embd": 8, "d_model": 32,
              "n_layer": 2},
}
