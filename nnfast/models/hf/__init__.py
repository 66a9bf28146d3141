"""Hugging Face interop: ``from_hf`` (an HF folder -> nnfast model), ``to_hf`` (nnfast model
-> an HF folder ``transformers`` loads), ``save_model``/``load_model`` (safetensors, tied
weights once) and ``patch_hf`` (nnfast kernels inside a ``transformers`` model, in place).

Supported: GPT-2 (``GPT2LMHeadModel``/``GPT2Model``), Llama (``LlamaForCausalLM``), BERT
(``BertForMaskedLM``), T5 (``T5ForConditionalGeneration``, original and v1.1). A config field
nnfast cannot compute exactly is refused with a ValueError naming it: nothing loads and then
computes something else than ``transformers`` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from nnfast.models.hf.families import FAMILIES, Family
from nnfast.models.hf.files import (
    load_model,
    locate,
    prepare_folder,
    read_config,
    read_weights,
    save_model,
    save_state,
)
from nnfast.models.hf.mapping import to_ours, to_theirs
from nnfast.models.registry import create

__all__ = ["from_hf", "load_gpt2_hf", "load_model", "save_model", "to_hf"]


def _family(config: dict, file: Path) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{file}: model_type {model_type!r} is not supported; nnfast reads "
                         f"{sorted(FAMILIES)}")
    fam = FAMILIES[model_type]
    archs = config.get("architectures") or [fam.architecture]
    bad = [a for a in archs if a not in fam.architectures]
    if bad:
        raise ValueError(f"{file}: architecture {bad[0]!r} is not supported; nnfast reads "
                         f"{list(fam.architectures)}")
    return fam


def _with_prefix(state: dict, prefix: str) -> dict:
    """A base-model checkpoint (``GPT2Model``: ``h.0...``) named as the head model's."""
    if not prefix or any(k.startswith(prefix) for k in state):
        return state
    return {k if k.startswith("lm_head.") else prefix + k: v for k, v in state.items()}


def _checkpoint_dtype(state: dict, file: Path) -> torch.dtype:
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) > 1:
        raise ValueError(f"{file}: mixed weight dtypes {sorted(map(str, dtypes))}")
    return dtypes.pop() if dtypes else torch.float32


def _load(path, preset: str | None, dtype: torch.dtype | None, overrides: dict,
          config_defaults: dict | None = None) -> nn.Module:
    config_file, weights_file = locate(path)
    hf_config = {**(config_defaults or {}), **read_config(config_file)}
    fam = _family(hf_config, config_file)
    state = _with_prefix(read_weights(weights_file), fam.prefix)
    fields = fam.config_from_hf(hf_config, state)
    model = create(fam.name, preset, **{**fields, **overrides})
    rows, aliases = fam.entries(model.config, model)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    ours = to_ours(rows, state, expected, weights_file, aliases, fam.ignore)
    with torch.no_grad():
        for name, tensor in ours.items():
            model.get_parameter(name).copy_(tensor)
    missing = sorted(set(expected) - set(ours) - _tied_names(model))
    if missing:  # a table bug, not a user error: never return half-loaded weights
        raise RuntimeError(f"nnfast's {fam.name} mapping does not fill {missing}")
    _special_ids(model, hf_config)
    model.hf_config = hf_config  # fields nnfast does not use, written back by to_hf
    return model.to(dtype or _checkpoint_dtype(state, weights_file)).eval()


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that are a second name of a parameter listed earlier."""
    seen, tied = set(), set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied.add(name)
        seen.add(id(t))
    return tied


def _special_ids(model: nn.Module, hf_config: dict) -> None:
    """HF's padding (and T5's end) token ids instead of nnfast's appended ones: the padding
    mask nnfast derives from ``pad_id`` then matches the tokenizer's."""
    for ours, theirs in (("pad_id", "pad_token_id"), ("eos_id", "eos_token_id")):
        if hasattr(model, ours) and isinstance(hf_config.get(theirs), int):
            setattr(model, ours, hf_config[theirs])


