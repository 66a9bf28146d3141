"""The token-merging transformer (``conv-transformer``): an Hourglass-style decoder
(Nawrot et al. 2021, "Hierarchical Transformers Are More Efficient Language Models").

Levels ``0 .. L-1`` of growing width (``widths``, e.g. 48 -> 144 -> 496). Level ``l`` runs
``depths[l]`` decoder ``Block``s on its sequence, merges every ``merge[l]`` tokens into one
token of the next level's width (a causal ``nnfast.TokenMerge``), recurses, expands the
result back (``nnfast.TokenExpand``), adds it to its own stream (the skip connection from the
same resolution) and runs ``depths[l]`` more blocks. The innermost level only runs its
``depths[-1]`` blocks. Level 0 ends in the final norm and the head, so there is one
prediction per input token::

    tokens (T, 48) -> 1 block -> merge 2 -> (T/2, 144) -> 2 blocks -> merge 2 -> (T/4, 496)
      -> 3 blocks -> expand -> + skip -> 2 blocks -> expand -> + skip -> 1 block -> head

Attention at level ``l`` runs on ``T / prod(merge[:l])`` tokens, so the wide inner layers
cost a fraction of a full-resolution layer and the context can be several times longer.

Causality. The merge shifts its input right by ``k - 1`` first (zeros in front), so merged
token ``j`` covers input tokens ``j*k - k + 1 .. j*k``; the expansion gives output ``t`` the
merged token ``t // k``. Causal attention at the merged level lets merged ``j`` see merged
``<= j``, i.e. inputs ``<= j*k``, so output ``t`` sees inputs ``<= (t // k) * k <= t``: the
logits at ``t`` (which predict token ``t + 1``) never see a later token. Without the shift
merged ``j`` would hold tokens up to ``j*k + k - 1`` and output ``t = j*k`` would see
``k - 1`` future tokens (tests/models/test_conv_transformer.py checks both). The argument
nests: level ``l + 1``'s tokens are a causal sequence for level ``l``.

The blocks are the decoder's own (``nnfast.models.decoder.Block``, one ``DecoderConfig`` per
level); positions come from a learned table at full resolution, added to the embeddings.

Train on Tiny Shakespeare::

    python -m nnfast train --model conv-transformer --preset shakespeare-char \
        --data shakespeare --max-steps 2000 --out runs/conv-transformer
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import nnfast
from nnfast.models.decoder import Block, Decoder, DecoderConfig, generate_uncached, make_norm
from nnfast.models.flops import MFUMixin
from nnfast.models.head import lm_output


def _ints(name: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be positive integers, got {text!r}")
    return values


@dataclass
class ConvTransformerConfig:
    vocab_size: int = 65  # tokens in the vocabulary (the trainer sets the tokenizer's)
    block_size: int = 256  # longest sequence (full resolution): rows of the position table
    # Lists are comma-separated strings so that the command line can override them.
    widths: str = "48,144,496"  # model width of each level, outermost first
    depths: str = "1,2,3"  # blocks before (and again after) each merge; the last: inner blocks
    merge: str = "2,2"  # tokens merged into one between level l and l+1 (len(widths) - 1)
    head_dim: int = 16  # attention head width; every level has width // head_dim heads
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    mlp: str = "gelu"  # "gelu" (4x hidden) or "swiglu"
    bias: bool = True  # biases in the Linear layers, norms, merges and expansions
    tie_embeddings: bool = True  # the head's weight IS the (narrow) token embedding's
    dropout: float = 0.0  # embedding, attention and residual dropout
    init_std: float = 0.02  # normal init; residual projections and expansions / sqrt(2 L)
    fused_loss: bool = True  # loss by nnfast's chunked linear+CE; False: logits + F.cross_entropy

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        widths, depths = _ints("widths", self.widths), _ints("depths", self.depths)
        merge = _ints("merge", self.merge) if len(widths) > 1 else ()
        if len(depths) != len(widths) or len(merge) != len(widths) - 1:
            raise ValueError(
                f"widths ({self.widths!r}) needs as many depths ({self.depths!r}) and one "
                f"merge factor fewer ({self.merge!r})"
            )
        for w in widths:
            if w % self.head_dim:
                raise ValueError(f"every width must be a multiple of head_dim "
                                 f"({self.head_dim}), got {w}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        # Validated again by each level's DecoderConfig; checked here for a clear message.
        if self.norm not in ("layernorm", "rmsnorm") or self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"norm/mlp must be layernorm|rmsnorm / gelu|swiglu, "
                             f"got {self.norm!r}/{self.mlp!r}")

    @property
    def level_widths(self) -> tuple[int, ...]:
        return _ints("widths", self.widths)

    @property
    def level_depths(self) -> tuple[int, ...]:
        return _ints("depths", self.depths)

    @property
    def merge_factors(self) -> tuple[int, ...]:
        return _ints("merge", self.merge) if len(self.level_widths) > 1 else ()

    @property
    def n_layer(self) -> int:
        """Blocks in all: 2 * depth at every level but the innermost."""
        d = self.level_depths
        return 2 * sum(d[:-1]) + d[-1]

    def level_lengths(self, T: int) -> list[int]:
        """Sequence length at each level for ``T`` input tokens (ceil at each merge)."""
        out = [T]
        for k in self.merge_factors:
            out.append(-(-out[-1] // k))
        return out

    def level_config(self, level: int) -> DecoderConfig:
        """The ``DecoderConfig`` of ``level``'s blocks (its width, heads, sequence length)."""
        w = self.level_widths[level]
        return DecoderConfig(
            vocab_size=self.vocab_size, block_size=self.level_lengths(self.block_size)[level],
            n_layer=self.n_layer, n_head=w // self.head_dim, n_embd=w, norm=self.norm,
            mlp=self.mlp, pos="learned", bias=self.bias, dropout=self.dropout,
            init_std=self.init_std,
        )


