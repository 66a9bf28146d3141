"""GPT-2 weights from a local Hugging Face checkpoint (``model.safetensors``).

Hugging Face's GPT-2 stores its projections as ``Conv1D`` modules, whose weight is
``(in, out)``: the transpose of ``nn.Linear``'s ``(out, in)``. Its ``c_attn`` is already one
fused q|k|v projection with q, k and v in that order and heads contiguous inside each,
which is the layout of nnfast's ``SelfAttention.qkv``, so it maps over without shuffling.
Keys appear with or without the ``transformer.`` prefix (both are published); the causal
mask buffers (``attn.bias``, ``attn.masked_bias``) and the tied ``lm_head.weight`` are
skipped.
"""

from __future__ import annotations

import json
import os
import re

import torch

from nnfast.models.decoder import Decoder
from nnfast.models.registry import create

# HF name (after the "transformer." prefix) -> ours; "{i}" is the layer.
_KEYS = {
    "wte.weight": "wte.weight",
    "wpe.weight": "wpe.weight",
    "ln_f.weight": "norm_f.weight",
    "ln_f.bias": "norm_f.bias",
    "h.{i}.ln_1.weight": "blocks.{i}.norm1.weight",
    "h.{i}.ln_1.bias": "blocks.{i}.norm1.bias",
    "h.{i}.attn.c_attn.weight": "blocks.{i}.attn.qkv.weight",
    "h.{i}.attn.c_attn.bias": "blocks.{i}.attn.qkv.bias",
    "h.{i}.attn.c_proj.weight": "blocks.{i}.attn.proj.weight",
    "h.{i}.attn.c_proj.bias": "blocks.{i}.attn.proj.bias",
    "h.{i}.ln_2.weight": "blocks.{i}.norm2.weight",
    "h.{i}.ln_2.bias": "blocks.{i}.norm2.bias",
    "h.{i}.mlp.c_fc.weight": "blocks.{i}.mlp.fc.weight",
    "h.{i}.mlp.c_fc.bias": "blocks.{i}.mlp.fc.bias",
    "h.{i}.mlp.c_proj.weight": "blocks.{i}.mlp.proj.weight",
    "h.{i}.mlp.c_proj.bias": "blocks.{i}.mlp.proj.bias",
}
_CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # stored (in, out): transpose
_SKIP = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|^lm_head\.weight$")
_LAYER = re.compile(r"^h\.(\d+)\.(.*)$")
# Published GPT-2 widths -> heads, for checkpoints that come without a config.json.
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}


def _safetensors_load(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # optional dependency
        raise ImportError(
            "loading Hugging Face checkpoints needs the safetensors package "
            "(pip install safetensors)"
        ) from e
    return load_file(path)


def convert_gpt2_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensors -> nnfast ``Decoder`` state-dict entries."""
    out = {}
    for key, tensor in hf.items():
        name = key.removeprefix("transformer.")
        if _SKIP.search(name):
            continue
        m = _LAYER.match(name)
        pattern = f"h.{{i}}.{m.group(2)}" if m else name
        if pattern not in _KEYS:
            raise ValueError(f"unexpected key {key!r} in the GPT-2 checkpoint")
        ours = _KEYS[pattern].format(i=m.group(1) if m else "")
        out[ours] = tensor.t().contiguous() if name.endswith(_CONV1D) else tensor
    return out


def _infer_shape(hf: dict[str, torch.Tensor], config_json: dict) -> dict:
    """Config fields from config.json when present, else from the tensor shapes."""
    strip = {k.removeprefix("transformer."): v for k, v in hf.items()}
    if "wte.weight" not in strip or "wpe.weight" not in strip:
        raise ValueError("not a GPT-2 checkpoint: wte.weight / wpe.weight are missing")
    vocab, width = strip["wte.weight"].shape
    layers = 1 + max((int(m.group(1)) for k in strip if (m := _LAYER.match(k))), default=-1)
    heads = config_json.get("n_head", _HEADS_BY_WIDTH.get(width))
    if heads is None:
        raise ValueError(f"cannot tell the number of heads of width {width}: add a config.json")
    return {
        "vocab_size": int(vocab), "n_embd": int(width), "n_layer": layers,
        "block_size": int(strip["wpe.weight"].shape[0]), "n_head": int(heads),
        "norm_eps": float(config_json.get("layer_norm_epsilon", 1e-5)),
    }


def load_gpt2_hf(path: str | os.PathLike, preset: str = "gpt2-124m", **overrides) -> Decoder:
    """A ``gpt2`` model holding the weights of a local Hugging Face GPT-2 checkpoint:
    ``path`` is ``model.safetensors`` or a folder with it (and optionally ``config.json``).
    The shape comes from the checkpoint; ``preset`` gives everything else (dropout, ...),
    and ``overrides`` any config field."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no safetensors checkpoint at {file}")
    config_json = {}
    if os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config_json = json.load(f)
    act = config_json.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {act!r}: nnfast's GPT-2 uses the tanh GELU")
    hf = _safetensors_load(file)
    model = create("gpt2", preset, **{**_infer_shape(hf, config_json), **overrides})
    state = convert_gpt2_state_dict(hf)
    # The head is tied to wte, so the state dict names it twice; strict loading would
    # ask for lm_head.weight, which is wte.weight.
    state["lm_head.weight"] = state["wte.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}"
        )
    return model
