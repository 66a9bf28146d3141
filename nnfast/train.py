"""The trainer behind ``python -m nnfast train`` (whose flags ``nnfast.__main__`` parses):
one script for one CPU, one GPU, or many GPUs under ``torchrun`` (DistributedDataParallel;
the same command, no code change).

A step: ``grad_accum`` micro-batches (DDP syncs gradients on the last one only), a NaN/inf
check of the loss, clipping, AdamW (fused on CUDA; weight decay on matrices only), then
the warmup + cosine schedule. Checkpoints hold everything a resumed run needs to continue
exactly as if it had never stopped: model, optimizer, schedule, step, every RNG state, and
each rank's data-sampler state (their files and the run lock: ``nnfast.checkpoint``; flags
given with ``--resume``: ``nnfast.resume``).

The code reads in run order: ``Trainer.__init__`` sets up (devices, the checkpoint to resume,
data, model, optimizer, run folder); ``Trainer.run`` loops ``train_step`` and, at their
intervals, ``log_step``, ``log_eval`` (``evaluate``) and ``save``, then writes the sample.

Models plug in through optional hooks, so every family trains through the same loop:
``prepare_batch(x, y) -> dict`` turns a window of token ids into ``forward``'s keyword
arguments (MLM masking, span corruption, a generated seq2seq task; torch's global RNG, which
checkpoints restore); ``metrics(**batch) -> dict`` adds validation metrics (accuracy);
``demo(tokenizer) -> str`` replaces the final LM sample; ``maybe_grow(step) -> bool`` grows
the model (the optimizer is rebuilt) and ``optim_groups(weight_decay)`` sets its parameter
groups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import typing
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import nnfast.models as models
from nnfast import data as D
from nnfast import distributed as FS
from nnfast import evaluate as E
from nnfast import packing
from nnfast.checkpoint import (  # noqa: F401  (re-exported: nnfast.train's public API)
    RUN_FILES,
    RunFolderError,
    RunLock,
    append_metrics,
    checkpoint_step,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_metrics,
    remove_checkpoint,
    run_files,
    save_checkpoint,
    truncate_metrics,
)
from nnfast.resume import UsageError, apply_hyperparameters, resumed_config

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    model: str = "gpt2"  # architecture name (nnfast.models.list_models())
    preset: str | None = None  # model preset; None: the family's default
    data: str = "auto"  # shakespeare, pystdlib, auto, or a path (text file/folder, .bin shards)
    tokenizer: str = "auto"  # auto (char for text, gpt2 for .bin), char, byte, gpt2
    out: str = "runs/nnfast"  # run folder: checkpoints, metrics.jsonl, loss.png, sample.txt
    device: str = "auto"  # auto (cuda when available), cpu, cuda
    compile: bool = False  # torch.compile the model
    threads: int = 0  # torch's CPU threads; 0: $OMP_NUM_THREADS, else half the cores (<= 8)
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, float32 on CPU), float16...
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps
    lr_decay_steps: int = 0  # step where the cosine ends; 0: max_steps
    weight_decay: float = 0.1  # AdamW decay on 2-D parameters (not on norms and biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    val_fraction: float = 0.1  # tail of a single-file corpus held out for validation
    eval_interval: int = 250  # steps between validation runs (and at the end)
    eval_steps: int = 20  # validation batches per run
    log_interval: int = 10  # steps between metrics rows
    save_interval: int = 0  # steps between checkpoints; 0: at every eval
    keep_checkpoints: int = 2  # newest checkpoints kept
    seed: int = 1337
    sample_tokens: int = 300  # tokens generated at the end; 0: none
    prompt: str = "\n"  # start of the sample
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None

    adam_eps: float = 1e-8  # AdamW's epsilon
    pack_documents: bool = False  # EOT-separated documents, no cross-doc attention, none dropped
    overwrite: bool = False  # start afresh in a folder holding a run (deletes its files)
    parallel: str = "ddp"  # under torchrun: ddp (replicas) or fsdp (FSDP2, sharded)
    activation_checkpointing: bool = False  # fsdp: recompute block activations in backward
    eval_hellaswag: str | None = None  # HellaSwag-format .jsonl scored during training
    eval_hellaswag_every: int = 0  # steps between those scores; 0: at every eval

    def __post_init__(self) -> None:
        _validate(self)


def _validate(cfg: TrainConfig) -> None:
    """Every field checked before any work, so a bad value never costs a training run."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value, tp = getattr(cfg, f.name), hints[f.name]
        allowed = tuple(t for t in (typing.get_args(tp) or (tp,)))
        if float in allowed:
            allowed += (int,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " | ".join(getattr(t, "__name__", str(t)) for t in typing.get_args(tp) or (tp,))
            raise UsageError(f"--{f.name} expects {names}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{f.name} must be a finite number, got {value}")

    def check(ok: bool, name: str, want: str) -> None:
        if not ok:
            raise UsageError(f"--{name} must be {want}, got {getattr(cfg, name)}")

    for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_steps",
                 "log_interval", "keep_checkpoints"):
        check(getattr(cfg, name) >= 1, name, ">= 1")
    for name in ("warmup_steps", "lr_decay_steps", "save_interval", "sample_tokens",
                 "threads", "weight_decay", "grad_clip",
                 "eval_hellaswag_every"):
        check(getattr(cfg, name) >= 0, name, ">= 0")
    check(0.0 <= cfg.val_fraction < 1.0, "val_fraction", "in [0, 1)")
    check(0.0 <= cfg.min_lr_ratio <= 1.0, "min_lr_ratio", "in [0, 1]")
    check(cfg.lr > 0, "lr", "> 0")
    for name in ("beta1", "beta2"):
        check(0.0 <= getattr(cfg, name) < 1.0, name, "in [0, 1)")
    check(cfg.adam_eps > 0, "adam_eps", "> 0")
    # AdamW's first update is lr / (1 - beta1) (and its decay lr * weight_decay), in float32.
    step = max(cfg.lr / (1 - cfg.beta1), cfg.lr * cfg.weight_decay)
    fmax = torch.finfo(torch.float32).max
    check(step < fmax, "lr", f"small enough that AdamW's step lr / (1 - beta1) = {step:.3g} "
          f"fits in float32 (< {fmax:.3g})")
    check(0 <= cfg.seed < 2**32, "seed", "in [0, 2**32)")
    check(cfg.temperature > 0, "temperature", "> 0")
    check(cfg.top_k is None or cfg.top_k >= 1, "top_k", ">= 1 (or none)")
    check(cfg.top_p is None or 0 < cfg.top_p <= 1, "top_p", "in (0, 1] (or none)")
    choices = {"dtype": DTYPES, "tokenizer": D.TOKENIZERS, "parallel": FS.PARALLEL}
    for name, valid in choices.items():
        if getattr(cfg, name) not in valid:
            raise UsageError(f"--{name} must be one of {', '.join(valid)}, "
                             f"got {getattr(cfg, name)!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


# ----------------------------------------------------------------------------- helpers
def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} but no CUDA GPU is available")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}, but this machine has "
                             f"{torch.cuda.device_count()} CUDA GPU(s)")
        if world > 1:
            index = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def cpu_threads(requested: int = 0, local_world: int = 1) -> tuple[int, str]:
    """Threads for torch's CPU ops, and where the number comes from.

    ``--threads`` wins, then ``$OMP_NUM_THREADS``; else half of the cores this process may
    use, split among the ranks on this machine, at most 8. Torch's own default (every core)
    is the worst choice on a shared or busy machine: a step waits for its slowest thread, and
    one preempted thread stalls them all (issue 17: 2 threads on 2 busy cores ran 8x slower
    than 1). The small models a CPU trains gain little from more than a few threads."""
    if requested > 0:
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "$OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = max(1, min(8, (cores or 1) // 2 // max(1, local_world)))
    return n, f"default: half of this machine's {cores} cores, at most 8"