def from_hf(path: str | os.PathLike, dtype: torch.dtype | None = None, **overrides) -> nn.Module:
    """The nnfast model of a Hugging Face folder (``config.json`` + ``model.safetensors``,
    ``pytorch_model.bin`` or a sharded ``*.index.json``) or of a weights file beside its
    config.json, in eval mode. Weights keep the checkpoint's dtype unless ``dtype`` is given;
    ``overrides`` set nnfast config fields (``dropout``, ``fused_loss``, ``block_size`` ...)."""
    return _load(path, None, dtype, overrides)


def load_gpt2_hf(path: str | os.PathLike, preset: str = "gpt2-124m", **overrides) -> nn.Module:
    """``from_hf`` for GPT-2 checkpoints, also ones whose config.json lacks fields: the
    shape then comes from the tensors (the head count from the published GPT-2 widths)."""
    config_file, weights_file = locate(path)
    config = read_config(config_file)
    state = _with_prefix(read_weights(weights_file), "transformer.")
    if "transformer.wte.weight" not in state or "transformer.wpe.weight" not in state:
        raise ValueError(f"{weights_file}: not a GPT-2 checkpoint (no wte/wpe weights)")
    vocab, width = state["transformer.wte.weight"].shape
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")}
    heads = config.get("n_head", {768: 12, 1024: 16, 1280: 20, 1600: 25}.get(width))
    if heads is None:
        raise ValueError(f"{config_file}: no n_head, and width {width} is no published GPT-2's")
    defaults = dict(model_type="gpt2", vocab_size=vocab, n_embd=width, n_layer=len(layers),
                    n_head=heads, n_positions=state["transformer.wpe.weight"].shape[0])
    return _load(path, preset, None, overrides, defaults)


def _export_family(model: nn.Module) -> Family:
    from nnfast.models import T5, Bert, Decoder

    if isinstance(model, Decoder):
        return FAMILIES["llama" if model.config.norm == "rmsnorm" else "gpt2"]
    if isinstance(model, Bert):
        return FAMILIES["bert"]
    if isinstance(model, T5):
        return FAMILIES["t5"]
    raise ValueError(f"to_hf: {type(model).__name__} has no Hugging Face equivalent; "
                     "exportable: gpt2, llama2 (Decoder), bert, t5")


def to_hf(model: nn.Module, folder: str | os.PathLike, overwrite: bool = False,
          dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` that
    ``transformers.AutoModel*.from_pretrained(folder)`` loads with no missing or unexpected
    keys and the same logits. A tied head is stored once (transformers ties it again).
    Refuses a non-empty folder unless ``overwrite``. Returns the folder."""
    fam = _export_family(model)
    config = {**getattr(model, "hf_config", {}), **fam.config_to_hf(model)}
    rows, _ = fam.entries(model.config, model)
    state = to_theirs(rows, model.state_dict())
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    weight_dtype = next(iter(state.values())).dtype
    config.update(model_type=fam.model_type, architectures=[fam.architecture],
                  dtype=str(weight_dtype).removeprefix("torch."))
    config.pop("torch_dtype", None)
    folder = prepare_folder(folder, overwrite)
    save_state(state, folder / "model.safetensors")
    with open(folder / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return folder


def export_run(run_dir: str | os.PathLike, folder: str | os.PathLike,
               overwrite: bool = False) -> Path:
    """The latest checkpoint of a trainer run folder as a Hugging Face folder (plus the
    run's tokenizer as ``nnfast_tokenizer.json``: nnfast's tokenizers are not HF's)."""
    from nnfast import data as D
    from nnfast import train as T

    ckpt_path = T.latest_checkpoint(Path(run_dir))
    if ckpt_path is None:
        raise ValueError(f"{run_dir} has no checkpoint (no 'latest' file): not a finished run")
    ckpt = T.load_checkpoint(ckpt_path)
    model = create(ckpt["model"], ckpt["preset"], **ckpt["model_config"])
    model.load_state_dict(ckpt["model_state"])
    out = to_hf(model.eval(), folder, overwrite=overwrite)
    D.save_tokenizer(D.tokenizer_from_dict(ckpt["tokenizer"]), out / "nnfast_tokenizer.json")
    return out
