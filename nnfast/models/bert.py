"""BERT (Devlin et al. 2019) on the shared encoder stack: learned positions and token types,
post-LN, GELU, bidirectional attention with key-padding masks, masked-LM pre-training.

Special tokens sit above the tokenizer's vocabulary: ``[PAD] [MASK] [CLS] [SEP]`` at ids
``vocab_size .. vocab_size + 3``. ``bert-base`` with ``vocab_size=30518`` (30522 embedding
rows, as the published checkpoint) has 109,514,298 parameters: ``BertForMaskedLM`` (the MLM
head's transform and output bias, decoder tied; no pooler, no next-sentence head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import nnfast
from nnfast import functional as F
from nnfast.models import objectives
from nnfast.models.encoder import (
    EncoderStack,
    check_ids,
    check_mask,
    check_stack_config,
    init_weights,
    key_padding,
    to_autocast,
    token_accuracy,
)
from nnfast.models.flops import MFUMixin
from nnfast.models.head import lm_output

N_SPECIAL = 4  # [PAD] [MASK] [CLS] [SEP]


@dataclass
class BertConfig:
    vocab_size: int = 30518  # the tokenizer's; the 4 special tokens are appended
    block_size: int = 512  # position table rows = longest sequence
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    hidden_dim: int | None = None  # None: 4 * n_embd
    type_vocab_size: int = 2  # segment A / B
    norm: str = "layernorm"
    norm_eps: float = 1e-12
    prenorm: bool = False
    mlp: str = "gelu"  # exact (erf) GELU, as BERT
    bias: bool = True
    dropout: float = 0.1
    attn_scale: float | None = None
    init_std: float = 0.02
    mask_prob: float = 0.15  # MLM: fraction of tokens chosen
    pad_fraction: float = 0.25  # prepare_batch: rows truncated to a random length and padded

    def __post_init__(self) -> None:
        check_stack_config(self, ("vocab_size", "block_size", "n_layer", "type_vocab_size"))
        if self.block_size < 3:
            raise ValueError(f"block_size must be >= 3 ([CLS] x [SEP]), got {self.block_size}")
        for name in ("mask_prob", "pad_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    n_special = N_SPECIAL

    @property
    def total_vocab(self) -> int:
        return self.vocab_size + N_SPECIAL

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


BERT: dict[str, Any] = dict(norm="layernorm", prenorm=False, mlp="gelu", bias=True,
                            norm_eps=1e-12)
BERT_PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": {**BERT, "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 512},
    "bert-large": {**BERT, "n_layer": 24, "n_head": 16, "n_embd": 1024, "block_size": 512},
    # Turc et al. 2019's BERT-Small (L=4, H=512).
    "bert-small": {**BERT, "n_layer": 4, "n_head": 8, "n_embd": 512, "block_size": 512},
    "debug": {**BERT, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
              "vocab_size": 97, "dropout": 0.0},
}


class Bert(MFUMixin, nn.Module):
    """``forward(idx, targets=None, padding_mask=None, token_type_ids=None)``.

    ``padding_mask`` (B, T) bool, True = real token (None: ``idx != pad_id``). Without
    targets: ``(logits (B, T, V), None)``; with targets (-100 = not predicted):
    ``(None, loss)`` through the fused linear + cross-entropy, or ``(logits, loss)`` with
    ``return_logits=True`` (``nnfast.models.head``)."""

    demo_title = "masked-LM demo (every 7th token masked)"  # the trainer's label for demo()

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = c = config
        V = c.vocab_size
        self.pad_id, self.mask_id, self.cls_id, self.sep_id = V, V + 1, V + 2, V + 3
        self.wte = nn.Embedding(c.total_vocab, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.wtt = nn.Embedding(c.type_vocab_size, c.n_embd)
        self.norm_emb = nnfast.LayerNorm(c.n_embd, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = EncoderStack(c, c.n_layer)
        # MLM head: dense -> GELU -> LayerNorm, then the tied embedding plus a bias.
        self.head_fc = nn.Linear(c.n_embd, c.n_embd)
        self.head_norm = nnfast.LayerNorm(c.n_embd, eps=c.norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(c.total_vocab))
        init_weights(self, c.init_std)

    def hidden_states(self, idx, padding_mask=None, token_type_ids=None) -> torch.Tensor:
        """The MLM head's transformed states (B, T, d)."""
        c = self.config
        check_ids("idx", idx, c.total_vocab, c.block_size)
        check_mask("padding_mask", padding_mask, idx)
        if token_type_ids is not None:
            if tuple(token_type_ids.shape) != tuple(idx.shape):
                raise ValueError(f"token_type_ids must have idx's shape {tuple(idx.shape)}, "
                                 f"got {tuple(token_type_ids.shape)}")
            check_ids("token_type_ids", token_type_ids, c.type_vocab_size, c.block_size)
        if padding_mask is None:
            padding_mask = idx != self.pad_id
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        x = x + (self.wtt.weight[0] if token_type_ids is None else self.wtt(token_type_ids))
        x = self.drop(self.norm_emb(to_autocast(x)))
        h = self.encoder(x, key_padding(padding_mask))
        return self.head_norm(F.gelu(self.head_fc(h)))

    def forward(self, idx, targets=None, padding_mask=None, token_type_ids=None, *,
                return_logits: bool = False):
        if targets is not None and tuple(targets.shape) != tuple(idx.shape):
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, "
                             f"got {tuple(targets.shape)}")
        h = self.hidden_states(idx, padding_mask, token_type_ids)
        return lm_output(h, self.wte.weight, targets, bias=self.head_bias,
                         return_logits=return_logits)

    # ------------------------------------------------------------------ trainer hooks
    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
        """Raw windows (B, block_size) -> ``[CLS] text [SEP]`` rows, ``pad_fraction`` of them
        cut to a random length and padded, then MLM-masked."""
        c = self.config
        B, T = x.shape[0], min(x.shape[1] + 2, c.block_size)
        dev = x.device
        ids = torch.full((B, T), self.pad_id, dtype=torch.long, device=dev)
        ids[:, 1:T - 1] = x[:, :T - 2]
        ids[:, 0] = self.cls_id
        lengths = torch.full((B, 1), T, dtype=torch.long, device=dev)
        cut = torch.rand(B, 1, device=dev) < c.pad_fraction
        lengths = torch.where(cut, torch.randint(3, T + 1, (B, 1), device=dev), lengths)
        pos = torch.arange(T, device=dev)
        real = pos < lengths  # (B, T)
        ids = torch.where(real, ids, self.pad_id)
        ids.scatter_(1, lengths - 1, self.sep_id)
        eligible = real & (ids < c.vocab_size)
        inputs, targets = objectives.mlm_mask(ids, eligible, self.mask_id, c.vocab_size,
                                              c.mask_prob)
        return {"idx": inputs, "targets": targets, "padding_mask": real}

    @torch.no_grad()
    def metrics(self, idx, targets, padding_mask=None, token_type_ids=None) -> dict[str, float]:
        """``mlm_acc``: argmax accuracy on the masked positions."""
        logits = self(idx, None, padding_mask, token_type_ids)[0]
        return {"mlm_acc": token_accuracy(logits, targets)}

    @torch.no_grad()
    def demo(self, tokenizer) -> str:
        """Mask every 7th token of a fixed sentence and show the model's fills."""
        text = "First Citizen: Before we proceed any further, hear me speak."
        ids = encode_known(tokenizer, text)[: self.config.block_size - 2]
        if len(ids) < 2:
            return "(demo: the tokenizer cannot encode the demo sentence)"
        dev = self.wte.weight.device
        row = torch.tensor([self.cls_id, *ids, self.sep_id], device=dev)[None]
        masked = torch.arange(row.shape[1], device=dev) % 7 == 3
        masked[0] = masked[-1] = False
        inp = torch.where(masked, self.mask_id, row)
        was = self.training
        self.eval()
        pred = self(inp)[0].argmax(-1)
        self.train(was)
        fill = torch.where(masked, pred, row)[0, 1:-1].tolist()
        show = [t if t < self.config.vocab_size else 0 for t in fill]
        return (f"input:     {tokenizer.decode(ids)}\nmasked:    "
                f"{int(masked.sum())} tokens\nmodel:     {tokenizer.decode(show)}")

    # ------------------------------------------------------------------ accounting
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters; ``exclude_embeddings`` drops the position and token-type tables (the
        token table stays: it is also the MLM head's matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wpe.weight.numel() + self.wtt.weight.numel()
        return n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """6 per matmul parameter + 12 * n_layer * d * T (bidirectional attention)."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params(exclude_embeddings=True) + 12 * c.n_layer * c.n_embd * T


def encode_known(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode(text)`` keeping only characters a char tokenizer knows."""
    stoi = getattr(tokenizer, "stoi", None)
    if stoi is not None:
        text = "".join(ch for ch in text if ch in stoi)
    return [int(t) for t in tokenizer.encode(text)] if text else []