class Throughput:
    """Tokens per second over the last ``window`` steps: a moving average, so the progress
    bar does not jump with one slow step (a busy machine, a checkpoint write)."""

    def __init__(self, tokens_per_step: int, window: int = 20):
        self.tokens_per_step = tokens_per_step
        self.times: deque[float] = deque(maxlen=window)

    def update(self, seconds: float) -> float:
        self.times.append(seconds)
        return self.tokens_per_step * len(self.times) / max(sum(self.times), 1e-9)


def _autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): warmup, then cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    end = cfg.lr_decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    if hasattr(model, "optim_groups"):  # e.g. a frozen or slower shared base
        groups = model.optim_groups(cfg.weight_decay, lr=cfg.lr)
    else:
        # Decay matrices (matmuls, embeddings) only: decaying norm gains and biases toward 0
        # fights the normalization and buys nothing (GPT-3, nanoGPT).
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             fused=fused)


def _rng_state() -> dict:
    # Tensors, tuples and numbers only, so a checkpoint loads with weights_only=True.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # older: ndarray
    np.random.set_state((kind, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# The child that draws loss.png runs nnfast/plot.py by path: ``-m nnfast.plot`` would import
# nnfast, and with it torch, into the child.
_PLOT_SCRIPT = Path(__file__).with_name("plot.py")
_RUN_PATH = "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__')"


def plot_metrics(metrics: Path, png: Path) -> bool:
    """loss.png from metrics.jsonl, drawn in a child process (``nnfast/plot.py``); False when
    matplotlib is not installed or the plot failed (a lost plot never costs the run)."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    try:
        rows = read_metrics(metrics)
    except RunFolderError:  # a damaged history costs the plot, never the run
        return False
    cmd = [sys.executable, "-c", _RUN_PATH, str(_PLOT_SCRIPT), str(png)]
    try:
        res = subprocess.run(cmd, input=json.dumps(rows), text=True, capture_output=True,
                             timeout=300)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


# ----------------------------------------------------------------------------- training
def train(
    cfg: TrainConfig,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    given: set[str] | None = None,
    show_progress: bool = True,
) -> dict:
    """Train; returns ``{"losses": [loss per step run here], "val_loss", "val_metrics",
    "sample", "model"}``.

    ``given``: the fields set on the command line; on resume the others are the checkpoint's
    (None: all of ``cfg`` counts as given)."""
    trainer = Trainer(cfg, overrides, resume, given, show_progress)
    try:
        return trainer.run()
    finally:
        trainer.close()


def _quiet(*args, **kwargs) -> None:
    pass


class Trainer:
    """One run, in the order it happens. ``__init__`` sets up: devices, the checkpoint to
    resume from, data, model, optimizer, run folder. ``run`` loops ``train_step`` and, at
    their intervals, ``log_step``, ``evaluate`` and ``save``, then writes a sample."""

    def __init__(self, cfg: TrainConfig, overrides: dict[str, Any] | None = None,
                 resume: bool = False, given: set[str] | None = None,
                 show_progress: bool = True):
        self.rank, self.world, self.device = _setup_distributed(cfg.device)
        self.master = self.rank == 0
        self.log = print if self.master else _quiet
        self.show_progress = show_progress
        self.out = Path(cfg.out)
        self.metrics_path = self.out / "metrics.jsonl"
        if self.device.type == "cuda":  # TF32 matmuls: fp32 range, ~3x the fp32 throughput
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.notes: list[str] = []  # printed after the data line, which comes first
        self.lock = None
        self._lock_run_folder()
        try:
            ckpt = self._find_resume(cfg, dict(overrides or {}), resume, given)
            self._setup_data(ckpt)
            for note in self.notes:
                self.log(note)
            self._setup_threads()
            self._setup_model(ckpt)
            self._setup_optimizer(ckpt)
            self._setup_run_folder()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let the next trainer have the run folder."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------------------- setup
    def _lock_run_folder(self) -> None:
        """One trainer per ``--out``: rank 0 takes the lock, and every rank learns the outcome."""
        error = None
        if self.master:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                self.lock = RunLock(self.out).acquire(self.notes.append)
            except RunFolderError as e:
                error = ("run", str(e))
            except OSError as e:  # not a folder, not writable, disk full
                error = ("usage", f"cannot write to --out {self.out}: {e.strerror or e}")
        if self.world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise (UsageError if error[0] == "usage" else RunFolderError)(error[1])

    def _find_resume(self, cfg: TrainConfig, overrides: dict, resume: bool,
                     given: set[str] | None) -> dict | None:
        """The checkpoint to continue from (None: a fresh run); sets ``cfg``, ``overrides``."""
        self.cfg, self.overrides = cfg, overrides
        if resume and cfg.overwrite:
            raise UsageError("--resume continues the run in --out and --overwrite deletes it: "
                             "pass one of them")
        found = find_checkpoint(self.out, self.notes.append) if resume else None
        if found is None:
            self._start_afresh(resume)
            return None
        path, ckpt = found
        self.ckpt_path = path
        self.notes.append(f"resume: {path} (step {ckpt['step']})")
        self.cfg = resumed_config(ckpt, cfg, overrides, given, self.notes.append, lr_factor)
        self.overrides = dict(ckpt["model_overrides"])
        return ckpt

    def _start_afresh(self, resume: bool) -> None:
        """A new run; a folder holding an old one is used only with --overwrite."""
        old = run_files(self.out)
        if not old:
            if resume:
                self.notes.append(f"resume: no checkpoint in {self.out}; starting fresh")
            return
        if not self.cfg.overwrite:
            names = ", ".join(p.name for p in old[:4]) + (", ..." if len(old) > 4 else "")
            if resume:
                raise RunFolderError(
                    f"{self.out} holds no checkpoint to resume from, but a run's files "
                    f"({names}): pass --overwrite to start afresh there, or choose another --out"
                )
            raise FileExistsError(
                f"{self.out} holds a run already: pass --resume, or --overwrite to start "
                "afresh (deleting it), or choose another --out"
            )
        if self.master:
            for p in old:
                remove_checkpoint(p)
        self.notes.append(f"overwrite: deleted the previous run's {len(old)} files in {self.out}")

    def _setup_data(self, ckpt: dict | None) -> None:
        cfg = self.cfg
        saved_tok = D.tokenizer_from_dict(ckpt["tokenizer"]) if ckpt else None
        self.hellaswag = E.read_hellaswag(cfg.eval_hellaswag) if cfg.eval_hellaswag else None
        self.corpus = D.load_corpus(cfg.data, cfg.tokenizer, cfg.val_fraction, saved_tok)
        self.log(f"data: {self.corpus.description}")
        vocab = self.corpus.tokenizer.vocab_size
        if self.overrides.get("vocab_size", vocab) < vocab:
            raise UsageError(
                f"--vocab_size {self.overrides['vocab_size']} < the tokenizer's {vocab}"
            )
        self.overrides.setdefault("vocab_size", vocab)
        _check_token_ids(self.corpus, self.overrides["vocab_size"])
        # The checkpoint records the tokenizer used, not "auto".
        self.cfg = dataclasses.replace(cfg, tokenizer=self.corpus.tokenizer.kind)

    def _setup_threads(self) -> None:
        """On a CPU, pick torch's thread count (``cpu_threads``) and say why."""
        self.threads = None
        if self.device.type != "cpu":
            return
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.threads, why = cpu_threads(self.cfg.threads, local_world)
        torch.set_num_threads(self.threads)
        self.log(f"cpu threads: {self.threads} ({why}; set with --threads N or OMP_NUM_THREADS)")

    def _setup_model(self, ckpt: dict | None) -> None:
        cfg = self.cfg
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.raw_model = models.create(cfg.model, cfg.preset, **self.overrides).to(self.device)
        if ckpt is not None and "model_state" in ckpt:  # before the optimizer: a model that
            self.raw_model.load_state_dict(ckpt["model_state"])  # grew must grow again first
        self.sharded = cfg.parallel == "fsdp" and self.world > 1
        if self.sharded:  # before the optimizer, which must see the shards
            if hasattr(self.raw_model, "maybe_grow"):
                raise UsageError(f"--parallel fsdp: {cfg.model} grows during training; use ddp")
            FS.shard(self.raw_model, _autocast_dtype(cfg.dtype, self.device),
                     cfg.activation_checkpointing)
        mc = self.raw_model.config
        torch.manual_seed(cfg.seed + self.rank)  # dropout masks differ across ranks
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        self.log(
            f"model: {cfg.model}/{cfg.preset or 'default'}, {n_params / 1e6:.2f}M parameters, "
            f"block {mc.block_size}, vocab {mc.vocab_size}, device {self.device}, "
            f"world {self.world}"
        )
        # One global order that each rank slices: the data does not depend on the world size.
        corpus, order = self.corpus, {"rank": self.rank, "world": self.world}
        Batches = packing.batches_class(cfg.pack_documents, corpus.tokenizer, self.raw_model,
                                        D.Batches)
        self.train_batches = Batches(corpus.train, mc.block_size, cfg.batch_size, self.device,
                                     cfg.seed, grad_accum=cfg.grad_accum, **order)
        self.val_batches = Batches(corpus.val or corpus.train, mc.block_size, cfg.batch_size,
                                   self.device, cfg.seed, name="val split", stream=1, **order)
        amp_dtype = _autocast_dtype(cfg.dtype, self.device)
        self.autocast = (
            torch.autocast(self.device.type, dtype=amp_dtype)
            if amp_dtype else contextlib.nullcontext()
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)

    def _setup_optimizer(self, ckpt: dict | None) -> None:
        """Optimizer, schedule and wrapped model; restored from ``ckpt`` with RNG and data."""
        self.optimizer, self.scheduler = self._make_optimizer()
        self.start = 0
        if ckpt is not None:
            fresh = [{k: v for k, v in g.items() if k != "params"}
                     for g in self.optimizer.param_groups]
            if "optimizer" in ckpt and self.sharded:  # whole tensors for sharded parameters
                raise UsageError(f"{self.ckpt_path} is a plain (DDP or one-process) checkpoint: "
                                 "resume it with --parallel ddp (FSDP resumes from ckpt_*.dcp)")
            if "optimizer" in ckpt:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            else:  # sharded: weights and optimizer resharded to this world size
                FS.load_sharded(self.ckpt_path, self.raw_model, self.optimizer)
            self.scheduler.load_state_dict(ckpt["scheduler"])
            apply_hyperparameters(self.optimizer, self.scheduler, fresh,
                                  lr_factor(self.scheduler.last_epoch, self.cfg))
            if ckpt["scaler"]:  # empty when saved without float16 loss scaling
                self.scaler.load_state_dict(ckpt["scaler"])
            self.start = ckpt["step"]
            ranks = ckpt["rank_states"]
            self.train_batches.seek(self.start)  # the global data order, on any world size
            if len(ranks) == self.world:
                _set_rng_state(ranks[self.rank]["rng"])
            else:  # a different world size: fresh, distinct dropout streams
                self.log(f"resume: world size {len(ranks)} -> {self.world}; RNG streams re-seeded")
        self.model = self._wrap(self.raw_model)

    def _make_optimizer(self, last_epoch: int = -1):
        optimizer = make_optimizer(self.raw_model, self.cfg, self.device)
        if last_epoch >= 0:  # a scheduler joining mid-run needs the groups' starting lr
            for g in optimizer.param_groups:
                g.setdefault("initial_lr", g["lr"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, self.cfg), last_epoch=last_epoch
        )
        return optimizer, scheduler

    def _wrap(self, m: torch.nn.Module) -> torch.nn.Module:
        if self.cfg.compile:
            m = torch.compile(m)
        if self.world > 1 and not self.sharded:
            dev = self.device
            m = torch.nn.parallel.DistributedDataParallel(
                m, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        return m

    def _setup_run_folder(self) -> None:
        if self.master:
            self.out.mkdir(parents=True, exist_ok=True)
            for tmp in self.out.glob("*.tmp"):  # we hold the lock: a killed writer's leftovers
                if checkpoint_step(tmp.with_suffix("")) is not None or tmp.stem in RUN_FILES:
                    remove_checkpoint(tmp)
            D.save_tokenizer(self.corpus.tokenizer, self.out / "tokenizer.json")
            truncate_metrics(self.metrics_path, self.start, self.log)
            # What this (part of the) run trained on, first: a row without "loss".
            append_metrics(self.metrics_path, {
                "step": self.start, "data": self.corpus.description,
                "embedded_corpus": self.corpus.embedded, "cpu_threads": self.threads,
            })

    # ------------------------------------------------------------------------- steps
    def batch_kwargs(self, x: torch.Tensor, y: torch.Tensor, *packed) -> dict:
        if hasattr(self.raw_model, "prepare_batch"):
            return self.raw_model.prepare_batch(x, y)
        return packing.batch_kwargs({"idx": x, "targets": y}, packed)

    def maybe_grow(self, step: int) -> None:
        """Let a growing model grow before ``step``; new parameters need a new optimizer."""
        if not (hasattr(self.raw_model, "maybe_grow") and self.raw_model.maybe_grow(step - 1)):
            return
        # Constructing with last_epoch=step-2 steps once: lr = lr_factor(step - 1), as if
        # this optimizer had been stepped along from the start.
        self.optimizer, self.scheduler = self._make_optimizer(last_epoch=step - 2)
        self.model = self._wrap(self.raw_model)
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        self.log(f"step {step - 1}: model grew to {n_params / 1e6:.2f}M parameters")

    def train_step(self, step: int) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss."""
        cfg, model, world = self.cfg, self.model, self.world
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            kw = self.batch_kwargs(*self.train_batches.next())
            sync = micro == cfg.grad_accum - 1 or world == 1  # DDP syncs on the last only
            with FS.set_gradient_sync(model, sync), self.autocast:
                loss = model(**kw)[1]
            loss_sum += loss.detach().float()
            self.scaler.scale(loss / cfg.grad_accum).backward()
        if world > 1:
            dist.all_reduce(loss_sum)  # every rank sees the same loss and stops together
        loss_val = loss_sum.item() / (cfg.grad_accum * world)
        if not math.isfinite(loss_val):
            last = latest_checkpoint(self.out)
            raise TrainingDiverged(
                f"loss is {loss_val} at step {step}; stopping. Try a lower --lr or --grad_clip"
                + (f"; the last good checkpoint is {last}" if last else "")
            )
        trainable = [p for p in self.raw_model.parameters() if p.requires_grad]
        if cfg.grad_clip > 0 and trainable:  # a counting model has nothing to clip
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_val

    def evaluate(self) -> tuple[float, dict[str, float]]:
        """Validation loss and the model's own metrics, on the same batches every time."""
        cfg, device, raw = self.cfg, self.device, self.raw_model
        self.model.eval()
        self.val_batches.seek(0)
        total = torch.zeros((), device=device)
        extra: dict[str, float] = {}
        devices = [device] if device.type == "cuda" else []
        # prepare_batch may draw from the global RNG: fork it so evaluating never changes
        # the training run (resume stays exact) and every eval sees the same masks.
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            for _ in range(cfg.eval_steps):
                kw = self.batch_kwargs(*self.val_batches.next())
                with self.autocast:
                    total += self.model(**kw)[1].float()
                    if hasattr(raw, "metrics"):
                        for k, v in raw.metrics(**kw).items():
                            extra[k] = extra.get(k, 0.0) + float(v) / cfg.eval_steps
        self.model.train()
        if self.world > 1:
            dist.all_reduce(total)
            for k in sorted(extra):
                t = torch.tensor(extra[k], device=device)
                dist.all_reduce(t)
                extra[k] = t.item() / self.world
        return total.item() / (cfg.eval_steps * self.world), extra

    def save(self, step: int, loss: float) -> None:
        """A checkpoint after ``step``: everything an exact resume needs, every rank's RNG."""
        self.check_finite(step, loss)
        mine = {"rng": _rng_state(), "data": self.train_batches.state_dict()}
        ranks = [mine]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, mine)
        if not (self.master or self.sharded):
            return
        cfg, raw = self.cfg, self.raw_model
        state = {
            "step": step, "model": cfg.model, "preset": cfg.preset,
            "model_overrides": self.overrides,
            "model_config": dataclasses.asdict(raw.config),
            "train_config": dataclasses.asdict(cfg),
            "tokenizer": self.corpus.tokenizer.to_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rank_states": ranks,  # RNG and data-sampler state of every rank
        }
        if self.sharded:  # every rank writes its shards
            FS.save_sharded(self.out, step, raw, self.optimizer, state if self.master else None,
                            cfg.keep_checkpoints)
        else:
            state.update(model_state=raw.state_dict(), optimizer=self.optimizer.state_dict())
            save_checkpoint(self.out, state, step, cfg.keep_checkpoints)
        if self.master:
            plot_metrics(self.metrics_path, self.out / "loss.png")

    def check_finite(self, step: int, loss: float) -> None:
        """A finite loss can still leave NaN weights (the update overflowed): such a state
        is never saved, so ``latest`` always names a good checkpoint."""
        named = list(self.raw_model.named_parameters())
        named += [(f"the optimizer's {k} of {n}", v) for (n, p) in named
                  for k, v in self.optimizer.state.get(p, {}).items() if torch.is_tensor(v)]
        named = [(n, FS.local(t)) for n, t in named]  # this rank's shard of an FSDP tensor
        named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
        # min and max: NaN propagates into both, inf shows in one; 20x cheaper than isfinite.
        finite = [torch.isfinite(torch.stack(t.detach().aminmax())).all() for _, t in named]
        ok = torch.stack(finite).all() if finite else torch.ones((), dtype=torch.bool)
        if self.world > 1:  # sharded parameters may differ across ranks: stop together
            ok = ok.to(self.device, torch.int32)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if bool(ok):
            return
        bad = next((n for (n, _), f in zip(named, finite) if not f), "a parameter on another rank")
        last = latest_checkpoint(self.out)
        raise TrainingDiverged(
            f"{bad} is not finite after step {step} (whose loss, {loss:.4g}, was): step {step} "
            "is not saved; stopping. Try a lower --lr or --grad_clip"
            + (f"; the last good checkpoint is {last}" if last else "")
        )

    def write(self, row: dict) -> None:
        if self.master:
            append_metrics(self.metrics_path, row)

    def log_step(self, step: int, loss: float, tok_s: float, mfu: float | None, bar) -> None:
        row = {"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
               "tokens_per_s": round(tok_s, 1), "mfu": mfu}
        self.write(row)
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tok_s:,.0f}"}
        if mfu is not None:
            post["mfu"] = f"{100 * mfu:.1f}%"
        bar.set_postfix(post, refresh=False)

    def log_eval(self, step: int, loss: float, bar) -> tuple[float, dict[str, float]]:
        val_loss, val_metrics = self.evaluate()
        self.write({"step": step, "val_loss": val_loss, **val_metrics})
        if self.master:
            shown = "".join(f", {k} {v:.4f}" for k, v in val_metrics.items())
            bar.write(f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f}{shown}")
        return val_loss, val_metrics

    # ------------------------------------------------------------------------- the loop
    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg, start, raw = self.cfg, self.start, self.raw_model
        tokens_per_step = cfg.batch_size * raw.config.block_size * cfg.grad_accum * self.world
        throughput = Throughput(tokens_per_step)
        peak = models.peak_flops(self.device)
        flops_per_token = raw.estimate_flops_per_token(raw.config.block_size) if peak else None
        save_every = cfg.save_interval or cfg.eval_interval
        losses, val_loss, val_metrics = [], None, {}
        bar = tqdm(total=cfg.max_steps, initial=start,
                   disable=not (self.master and self.show_progress), dynamic_ncols=True)
        with bar:
            self.model.train()
            t0 = time.perf_counter()
            for step in range(start + 1, cfg.max_steps + 1):  # `step`: optimizer steps done
                self.maybe_grow(step)
                loss = self.train_step(step)
                losses.append(loss)
                tok_s = throughput.update(time.perf_counter() - t0)
                mfu = tok_s / self.world * flops_per_token / peak if peak else None
                bar.update(1)
                if step % cfg.log_interval == 0 or step in (start + 1, cfg.max_steps):
                    self.log_step(step, loss, tok_s, mfu, bar)
                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    val_loss, val_metrics = self.log_eval(step, loss, bar)
                every = cfg.eval_hellaswag_every or cfg.eval_interval
                if self.hellaswag and (step % every == 0 or step == cfg.max_steps):
                    self.log_hellaswag(step, bar)
                if step % save_every == 0 or step == cfg.max_steps:
                    self.save(step, loss)
                t0 = time.perf_counter()  # eval and saving do not count against tokens/s
        text = self.write_sample()
        if self.world > 1:
            dist.barrier()
        return {"losses": losses, "val_loss": val_loss, "val_metrics": val_metrics,
                "sample": text, "model": raw}

    def log_hellaswag(self, step: int, bar) -> None:
        """HellaSwag scores of the model now: rank 0 alone, or every rank on a sharded model
        (its forward gathers the weights with collectives)."""
        if not (self.master or self.sharded):
            return
        hs = E.hellaswag(self.raw_model, self.corpus.tokenizer, self.hellaswag,
                         self.cfg.batch_size, self.device)
        self.write({"step": step, "hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"]})
        if self.master:
            bar.write(f"step {step}: hellaswag acc {hs['acc']:.4f}, acc_norm "
                      f"{hs['acc_norm']:.4f} ({hs['n']} examples)")

    def write_sample(self) -> str:
        cfg = self.cfg
        # A sharded model samples on every rank (generate gathers weights collectively).
        if not ((self.master or self.sharded) and cfg.sample_tokens > 0):
            return ""
        try:
            text = _sample(self.raw_model, self.corpus.tokenizer, cfg, self.device, self.autocast)
        except D.DataError as e:  # e.g. GPT-2 BPE files unavailable offline: the run stands
            self.log(f"sample skipped: {e}")
            return ""
        if not self.master:
            return text
        (self.out / "sample.txt").write_text(text, encoding="utf-8")
        title = getattr(self.raw_model, "demo_title", None)  # a task demo, not an LM sample
        self.log(f"{title or f'sample ({cfg.sample_tokens} tokens)'}:\n{text}")
        return text

