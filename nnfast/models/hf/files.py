"""Reading and writing Hugging Face model folders: ``config.json`` plus weights in
``model.safetensors``, ``pytorch_model.bin`` or shards listed in a ``*.index.json``.

Every failure a user can cause (no config, no weights, a corrupt file, an existing folder)
is a ValueError or FileNotFoundError naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # optional dependency: pip install nnfast[hf]
        raise ImportError("Hugging Face interop needs safetensors: pip install 'nnfast[hf]'") from e
    return st


def locate(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(config.json, weights file)`` of a model folder or of a weights file beside its
    config.json."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no Hugging Face model at {path}")
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{folder} has no config.json: not a Hugging Face model folder")
    if path.is_file():
        return config, path
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return config, folder / name
    raise ValueError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def read_config(file: Path) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def _read_one(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise ValueError(f"weights file {file} does not exist")
    try:
        if file.suffix == ".safetensors":
            return _safetensors().load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which one
        raise ValueError(f"cannot read weights file {file}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors")
    return state


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, or of every shard its ``*.index.json`` names."""
    if not file.name.endswith(".index.json"):
        return _read_one(file)
    weight_map = read_config(file).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{file} has no weight_map")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = _read_one(file.parent / shard)
        missing = [k for k, v in weight_map.items() if v == shard and k not in part]
        if missing:
            raise ValueError(f"{file.parent / shard} lacks {missing[:3]} that {file.name} lists")
        state.update(part)
    return state


def prepare_folder(folder: str | os.PathLike, overwrite: bool) -> Path:
    """An empty (or new) folder to write into; an existing non-empty one only with
    ``overwrite`` (nothing a user saved is replaced silently)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty; pass overwrite=True to replace its model")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_state(state: dict[str, torch.Tensor], file: str | os.PathLike,
               metadata: dict[str, str] | None = None) -> None:
    """One safetensors file; tensors that share storage are written as separate copies
    (safetensors refuses shared memory), each contiguous."""
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    _safetensors().save_file(out, str(file), metadata=metadata or {"format": "pt"})


def save_model(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> None:
    """``model``'s state dict as one safetensors file. A tied weight (one Parameter under
    two names, e.g. ``lm_head.weight`` is ``wte.weight``) is stored once, under its first
    name; ``load_model`` ties it again. Refuses to replace an existing file unless
    ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    state, seen = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen[id(t)] = name
        state[name] = t
    tmp = path.with_name(path.name + ".tmp")
    save_state(state, tmp)
    os.replace(tmp, path)


def load_model(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a ``save_model`` file into ``model`` (strict: every key must match, tied
    weights filled from the name they were saved under)."""
    state = _read_one(Path(path))
    names = model.state_dict(keep_vars=True)
    first = {}
    for name, t in names.items():
        first.setdefault(id(t), name)
    full = {name: state[first[id(t)]] for name, t in names.items() if first[id(t)] in state}
    extra = sorted(set(state) - set(full))
    missing = sorted(set(names) - set(full))
    if extra or missing:
        raise ValueError(f"{path} does not match the model: missing {missing}, unexpected {extra}")
    model.load_state_dict(full)
    return model
