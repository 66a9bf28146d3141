"""The progressively grown GPT (``progressive-gpt``): a GPT-2 decoder that starts shallow
(``n_layer`` blocks, e.g. 3) and doubles its depth at scheduled steps (3 -> 6 -> 12).

Growth. At each step of ``grow_at`` every block ``i`` gets a copy inserted right after it.
The copy SHARES the base weights of block ``i`` (the very same ``Parameter`` objects: its
Linear layers and norms), so growth adds no base parameters; what makes the copies differ
is a LoRA adapter (Hu et al. 2021) on every Linear of attention and MLP, one per block:
``y = x W^T + b + (alpha / r) (x A^T) B^T`` with ``A (r, in)`` random and ``B (out, r)``
zero. The first growth also gives the original blocks their adapters.

The function does not change at growth: an adapter with ``B = 0`` adds nothing, and a new
copy's two residual branches (attention, MLP) are scaled by a learned scalar gate that
starts at 0 (ReZero, Bachlechner et al. 2020), so the copy is the identity until training
moves its gate (duplicating a block ``f`` without the gate would turn ``f(x)`` into
``f(f(x))``). A copy's gate gets a gradient at once; its ``B`` does once the gate is
nonzero, then its ``A``. A copy of a copy starts from the shared base weights with fresh
adapters (the gate hides the difference from its parent's adapted weights).

Training after the first growth: adapters, gates, embeddings, the final norm and the head
train at the full learning rate; the shared base blocks at ``base_lr_scale`` times it (0:
frozen, ``requires_grad`` off, no weight gradients computed). ``optim_groups`` builds the
parameter groups.

Trainer API::

    model.maybe_grow(step)   # steps done so far; True when it just grew -> rebuild optimizer
    model.optim_groups(weight_decay, lr=lr)  # AdamW groups; lr scales the base groups

The stage is a buffer (``growth_stage``) in the state dict, and a load pre-hook grows a
fresh model to the checkpoint's stage before the weights are copied, so a checkpoint saved
after a growth step loads into ``create("progressive-gpt", ...)`` as it is. Shared weights
appear under every block's key in the state dict (same values; ``torch.save`` stores the
storage once).

Train on Tiny Shakespeare (3 -> 6 -> 12 layers)::

    python -m nnfast train --model progressive-gpt --preset shakespeare-char \
        --data shakespeare --max-steps 3000 --out runs/progressive-gpt
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

import nnfast
from nnfast.models.decoder import Decoder, DecoderConfig
from nnfast.models.presets import GPT2_PRESETS


def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"grow_at must be comma-separated step numbers, got {text!r}") from None
    if any(s < 0 for s in steps) or list(steps) != sorted(set(steps)):
        raise ValueError(f"grow_at must be increasing non-negative steps, got {text!r}")
    return steps


@dataclass
class ProgressiveConfig(DecoderConfig):
    # n_layer (inherited) is the depth at the start; it doubles at every grow_at step.
    grow_at: str = "1000,2000"  # steps at which every block is duplicated, comma-separated
    lora_rank: int = 8  # rank r of each block's adapters
    lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank
    base_lr_scale: float = 0.1  # LR of the shared base blocks after growth / lr (0: frozen)

    def __post_init__(self) -> None:
        if isinstance(self.grow_at, (tuple, list)):  # grow_at=(1000, 2000) from Python
            self.grow_at = ",".join(str(int(s)) for s in self.grow_at)
        super().__post_init__()
        _steps(self.grow_at)
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be positive, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if self.base_lr_scale < 0:
            raise ValueError(f"base_lr_scale must be >= 0, got {self.base_lr_scale}")

    @property
    def grow_steps(self) -> tuple[int, ...]:
        return _steps(self.grow_at)


PROGRESSIVE_PRESETS: dict[str, dict] = {
    # nanoGPT's shakespeare_char at the end (12 layers of 384), 3 layers at the start.
    "shakespeare-char": {**GPT2_PRESETS["shakespeare-char"], "n_layer": 3,
                         "grow_at": "1000,2000"},
    "debug": {**GPT2_PRESETS["debug"], "n_layer": 2, "grow_at": "2,4", "lora_rank": 4},
}


class LoRALinear(nn.Module):
    """A (possibly shared) ``nn.Linear`` plus this block's own low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **kw))
        self.reset_adapter()

    def reset_adapter(self) -> None:
        # PEFT's init: A like a Linear (U(+-1/sqrt(in))), B zero, so the update starts at 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)  # (..., out)
        return self.base(x) + update * self.scaling


