"""A trained model and its tokenizer from a run folder, a checkpoint, or a Hugging Face folder
(what ``python -m nnfast eval`` and ``generate`` load).

* a run folder (``python -m nnfast train --out DIR``): its latest checkpoint, plain
  ``ckpt_*.pt`` or sharded ``ckpt_*.dcp`` (FSDP; gathered in this one process);
* a checkpoint: ``ckpt_*.pt`` or ``ckpt_*.dcp``;
* a Hugging Face folder (``config.json`` + weights): ``nnfast.models.hf``'s loader, with
  GPT-2's BPE as the tokenizer for GPT-2 (other families need the folder's
  ``tokenizer.json`` and the ``tokenizers`` package).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nnfast import data as D


class RunError(ValueError):
    """A path that holds no loadable model, with the reason."""


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: D.Tokenizer
    description: str


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package."""

    kind = "hf"

    def __init__(self, path: Path, eos_id: int | None):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        if eos_id is not None:
            self.eot = eos_id

    def encode(self, text: str):
        import numpy as np

        return np.array(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def _checkpoint_in(folder: Path) -> Path:
    from nnfast.train import latest_checkpoint

    found = latest_checkpoint(folder)
    if found is None:  # no pointer: the newest checkpoint by name
        names = sorted([*folder.glob("ckpt_*.pt"), *folder.glob("ckpt_*.dcp")])
        found = names[-1] if names else None
    if found is None:
        raise RunError(f"{folder}: no checkpoint (no 'latest' pointer, ckpt_*.pt or ckpt_*.dcp);"
                       " train with --out pointing here first")
    return found


def _from_checkpoint(path: Path, device) -> Loaded:
    from nnfast import distributed as FS
    from nnfast import models
    from nnfast.train import load_checkpoint

    try:
        ckpt = load_checkpoint(path)
        model = models.create(ckpt["model"], ckpt["preset"], **ckpt["model_overrides"])
        tok = D.tokenizer_from_dict(ckpt["tokenizer"])
    except (OSError, KeyError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise RunError(f"{path}: not an nnfast checkpoint ({e!r})") from None
    if path.is_dir():
        FS.load_sharded(path, model)
    else:
        model.load_state_dict(ckpt["model_state"])
    desc = f"{ckpt['model']}/{ckpt['preset'] or 'default'} step {ckpt['step']} ({path})"
    return Loaded(model.to(device).eval(), tok, desc)


def _from_hf(folder: Path, device) -> Loaded:
    from nnfast.models import hf

    load = getattr(hf, "from_hf", None) or hf.load_gpt2_hf  # from_hf: every HF family
    config = json.loads((folder / "config.json").read_text())
    try:
        model = load(folder)
    except (ValueError, FileNotFoundError) as e:
        raise RunError(f"{folder}: {e}") from None
    if config.get("model_type", "gpt2") == "gpt2":
        tok = D.GPT2Tokenizer()
    elif (folder / "tokenizer.json").is_file():
        try:
            tok = HFTokenizer(folder / "tokenizer.json", config.get("eos_token_id"))
        except ImportError:
            msg = "reading tokenizer.json needs `pip install tokenizers`"
            raise RunError(f"{folder}: {msg}") from None
    else:
        raise RunError(f"{folder}: no tokenizer.json for model_type {config['model_type']!r}")
    return Loaded(model.float().to(device).eval(), tok, f"Hugging Face folder {folder}")


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    path = Path(path).expanduser()
    if not path.exists():
        raise RunError(f"{path}: no such run folder, checkpoint or Hugging Face folder")
    if path.is_dir() and (path / "config.json").is_file():
        return _from_hf(path, device)
    if path.is_file() or path.suffix == ".dcp":
        return _from_checkpoint(path, device)
    return _from_checkpoint(_checkpoint_in(path), device)


def encode_prompt(tok: D.Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``; the char tokenizer skips characters it has never seen (a user's
    prompt need not be spelled in the training corpus' alphabet)."""
    if isinstance(tok, D.CharTokenizer):
        return [tok.stoi[c] for c in text if c in tok.stoi]
    return [int(i) for i in tok.encode(text)]
