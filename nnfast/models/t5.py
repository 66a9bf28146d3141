"""T5 (Raffel et al. 2020), the v1.1 recipe, on the shared encoder-decoder: pre-RMSNorm
without bias or mean subtraction, no biases anywhere, bucketed relative position bias learned
once per stack and shared by its layers (an additive float mask whose gradient the attention
kernel returns), softmax scale 1.0, gated-GELU MLP, untied output head; span corruption.

Special tokens above the tokenizer's vocabulary: ``[PAD]`` (also the decoder's start token, as
in T5), ``[EOS]``, then ``n_sentinels`` sentinels.

Presets ``t5-small`` / ``t5-base`` use the original T5's shapes (d=512, 8 heads, 6+6 layers,
MLP 2048 / d=768, 12 heads, 12+12, 3072) with the v1.1 recipe. v1.1's own small (6 heads of 64
in a 512-wide model, ~77M) needs an attention inner width != d_model, which nnfast's attention
modules do not have. The parameter counting is checked against the published original T5:
``mlp="relu", tie_embeddings=True`` and 32128 embedding rows give t5-small's 60,506,624 and
t5-base's 222,903,552 exactly (the tests do this on the meta device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import nnfast
from nnfast.models import objectives
from nnfast.models.bert import encode_known
from nnfast.models.encoder import EncDecConfig, EncoderDecoder, token_accuracy


@dataclass
class T5Config(EncDecConfig):
    n_sentinels: int = 100
    noise_density: float = 0.15
    mean_span: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sentinels < 1:
            raise ValueError(f"n_sentinels must be >= 1, got {self.n_sentinels}")
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_span < 1.0:
            raise ValueError(f"mean_span must be >= 1, got {self.mean_span}")

    @property
    def n_special(self) -> int:
        return 2 + self.n_sentinels


T5: dict[str, Any] = dict(
    vocab_size=32026, norm="rmsnorm", norm_eps=1e-6, prenorm=True, mlp="gated-gelu",
    pos="relative", bias=False, attn_scale=1.0, tie_embeddings=False, scale_embeddings=False,
    dropout=0.0, init_std=0.05, block_size=512,
)
T5_PRESETS: dict[str, dict[str, Any]] = {
    "t5-small": {**T5, "n_layer": 6, "n_head": 8, "n_embd": 512, "hidden_dim": 2048},
    "t5-base": {**T5, "n_layer": 12, "n_head": 12, "n_embd": 768, "hidden_dim": 3072},
    "debug": {**T5, "n_layer": 2, "n_head": 2, "n_embd": 32, "hidden_dim": 48,
              "block_size": 64, "vocab_size": 97, "n_sentinels": 16, "rel_buckets": 8,
              "rel_max_distance": 20},
}


class T5(EncoderDecoder):
    demo_title = "span-corruption demo (greedy fill of the masked spans)"  # demo()'s label

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        self.eos_id = config.vocab_size + 1
        self.register_buffer(
            "sentinel_ids", torch.arange(config.n_sentinels) + config.vocab_size + 2,
            persistent=False,
        )
        self._t5_init()

    @torch.no_grad()
    def _t5_init(self) -> None:
        """Mesh-TensorFlow's T5 init: with softmax scale 1.0 the query's std carries the
        1/sqrt(d_kv), so q ~ N(0, 1/(d * d_kv)), k, v ~ N(0, 1/d), outputs ~ N(0, 1/fan_in);
        embeddings N(0, 1). Keeps the attention logits O(1) at init."""
        c = self.config
        d, dk = c.n_embd, c.head_dim
        nn_init = torch.nn.init.normal_
        nn_init(self.wte.weight, std=1.0)
        if not c.tie_embeddings:
            nn_init(self.lm_head.weight, std=d ** -0.5)
        for module in self.modules():
            if isinstance(module, nnfast.SelfAttention):
                nn_init(module.qkv.weight, std=d ** -0.5)
                nn_init(module.qkv.weight[:d], std=(d * dk) ** -0.5)
                nn_init(module.proj.weight, std=d ** -0.5)
            elif isinstance(module, nnfast.CrossAttention):
                nn_init(module.q.weight, std=(d * dk) ** -0.5)
                nn_init(module.kv.weight, std=d ** -0.5)
                nn_init(module.proj.weight, std=d ** -0.5)
            elif isinstance(module, nnfast.GatedMLP):
                nn_init(module.gate_up.weight, std=d ** -0.5)
                nn_init(module.down.weight, std=c.hidden_dim ** -0.5)

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
        """Raw windows -> span-corrupted ``src``; ``tgt_in`` = [PAD] + targets shifted right.
        The window is shortened until the input (with sentinels and EOS) fits block_size."""
        c = self.config
        L = min(x.shape[1], c.block_size)
        while L > 2:
            n_noise, n_spans = objectives.span_shape(L, c.noise_density, c.mean_span)
            if L - n_noise + n_spans + 1 <= c.block_size and n_noise + n_spans + 1 <= c.block_size:
                break
            L -= 1
        src, targets = objectives.span_corrupt(x[:, :L].long(), self.sentinel_ids, self.eos_id,
                                               c.noise_density, c.mean_span)
        pad = torch.full_like(targets[:, :1], self.pad_id)
        return {"src": src, "tgt_in": torch.cat((pad, targets[:, :-1]), 1), "targets": targets}

    @torch.no_grad()
    def metrics(self, src, tgt_in, targets, src_mask=None) -> dict[str, float]:
        """``span_acc``: teacher-forced argmax accuracy on the target tokens."""
        logits = self(src, tgt_in, None, src_mask)[0]
        return {"span_acc": token_accuracy(logits, targets)}

    @torch.no_grad()
    def demo(self, tokenizer) -> str:
        """Span-corrupt a fixed sentence and show the spans the model fills in (greedy)."""
        text = "First Citizen: Before we proceed any further, hear me speak."
        ids = encode_known(tokenizer, text)[: self.config.block_size // 2]
        if len(ids) < 4:
            return "(demo: the tokenizer cannot encode the demo sentence)"
        dev = self.wte.weight.device
        gen = torch.Generator(device=dev).manual_seed(0)
        row = torch.tensor([ids], device=dev)
        c = self.config
        src, targets = objectives.span_corrupt(row, self.sentinel_ids, self.eos_id,
                                               c.noise_density, c.mean_span, generator=gen)
        out = self.generate(src, targets.shape[1] + 4, self.pad_id, self.eos_id)[0, 1:]

        def show(t: list[int]) -> str:
            s = set(self.sentinel_ids.tolist())
            parts = [f"<{t_ - c.vocab_size - 2}>" if t_ in s else tokenizer.decode([t_])
                     for t_ in t if t_ < c.vocab_size or t_ in s]
            return "".join(parts)

        return (f"input:  {show(src[0].tolist())}\ntarget: {show(targets[0].tolist())}\n"
                f"model:  {show(out.tolist())}")