class Gated(nn.Module):
    """``gate * inner(...)``: a copy's residual branch, the identity while the gate is 0."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        w = next(inner.parameters())
        self.gate = nn.Parameter(torch.zeros((), device=w.device, dtype=w.dtype))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.inner(*args, **kwargs)
        return out * self.gate.to(out.dtype)


def _adapter_param(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("lora_A", "lora_B", "gate")


class ProgressiveGPT(Decoder):
    """``Decoder`` whose depth doubles at ``config.grow_at``; see the module docstring."""

    def __init__(self, config: ProgressiveConfig) -> None:
        super().__init__(config)
        self.register_buffer("growth_stage", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_pre_hook(_grow_before_load)

    @property
    def stage(self) -> int:
        """Growths done so far: ``len(self.blocks) == n_layer * 2**stage``."""
        return int(self.growth_stage)

    # ------------------------------------------------------------------ growth
    def _wrap(self, block: nn.Module) -> None:
        """Give every Linear of ``block``'s attention and MLP a fresh adapter (in place)."""
        c = self.config
        for part in (block.attn, block.mlp):
            part = part.inner if isinstance(part, Gated) else part
            for name, child in list(part.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(part, name, LoRALinear(child, c.lora_rank, c.lora_alpha))
                elif isinstance(child, LoRALinear):
                    child.reset_adapter()

    def _copy(self, block: nn.Module) -> nn.Module:
        """A block sharing ``block``'s base parameters and buffers, with fresh adapters and
        zero gates."""
        # deepcopy's memo maps each base tensor to itself: the copy holds the same objects.
        shared = {id(p): p for n, p in block.named_parameters() if not _adapter_param(n)}
        shared.update({id(b): b for b in block.buffers()})
        new = copy.deepcopy(block, shared)
        self._wrap(new)
        for name in ("attn", "mlp"):
            part = getattr(new, name)
            if not isinstance(part, Gated):
                setattr(new, name, Gated(part))
            getattr(new, name).gate.data.zero_()
        return new

    def base_parameters(self) -> list[nn.Parameter]:
        """The shared base weights of the blocks (each once); empty before the first growth
        (then everything is an ordinary parameter)."""
        if self.stage == 0:
            return []
        seen, out = set(), []
        for block in self.blocks:
            for n, p in block.named_parameters():
                if not _adapter_param(n) and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    @torch.no_grad()
    def grow(self) -> None:
        """One growth: every block followed by a copy (``n -> 2n`` blocks)."""
        if self.stage == 0:
            for block in self.blocks:
                self._wrap(block)
        grown = []
        for block in self.blocks:
            grown += [block, self._copy(block)]
        self.blocks = nn.ModuleList(grown)
        self.growth_stage += 1
        if self.config.base_lr_scale == 0:
            for p in self.base_parameters():
                p.requires_grad_(False)

    def grow_to(self, stage: int) -> bool:
        """Grow until ``self.stage == stage``; True when it grew. Never shrinks."""
        if stage < self.stage:
            raise ValueError(f"cannot shrink from stage {self.stage} to {stage}")
        grew = stage > self.stage
        while self.stage < stage:
            self.grow()
        return grew

    def maybe_grow(self, step: int) -> bool:
        """The trainer's hook, called with the optimizer steps done so far before each step:
        grows to the stage ``step`` has reached (``grow_at`` entries ``<= step``). True when
        the model just grew: the optimizer must be rebuilt over the new parameters."""
        return self.grow_to(sum(step >= s for s in self.config.grow_steps))

    def optim_groups(self, weight_decay: float, lr: float | None = None) -> list[dict]:
        """AdamW parameter groups: decay on matrices only; after growth the shared base in
        groups of its own with ``lr = lr * base_lr_scale`` (and ``"lr_scale"``); frozen base
        (scale 0) left out. Without ``lr`` the base groups carry only ``"lr_scale"`` and the
        optimizer's default lr applies unless the caller honors it (a warning says so)."""
        scale = self.config.base_lr_scale
        base = {id(p) for p in self.base_parameters()}
        params = [p for p in self.parameters() if p.requires_grad]
        rest = [p for p in params if id(p) not in base]
        groups = [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ]
        if base and scale > 0:
            shared = [p for p in params if id(p) in base]
            extra = {"lr_scale": scale}
            if lr is not None:
                extra["lr"] = lr * scale
            elif scale != 1:
                warnings.warn("optim_groups: pass lr= so the shared base trains at "
                              f"base_lr_scale ({scale}) times it", stacklevel=2)
            groups += [
                {"params": [p for p in shared if p.dim() >= 2], "weight_decay": weight_decay,
                 **extra},
                {"params": [p for p in shared if p.dim() < 2], "weight_decay": 0.0, **extra},
            ]
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ decoder overrides
    def make_caches(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
        """One KV cache per current block (the depth changes with growth)."""
        c, w = self.config, self.wte.weight
        if dtype is None:
            on = torch.is_autocast_enabled(w.device.type)
            dtype = torch.get_autocast_dtype(w.device.type) if on else w.dtype
        return [
            nnfast.KVCache(batch_size, max_len, c.n_kv_head, c.head_dim, dtype, w.device)
            for _ in self.blocks
        ]

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """As ``Decoder``'s, with a shared weight counted once per block that uses it (each
        use is a matmul) and attention over the current depth. A frozen base still counts
        its weight-gradient FLOPs (MFUs stay comparable across stages)."""
        c = self.config
        T = seq_len or c.block_size
        unique_blocks = {id(p): p.numel() for b in self.blocks for p in b.parameters()}
        per_use = sum(p.numel() for b in self.blocks for p in b.parameters())
        matmul = self.num_params(exclude_embeddings=True) - sum(unique_blocks.values()) + per_use
        return 6 * matmul + 12 * len(self.blocks) * c.n_head * c.head_dim * T


def _grow_before_load(module: ProgressiveGPT, state_dict, prefix, *args) -> None:
    """Load pre-hook: grow to the checkpoint's stage so its keys and shapes exist."""
    stage = state_dict.get(prefix + "growth_stage")
    if stage is not None:
        module.grow_to(int(stage))
