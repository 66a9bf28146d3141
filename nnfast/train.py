"""The trainer behind ``python -m nnfast train`` (whose flags ``nnfast.__main__`` parses):
one script for one CPU, one GPU, or many GPUs under ``torchrun`` (DistributedDataParallel;
the same command, no code change).

A step: ``grad_accum`` micro-batches (DDP syncs gradients on the last one only), a NaN/inf
check of the loss, clipping, AdamW (fused on CUDA; weight decay on matrices only), then
the warmup + cosine schedule. Checkpoints hold everything a resumed run needs to continue
exactly as if it had never stopped: model, optimizer, schedule, step, every RNG state, and
each rank's data-sampler state. They are written to a temporary file and renamed, and the
``latest`` pointer moves only after that rename, so a crash mid-save never loses a run.

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
import json
import math
import os
import random
import time
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
from nnfast.distributed import PARALLEL

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
    parallel: str = "ddp"  # under torchrun: ddp (replicas) or fsdp (FSDP2, sharded)
    activation_checkpointing: bool = False  # fsdp: recompute block activations in backward
    eval_hellaswag: str | None = None  # HellaSwag-format .jsonl scored during training
    eval_hellaswag_every: int = 0  # steps between those scores; 0: at every eval

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_steps",
                    "log_interval", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "lr_decay_steps", "save_interval", "sample_tokens",
                     "eval_hellaswag_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        choices = {"device": ("auto", "cpu", "cuda"), "dtype": DTYPES, "tokenizer": D.TOKENIZERS,
                   "parallel": PARALLEL}
        for name, valid in choices.items():
            value = getattr(self, name)
            if value not in valid and not (name == "device" and value.startswith("cuda:")):
                raise ValueError(f"--{name} must be one of {', '.join(valid)}, got {value!r}")


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
            raise RuntimeError("--device cuda but no CUDA GPU is available")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, state: dict, step: int, keep: int) -> Path:
    """Write ``ckpt_<step>.pt`` atomically, point ``latest`` at it, drop all but ``keep``."""
    path = out / f"ckpt_{step:07d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic on POSIX: the name holds the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)
    ptr = out / "latest.tmp"
    ptr.write_text(path.name + "\n")
    os.replace(ptr, out / "latest")
    for old in sorted(out.glob("ckpt_*.pt"))[: -max(1, keep)]:
        if old != path:
            old.unlink()
    return path


def latest_checkpoint(out: Path) -> Path | None:
    ptr = out / "latest"
    if not ptr.is_file():
        return None
    path = out / ptr.read_text().strip()
    return path if path.is_file() or (path / FS.META).is_file() else None


def load_checkpoint(path: Path) -> dict:
    if path.is_dir():  # sharded (FSDP): the trainer's state; weights load after sharding
        return FS.load_meta(path)
    # Our own file, holding numpy RNG state: not loadable with weights_only=True.
    return torch.load(path, map_location="cpu", weights_only=False)


def plot_metrics(metrics: Path, png: Path) -> bool:
    """loss.png from metrics.jsonl; False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)  # an Agg canvas without touching pyplot's global backend
    ax = fig.add_subplot()
    for key, label in (("loss", "train"), ("val_loss", "val")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    hs = [(r["step"], r["hellaswag_acc_norm"]) for r in rows if "hellaswag_acc_norm" in r]
    if hs:  # accuracy on its own scale, on the right
        ax2 = ax.twinx()
        ax2.plot(*zip(*hs), color="tab:green", marker=".", label="hellaswag acc_norm")
        ax2.set_ylabel("accuracy")
        ax2.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.savefig(png, dpi=100)
    return True


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
    overrides = dict(overrides or {})
    rank, world, device = _setup_distributed(cfg.device)
    master = rank == 0
    out = Path(cfg.out)
    log = print if master else (lambda *a, **k: None)
    if device.type == "cuda":  # TF32 matmuls: fp32 range, ~3x the fp32 throughput
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    ckpt_path = latest_checkpoint(out)
    ckpt = None
    if resume and ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        _check_resume(ckpt, cfg, overrides, given or set())
        overrides = ckpt["model_overrides"]
        # Trainer fields not on this command line continue as the run was started.
        ckpt_cfg = dict(ckpt["train_config"], model=ckpt["model"], preset=ckpt["preset"])
        every = {f.name for f in dataclasses.fields(cfg)} - {"model", "preset"}
        skip = set(every if given is None else given) | {"out"}  # out: where it was found
        cfg = dataclasses.replace(cfg, **{k: v for k, v in ckpt_cfg.items() if k not in skip})
        log(f"resume: {ckpt_path} (step {ckpt['step']})")
    elif resume:
        log(f"resume: no checkpoint in {out}; starting fresh")
    elif ckpt_path is not None:
        raise FileExistsError(f"{out} holds a run already: pass --resume, or choose another --out")

    hella = E.read_hellaswag(cfg.eval_hellaswag) if cfg.eval_hellaswag else None  # fail early
    saved_tok = D.tokenizer_from_dict(ckpt["tokenizer"]) if ckpt else None
    corpus = D.load_corpus(cfg.data, cfg.tokenizer, cfg.val_fraction, saved_tok)
    log(f"data: {corpus.description}")
    vocab = corpus.tokenizer.vocab_size
    if overrides.get("vocab_size", vocab) < vocab:
        raise ValueError(f"--vocab_size {overrides['vocab_size']} < the tokenizer's {vocab}")
    overrides.setdefault("vocab_size", vocab)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw_model = models.create(cfg.model, cfg.preset, **overrides).to(device)
    if ckpt is not None and "model_state" in ckpt:  # before the optimizer: a model that
        raw_model.load_state_dict(ckpt["model_state"])  # grew must grow again first
    sharded = cfg.parallel == "fsdp" and world > 1
    if sharded:  # before the optimizer, which must see the shards
        if hasattr(raw_model, "maybe_grow"):
            raise ValueError(f"--parallel fsdp: {cfg.model} grows during training; use ddp")
        FS.shard(raw_model, _autocast_dtype(cfg.dtype, device), cfg.activation_checkpointing)
    mc = raw_model.config
    torch.manual_seed(cfg.seed + rank)  # dropout masks differ across ranks
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(
        f"model: {cfg.model}/{cfg.preset or 'default'}, {n_params / 1e6:.2f}M parameters, "
        f"block {mc.block_size}, vocab {mc.vocab_size}, device {device}, world {world}"
    )

    # One global order that each rank slices: the data does not depend on the world size.
    order = {"rank": rank, "world": world, "vocab_size": vocab}  # ids past it: an error
    train_batches = D.Batches(corpus.train, mc.block_size, cfg.batch_size, device, cfg.seed,
                              grad_accum=cfg.grad_accum, **order)
    val_batches = D.Batches(corpus.val or corpus.train, mc.block_size, cfg.batch_size, device,
                            cfg.seed, name="val split", stream=1, **order)

    optimizer = make_optimizer(raw_model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    amp_dtype = _autocast_dtype(cfg.dtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start = 0
    if ckpt is not None and ckpt_path.is_dir():
        FS.load_sharded(ckpt_path, raw_model, optimizer)  # resharded to this world size
    if ckpt is not None:
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["step"]
        ranks = ckpt["rank_states"]
        train_batches.seek(start)  # the global data order continues on any world size
        if len(ranks) == world:
            _set_rng_state(ranks[rank]["rng"])
        else:  # a different world size: fresh, distinct dropout streams
            log(f"resume: world size {len(ranks)} -> {world}; RNG streams re-seeded")

    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        if cfg.compile:
            m = torch.compile(m)
        if world > 1 and not sharded:
            m = torch.nn.parallel.DistributedDataParallel(
                m, device_ids=[device.index] if device.type == "cuda" else None
            )
        return m

    model = wrap(raw_model)

    def batch_kwargs(x: torch.Tensor, y: torch.Tensor) -> dict:
        if hasattr(raw_model, "prepare_batch"):
            return raw_model.prepare_batch(x, y)
        return {"idx": x, "targets": y}
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    )

    if master:
        out.mkdir(parents=True, exist_ok=True)
        D.save_tokenizer(corpus.tokenizer, out / "tokenizer.json")
    metrics = out / "metrics.jsonl"
    if master:
        _truncate_metrics(metrics, start)

    def evaluate() -> tuple[float, dict[str, float]]:
        """Validation loss and the model's own metrics, on the same batches every time."""
        model.eval()
        val_batches.seek(0)
        total = torch.zeros((), device=device)
        extra: dict[str, float] = {}
        devices = [device] if device.type == "cuda" else []
        # prepare_batch may draw from the global RNG: fork it so evaluating never changes
        # the training run (resume stays exact) and every eval sees the same masks.
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            for _ in range(cfg.eval_steps):
                kw = batch_kwargs(*val_batches.next())
                with autocast:
                    total += model(**kw)[1].float()
                    if hasattr(raw_model, "metrics"):
                        for k, v in raw_model.metrics(**kw).items():
                            extra[k] = extra.get(k, 0.0) + float(v) / cfg.eval_steps
        model.train()
        if world > 1:
            dist.all_reduce(total)
            for k in sorted(extra):
                t = torch.tensor(extra[k], device=device)
                dist.all_reduce(t)
                extra[k] = t.item() / world
        return total.item() / (cfg.eval_steps * world), extra

    def checkpoint(step: int) -> None:
        mine = {"rng": _rng_state(), "data": train_batches.state_dict()}
        ranks = [mine]
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        state = {
            "step": step, "model": cfg.model, "preset": cfg.preset,
            "model_overrides": overrides, "model_config": dataclasses.asdict(mc),
            "train_config": dataclasses.asdict(cfg), "tokenizer": corpus.tokenizer.to_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rank_states": ranks,  # RNG and data-sampler state of every rank
        }
        if sharded:  # every rank writes its shards
            FS.save_sharded(out, step, raw_model, optimizer, state if master else None,
                            cfg.keep_checkpoints)
        elif master:
            state.update(model_state=raw_model.state_dict(), optimizer=optimizer.state_dict())
            save_checkpoint(out, state, step, cfg.keep_checkpoints)

    def write(row: dict) -> None:
        if master:
            with open(metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    tokens_per_step = cfg.batch_size * mc.block_size * cfg.grad_accum * world
    peak = models.peak_flops(device)
    flops_per_token = raw_model.estimate_flops_per_token(mc.block_size) if peak else None
    save_every = cfg.save_interval or cfg.eval_interval
    losses, val_loss, val_metrics = [], None, {}
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.max_steps,
        initial=start,
        disable=not (master and show_progress),
        dynamic_ncols=True,
    )
    model.train()
    t0 = time.perf_counter()
    for step in range(start + 1, cfg.max_steps + 1):  # `step` = optimizer steps done after it
        if hasattr(raw_model, "maybe_grow") and raw_model.maybe_grow(step - 1):
            # New parameters: a new optimizer (and wrappers) over them, same schedule position.
            optimizer = make_optimizer(raw_model, cfg, device)
            for g in optimizer.param_groups:
                g.setdefault("initial_lr", g["lr"])
            # Constructing with last_epoch=step-2 steps once: lr = lr_factor(step - 1), as if
            # this optimizer had been stepped along from the start.
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_factor(s, cfg), last_epoch=step - 2
            )
            model = wrap(raw_model)
            n_params = sum(p.numel() for p in raw_model.parameters())
            log(f"step {step - 1}: model grew to {n_params / 1e6:.2f}M parameters")
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            kw = batch_kwargs(*train_batches.next())
            sync = micro == cfg.grad_accum - 1 or world == 1
            with FS.set_gradient_sync(model, sync), autocast:
                loss = model(**kw)[1]
            loss_sum += loss.detach().float()
            scaler.scale(loss / cfg.grad_accum).backward()
        if world > 1:
            dist.all_reduce(loss_sum)  # every rank sees the same loss and stops together
        loss_val = loss_sum.item() / (cfg.grad_accum * world)
        if not math.isfinite(loss_val):
            bar.close()
            last = latest_checkpoint(out)
            raise TrainingDiverged(
                f"loss is {loss_val} at step {step}; stopping. Try a lower --lr or --grad_clip"
                + (f"; the last good checkpoint is {last}" if last else "")
            )
        trainable = [p for p in raw_model.parameters() if p.requires_grad]
        if cfg.grad_clip > 0 and trainable:  # a counting model has nothing to clip
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss_val)

        dt = time.perf_counter() - t0
        tok_s = tokens_per_step / dt
        mfu = tok_s / world * flops_per_token / peak if peak else None
        bar.update(1)
        if step % cfg.log_interval == 0 or step in (start + 1, cfg.max_steps):
            lr = scheduler.get_last_lr()[0]
            write({"step": step, "loss": loss_val, "lr": lr, "tokens_per_s": round(tok_s, 1),
                   "mfu": mfu})
            post = {"loss": f"{loss_val:.4f}", "tok/s": f"{tok_s:,.0f}"}
            if mfu is not None:
                post["mfu"] = f"{100 * mfu:.1f}%"
            bar.set_postfix(post, refresh=False)
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val_loss, val_metrics = evaluate()
            write({"step": step, "val_loss": val_loss, **val_metrics})
            if master:
                shown = "".join(f", {k} {v:.4f}" for k, v in val_metrics.items())
                bar.write(
                    f"step {step}: train loss {loss_val:.4f}, val loss {val_loss:.4f}{shown}"
                )
        every = cfg.eval_hellaswag_every or cfg.eval_interval
        if hella and (step % every == 0 or step == cfg.max_steps) and (master or sharded):
            hs = E.hellaswag(raw_model, corpus.tokenizer, hella, cfg.batch_size, device)
            write({"step": step, "hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"]})
            if master:
                bar.write(f"step {step}: hellaswag acc {hs['acc']:.4f}, "
                          f"acc_norm {hs['acc_norm']:.4f} ({hs['n']} examples)")
        if step % save_every == 0 or step == cfg.max_steps:
            checkpoint(step)
            if master:
                plot_metrics(metrics, out / "loss.png")
        t0 = time.perf_counter()  # eval and saving do not count against tokens/s
    bar.close()

    text = ""
    if (master or sharded) and cfg.sample_tokens > 0:  # a sharded model: every rank samples
        try:
            text = _sample(raw_model, corpus.tokenizer, cfg, device, autocast)
        except D.DataError as e:  # e.g. GPT-2 BPE files unavailable offline: the run stands
            log(f"sample skipped: {e}")
        if master and text:
            (out / "sample.txt").write_text(text, encoding="utf-8")
            log(f"sample ({cfg.sample_tokens} tokens):\n{text}")
    if world > 1:
        dist.barrier()
    return {"losses": losses, "val_loss": val_loss, "val_metrics": val_metrics, "sample": text,
            "model": raw_model}


def _check_resume(ckpt: dict, cfg: TrainConfig, overrides: dict, given: set[str]) -> None:
    """The model of a resumed run is the checkpoint's; a conflicting flag is an error."""
    clash = [f"--model {cfg.model}"] if "model" in given and cfg.model != ckpt["model"] else []
    if "preset" in given and cfg.preset != ckpt["preset"]:
        clash.append(f"--preset {cfg.preset}")
    clash += [f"--{k} {v}" for k, v in overrides.items() if ckpt["model_overrides"].get(k) != v]
    if clash:
        raise ValueError(
            f"cannot resume with a different model: {', '.join(clash)} differs "
            f"from the checkpoint's {ckpt['model']}/{ckpt['preset']}"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after ``step`` (written after the checkpoint a resume continues from)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


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