CONV_TRANSFORMER_PRESETS: dict[str, dict] = {
    # About GPT-2's shakespeare-char size (10.7M): 48 -> 144 -> 496, T -> T/2 -> T/4.
    "shakespeare-char": {"vocab_size": 65, "block_size": 256, "widths": "48,144,496",
                         "depths": "1,2,3", "merge": "2,2", "dropout": 0.2},
    "debug": {"vocab_size": 97, "block_size": 32, "widths": "16,32,64", "depths": "1,1,1",
              "merge": "2,2"},
}


class ConvTransformer(MFUMixin, nn.Module):
    """``forward(idx, targets=None) -> (logits, loss)`` with the decoders' contract."""

    _check_idx = Decoder._check_idx  # the decoders' id/shape checks (uses only .config)

    def __init__(self, config: ConvTransformerConfig) -> None:
        super().__init__()
        self.config = c = config
        widths, depths, merge = c.level_widths, c.level_depths, c.merge_factors
        self.n_levels = len(widths)
        self.wte = nn.Embedding(c.vocab_size, widths[0])
        self.wpe = nn.Embedding(c.block_size, widths[0])
        self.drop = nn.Dropout(c.dropout)
        level_cfgs = [c.level_config(i) for i in range(self.n_levels)]
        self.pre = nn.ModuleList(
            nn.ModuleList(Block(level_cfgs[i]) for _ in range(depths[i]))
            for i in range(self.n_levels)
        )
        self.post = nn.ModuleList(
            nn.ModuleList(Block(level_cfgs[i]) for _ in range(depths[i]))
            for i in range(self.n_levels - 1)
        )
        self.merges = nn.ModuleList(
            nnfast.TokenMerge(widths[i], widths[i + 1], merge[i], bias=c.bias, causal=True)
            for i in range(self.n_levels - 1)
        )
        self.expands = nn.ModuleList(
            nnfast.TokenExpand(widths[i + 1], widths[i], merge[i], bias=c.bias)
            for i in range(self.n_levels - 1)
        )
        self.norm_f = make_norm(level_cfgs[0])
        self.lm_head = nn.Linear(widths[0], c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's init (see ``Decoder.reset_parameters``). The merges get N(0, std) too; the
        expansions write into a level's residual stream, so they are scaled like the
        residual projections: their output starts small next to the skip, instead of
        Conv's uniform init swamping the embeddings."""
        std = self.config.init_std
        res_std = std / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, (nnfast.TokenMerge, nnfast.TokenExpand)):
                merge = isinstance(module, nnfast.TokenMerge)
                nn.init.normal_(module.weight, std=std if merge else res_std)
            if isinstance(module, (nn.Linear, nnfast.TokenMerge, nnfast.TokenExpand)):
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nnfast.LayerNorm, nnfast.RMSNorm)):
                module.reset_parameters()
        for block in self.blocks():
            for lin in (block.attn.proj, getattr(block.mlp, "proj", None),
                        getattr(block.mlp, "down", None)):
                if lin is not None:
                    nn.init.normal_(lin.weight, std=res_std)

    def blocks(self) -> list[Block]:
        return [b for stack in (*self.pre, *self.post) for b in stack]

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _run(stack: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """The decoder's fused-residual block loop over ``stack``; returns the stream."""
        if len(stack) == 0:
            return x
        h, residual = x, None
        for block in stack:
            h, residual = block(h, residual)
        return residual + h.to(residual.dtype)

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """Level ``level``'s stream (B, T_l, w_l) -> (B, T_l, w_l)."""
        x = self._run(self.pre[level], x)
        if level == self.n_levels - 1:
            return x
        T = x.shape[1]
        z = self.merges[level](x)  # (B, ceil(T / k), w_{l+1}), causal shift inside
        z = self._level(level + 1, z)
        x = x + self.expands[level](z, length=T).to(x.dtype)  # skip from the same resolution
        return self._run(self.post[level], x)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (B, T, widths[0])."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, w0)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))  # the stream in autocast's dtype
        return self.norm_f(self._level(0, self.drop(x)))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        last_only: bool = False,
        ignore_index: int = -100,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """As ``Decoder.forward``: ``(logits, None)`` without targets (B, T, V), or (B, 1, V)
        with ``last_only``; with targets ``(None, loss)``, or ``(logits, loss)`` with
        ``return_logits=True`` or ``fused_loss=False``."""
        self._check_idx(idx, targets)
        h = self.hidden_states(idx)  # (B, T, w0)
        if targets is None and last_only:
            h = h[:, -1:]
        return lm_output(h, self.lm_head.weight, targets, return_logits=return_logits,
                         fused=self.config.fused_loss, ignore_index=ignore_index)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens (see ``Decoder.generate``). No KV cache:
        every token recomputes the last ``block_size`` tokens (a merged token changes while
        its window fills, so a cache would need per-level bookkeeping); ``use_cache`` is
        accepted for the decoders' signature and ignored."""
        return generate_uncached(self, idx, max_new_tokens, self.config.block_size, temperature,
                                 top_k, top_p, generator)

    # ------------------------------------------------------------------ accounting
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, the tied head counted once; ``exclude_embeddings`` drops the position
        table and an untied token table (lookups, no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per input token: 6 per matmul parameter use plus attention's
        ``12 * layers * width * T_l`` per token of each level (as ``Decoder``). A level-l
        token stands for ``r_l = prod(merge[:l])`` input tokens, so its matmuls (and the
        merge/expansion into it) count ``1 / r_l`` per input token."""
        c = self.config
        T = seq_len or c.block_size
        flops, r = 6.0 * c.vocab_size * c.level_widths[0], 1  # the head
        for level in range(self.n_levels):
            stacks = [self.pre[level]] + ([self.post[level]] if level < len(self.post) else [])
            n = sum(p.numel() for s in stacks for p in s.parameters())
            layers = sum(len(s) for s in stacks)
            flops += (6 * n + 12 * layers * c.level_widths[level] * (T / r)) / r
            if level < len(self.merges):
                r *= c.merge_factors[level]
                mixed = self.merges[level].weight.numel() + self.expands[level].weight.numel()
                flops += 6 * mixed / r
        return flops

