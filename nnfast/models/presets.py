"""Named presets of the decoder families: the config fields each sets (the rest are the
family's defaults, and derived fields are derived again after any override).

GPT-2 shapes are the published ones (Radford et al. 2019; the Hugging Face checkpoints);
Llama 2 shapes are Meta's (Touvron et al. 2023). ``llama2-124m`` is Llama's architecture at
GPT-2 124M's size and GPT-2's BPE vocabulary, for side-by-side training on one tokenizer: its
untied head brings it to 162M parameters, but its matmul parameters (what sets the FLOPs per
token) are 123.6M against GPT-2 124M's 123.7M.
"""

from __future__ import annotations

from typing import Any

# Family defaults: what makes GPT-2 GPT-2 and Llama Llama.
GPT2: dict[str, Any] = dict(
    vocab_size=50257, block_size=1024, norm="layernorm", mlp="gelu", pos="learned",
    bias=True, tie_embeddings=True, norm_eps=1e-5,
)
LLAMA2: dict[str, Any] = dict(
    vocab_size=32000, block_size=4096, norm="rmsnorm", mlp="swiglu", pos="rope",
    bias=False, tie_embeddings=False, dropout=0.0, norm_eps=1e-5, multiple_of=256,
)

GPT2_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": {**GPT2, "n_layer": 12, "n_head": 12, "n_embd": 768},
    "gpt2-350m": {**GPT2, "n_layer": 24, "n_head": 16, "n_embd": 1024},
    "gpt2-774m": {**GPT2, "n_layer": 36, "n_head": 20, "n_embd": 1280},
    "gpt2-1.5b": {**GPT2, "n_layer": 48, "n_head": 25, "n_embd": 1600},
    # nanoGPT's shakespeare_char; the vocabulary comes from the character tokenizer.
    "shakespeare-char": {**GPT2, "n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256,
                         "dropout": 0.2, "vocab_size": 65},
    "debug": {**GPT2, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
              "vocab_size": 97},
}

LLAMA2_PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": {**LLAMA2, "n_layer": 32, "n_head": 32, "n_embd": 4096},  # hidden 11008
    "llama2-13b": {**LLAMA2, "n_layer": 40, "n_head": 40, "n_embd": 5120},  # hidden 13824
    "llama2-124m": {**LLAMA2, "n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257,
                    "block_size": 1024},  # hidden 2048
    # Two query heads per key/value head, so GQA runs in the tests.
    "debug": {**LLAMA2, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32,
              "block_size": 32, "vocab_size": 97, "multiple_of": 16},
}
