"""The original Transformer (Vaswani et al. 2017) on the shared encoder-decoder: sinusoidal
positions, embeddings scaled by sqrt(d), post-LayerNorm, ReLU MLP, one embedding shared by
encoder, decoder and output head, label smoothing 0.1.

It trains on a generated transduction task (``task``: reverse or sort a random string of the
first ``n_symbols`` token ids, lengths ``min_len..max_len``), so it needs no download; the
trainer's text windows are ignored. Special tokens ``[PAD] [BOS] [EOS]`` sit above the
tokenizer's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nnfast.models import objectives
from nnfast.models.encoder import EncDecConfig, EncoderDecoder


@dataclass
class TransformerConfig(EncDecConfig):
    task: str = "reverse"  # "reverse" or "sort"
    n_symbols: int = 10  # the task's alphabet: token ids 0 .. n_symbols - 1
    min_len: int = 3
    max_len: int = 16  # longest task string; needs max_len + 1 <= block_size

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in ("reverse", "sort"):
            raise ValueError(f"task must be 'reverse' or 'sort', got {self.task!r}")
        if not 1 <= self.n_symbols <= self.vocab_size:
            raise ValueError(f"n_symbols must be in [1, vocab_size], got {self.n_symbols}")
        if not 1 <= self.min_len <= self.max_len or self.max_len + 1 > self.block_size:
            raise ValueError(f"need 1 <= min_len <= max_len < block_size, got {self.min_len}, "
                             f"{self.max_len}, {self.block_size}")

    n_special = 3  # PAD, BOS, EOS


VASWANI: dict[str, Any] = dict(
    norm="layernorm", norm_eps=1e-6, prenorm=False, mlp="relu", pos="sinusoidal", bias=True,
    tie_embeddings=True, scale_embeddings=True, label_smoothing=0.1, attn_scale=None,
)
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # Transformer-base: 6+6 layers, d=512, 8 heads, FFN 2048, dropout 0.1 (~44M without
    # the 37k-token vocabulary of the paper's WMT runs).
    "base": {**VASWANI, "n_layer": 6, "n_head": 8, "n_embd": 512, "hidden_dim": 2048,
             "dropout": 0.1, "block_size": 256},
    "small": {**VASWANI, "n_layer": 3, "n_head": 4, "n_embd": 128, "hidden_dim": 512,
              "dropout": 0.0, "block_size": 64},
    "debug": {**VASWANI, "n_layer": 2, "n_head": 2, "n_embd": 32, "hidden_dim": 64,
              "dropout": 0.0, "block_size": 32, "vocab_size": 97, "max_len": 8},
}


class Transformer(EncoderDecoder):
    demo_title = "task demo (seq2seq, greedy decoding)"  # the trainer's label for demo()

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.bos_id, self.eos_id = config.vocab_size + 1, config.vocab_size + 2
        if config.scale_embeddings:
            # fairseq's: N(0, 1/d), so the sqrt(d)-scaled embeddings are O(1) like the
            # sinusoids (with std 0.02 the positions would drown the tokens).
            torch.nn.init.normal_(self.wte.weight, std=config.n_embd ** -0.5)

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
        """Ignores the text windows ``x`` except for their batch size and device."""
        c = self.config
        return objectives.transduction_task(x.shape[0], c.n_symbols, c.min_len, c.max_len,
                                            self.pad_id, self.bos_id, self.eos_id, c.task,
                                            device=x.device)

    @torch.no_grad()
    def metrics(self, src, tgt_in, targets, src_mask=None) -> dict[str, float]:
        """``exact_match``: greedy decoding (KV cache) reproduces the whole answer and EOS;
        ``token_acc``: teacher-forced argmax accuracy."""
        out = self.generate(src, targets.shape[1], self.bos_id, self.eos_id, src_mask)[:, 1:]
        n = min(out.shape[1], targets.shape[1])
        want = targets[:, :n]
        ok = (out[:, :n] == want) | (want == -100)
        # A row decoded shorter than its answer fails: its EOS came early, so `ok` is False there.
        exact = ok.all(1) & (targets[:, n:] == -100).all(1)
        logits = self(src, tgt_in, None, src_mask)[0]
        keep = targets != -100
        acc = (logits.argmax(-1)[keep] == targets[keep]).float().mean()
        return {"exact_match": float(exact.float().mean()), "token_acc": float(acc)}

    @torch.no_grad()
    def demo(self, tokenizer) -> str:
        """A few held-out strings and the model's greedy answers."""
        c = self.config
        dev = self.wte.weight.device
        gen = torch.Generator(device=dev).manual_seed(12345)
        batch = objectives.transduction_task(4, c.n_symbols, c.min_len, c.max_len, self.pad_id,
                                             self.bos_id, self.eos_id, c.task, device=dev,
                                             generator=gen)
        out = self.generate(batch["src"], c.max_len + 1, self.bos_id, self.eos_id)[:, 1:]

        def show(t: list[int]) -> str:  # the task's symbols are ids, not the corpus's text
            return " ".join(str(i) for i in t if i < c.n_symbols)

        lines = [f"task: {c.task} strings of symbols 0..{c.n_symbols - 1}; input  ->  model"]
        for s, o in zip(batch["src"].tolist(), out.tolist()):
            lines.append(f"{show(s)}  ->  {show(o)}")
        return "\n".join(lines)