def _check_token_ids(corpus, vocab: int) -> None:
    """Shards on disk hold another program's ids: one past the vocabulary would index
    outside the embedding (a device-side crash on GPU). A chunked scan, once per run."""
    chunk = 1 << 24
    for ids in corpus.train + corpus.val:
        if np.issubdtype(ids.dtype, np.integer) and np.iinfo(ids.dtype).max < vocab:
            continue
        for lo in range(0, len(ids), chunk):
            part = np.asarray(ids[lo : lo + chunk])
            top = int(part.max())
            if top >= vocab:
                where = getattr(ids, "filename", None) or "the corpus"
                at = int(np.argmax(part >= vocab))  # the first bad id; its place in the file:
                pos = getattr(ids, "token_offset", 0) + lo + at
                raise D.DataError(
                    f"{where} holds token id {int(part[at])} at position {pos}, past the "
                    f"vocabulary (ids 0..{vocab - 1}): "
                    "these shards were made with another tokenizer; pass --vocab_size "
                    f"{top + 1} or more if the ids are right"
                )


def _sample(model, tokenizer, cfg: TrainConfig, device, autocast) -> str:
    if hasattr(model, "demo"):  # encoders and seq2seq models show their own task
        with autocast:
            return model.demo(tokenizer)
    ids = []
    if cfg.prompt and isinstance(tokenizer, D.CharTokenizer):
        ids = [tokenizer.stoi[c] for c in cfg.prompt if c in tokenizer.stoi]
    elif cfg.prompt:
        ids = list(tokenizer.encode(cfg.prompt))
    if not ids:
        ids = [getattr(tokenizer, "eot", 0)]
    idx = torch.tensor([ids[-model.config.block_size :]], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # global RNG untouched
    with autocast:
        outs = model.generate(idx, cfg.sample_tokens, temperature=cfg.temperature,
                              top_k=cfg.top_k, top_p=cfg.top_p, generator=gen)
    return tokenizer.decode(outs[0].tolist())
