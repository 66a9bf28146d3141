"""FSDP2 for the trainer (``--parallel fsdp`` under torchrun) and its sharded checkpoints.

``shard`` applies ``torch.distributed.fsdp.fully_shard`` to every block (each element of
the model's ``nn.ModuleList``\\ s) and then to the root, so one block's full weights exist
only while that block runs; the optimizer then sees each rank's shards (DTensors). The
mixed-precision policy follows the trainer's autocast dtype: parameters are gathered in it,
gradients reduced in fp32. ``--activation_checkpointing`` recomputes each block's
activations in the backward pass instead of keeping them.

Sharded checkpoints are folders ``ckpt_<step>.dcp`` written by
``torch.distributed.checkpoint`` (each rank its own shards, in parallel) plus
``trainer.pt``, the trainer's plain state (step, configs, schedule, RNG and sampler states).
A folder is written under a temporary name and renamed when every rank has finished, so a
crash mid-save never leaves a checkpoint that looks complete. DCP reshards on load, so a
run resumes on any world size; ``consolidate`` turns one into a plain single-file
checkpoint (``python -m nnfast consolidate RUN_DIR``) that eval, generate and export read.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from nnfast.checkpoint import SHARDED_META as META
from nnfast.checkpoint import rotate_checkpoints, write_text_atomic

PARALLEL = ("ddp", "fsdp")


def _fsdp():
    from torch.distributed import fsdp

    return fsdp


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, _fsdp().FSDPModule)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers: every element of every ``nn.ModuleList`` (outermost lists only)."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                found.extend(child)
            else:
                visit(child)

    visit(model)
    return found


def _checkpoint_activations(block: nn.Module) -> None:
    """Recompute ``block``'s forward in the backward pass (non-reentrant: works with FSDP's
    hooks and with inputs that need no grad); the module tree and its names stay unchanged."""
    from torch.utils.checkpoint import checkpoint

    inner = block.forward

    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    block.forward = forward


def shard(model: nn.Module, param_dtype: torch.dtype | None,
          activation_checkpointing: bool = False) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` per block, then at the root. Call before the optimizer
    is made (its parameters become the shards)."""
    fsdp = _fsdp()
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"--parallel fsdp: {type(model).__name__} has no blocks (ModuleList)")
    mp = fsdp.MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        if activation_checkpointing:
            _checkpoint_activations(block)
        fsdp.fully_shard(block, mp_policy=mp)
    fsdp.fully_shard(model, mp_policy=mp)
    if hasattr(model, "generate"):  # generate is not forward: gather the root's weights too
        fsdp.register_fsdp_forward_method(model, "generate")
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def set_gradient_sync(model: nn.Module, sync: bool):
    """DDP's ``no_sync`` for DDP; FSDP2's ``set_requires_gradient_sync`` for a sharded model
    (accumulate unreduced gradients until the last micro-batch). A context manager."""
    import contextlib

    if sync:
        return contextlib.nullcontext()
    if is_sharded(model):

        @contextlib.contextmanager
        def off():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return off()
    return model.no_sync()


# ----------------------------------------------------------------------------- checkpoints
def _states(model: nn.Module, optimizer=None) -> dict:
    from torch.distributed.checkpoint import state_dict as sd

    if optimizer is None:
        return {"model": sd.get_model_state_dict(model)}
    m, o = sd.get_state_dict(model, optimizer)
    return {"model": m, "optimizer": o}


def save_sharded(out: Path, step: int, model: nn.Module, optimizer, meta: dict | None,
                 keep: int) -> Path:
    """Every rank calls this; rank 0 (which passes ``meta``) renames and prunes. Returns the
    folder; ``out/latest`` points at it once it is complete."""
    import torch.distributed.checkpoint as dcp

    path = out / f"ckpt_{step:07d}.dcp"
    tmp = out / f"ckpt_{step:07d}.dcp.tmp"
    master = dist.get_rank() == 0
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_states(model, optimizer), checkpoint_id=str(tmp))
    dist.barrier()
    if master:
        torch.save(meta, tmp / META)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        write_text_atomic(out / "latest", path.name + "\n")
        rotate_checkpoints(out, path, step, keep)
    dist.barrier()
    return path


def load_meta(path: Path) -> dict:
    from nnfast.checkpoint import load_checkpoint

    return load_checkpoint(path)


def load_sharded(path: Path, model: nn.Module, optimizer=None) -> None:
    """Fill ``model`` (sharded or plain, any world size, or no process group at all) and
    ``optimizer`` from a DCP folder; DCP reshards to whatever the target holds."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    states = _states(model, optimizer)
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(states, checkpoint_id=str(path))
    if optimizer is None:
        sd.set_model_state_dict(model, states["model"])
    else:
        sd.set_state_dict(model, optimizer, model_state_dict=states["model"],
                          optim_state_dict=states["optimizer"])


def consolidate(path: Path, dest: Path | None = None) -> Path:
    """A DCP checkpoint folder -> one plain ``ckpt_<step>.pt`` (the trainer's single-process
    format: model and optimizer state included), written atomically next to it or at
    ``dest``. Runs in one process, no process group."""
    from nnfast import models
    from nnfast.train import TrainConfig, make_optimizer

    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a plain checkpoint already (not a ckpt_*.dcp folder)")
    meta = load_meta(path)
    model = models.create(meta["model"], meta["preset"], **meta["model_overrides"])
    known = {f.name for f in dataclasses.fields(TrainConfig)}  # saved by another version
    saved = {k: v for k, v in meta["train_config"].items() if k in known}
    cfg = TrainConfig(**{**saved, "parallel": "ddp"})
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    load_sharded(path, model, optimizer)
    state = dict(meta, model_state=model.state_dict(), optimizer=optimizer.state_dict())
    dest = Path(dest) if dest else path.with_suffix(".pt")
    tmp = dest.with_name(dest.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, dest)
    return dest


def parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m nnfast consolidate",
                                description="a sharded (FSDP) checkpoint -> one plain .pt file")
    p.add_argument("path", help="a run folder (its latest checkpoint) or a ckpt_*.dcp folder")
    p.add_argument("--out", default=None,
                   help="a .pt file, or a folder made a plain run folder (checkpoint, latest, "
                        "tokenizer.json) that export reads; default: the .pt next to it")
    return p


def main(argv: list[str]) -> int:
    """``python -m nnfast consolidate RUN_DIR_OR_CKPT.dcp [--out FILE]``."""
    a = parser().parse_args(argv)
    path = Path(a.path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    dest = Path(a.out) if a.out else None
    folder = dest is not None and dest.suffix != ".pt"
    try:
        if folder:
            if dest.exists() and any(dest.iterdir()):
                raise FileExistsError(f"--out {dest} is not empty; nothing was written")
            dest.mkdir(parents=True, exist_ok=True)
            dest = dest / path.with_suffix(".pt").name
        dest = consolidate(path, dest)
        if folder:
            from nnfast import data as D

            D.save_tokenizer(D.tokenizer_from_dict(load_meta(path)["tokenizer"]),
                             dest.parent / "tokenizer.json")
            write_text_atomic(dest.parent / "latest", dest.name + "\n")
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(dest)
    return 0
