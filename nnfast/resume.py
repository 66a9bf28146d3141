"""Resuming a run with flags: each one the checkpoint can take is applied (and printed), and
each one it cannot (a different model, preset, tokenizer, seed, or a max_steps already
passed) is refused with a one-line error naming it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nnfast.train import TrainConfig


class UsageError(ValueError):
    """A flag the user can fix: printed as one line, exit status 2."""


def check_resume(ckpt: dict, cfg: TrainConfig, overrides: dict, given: set[str]) -> None:
    """The model, tokenizer and random streams of a resumed run are the checkpoint's: a flag
    that would change them is an error naming it."""
    clash = [f"--model {cfg.model}"] if "model" in given and cfg.model != ckpt["model"] else []
    if "preset" in given and cfg.preset != ckpt["preset"]:
        clash.append(f"--preset {cfg.preset}")
    clash += [f"--{k} {v}" for k, v in overrides.items() if ckpt["model_overrides"].get(k) != v]
    if clash:
        raise UsageError(
            f"cannot resume with a different model: {', '.join(clash)} differs "
            f"from the checkpoint's {ckpt['model']}/{ckpt['preset']}"
        )
    kind = ckpt["tokenizer"]["kind"]
    if "tokenizer" in given and cfg.tokenizer not in ("auto", kind):
        raise UsageError(f"cannot resume with --tokenizer {cfg.tokenizer}: the checkpoint's "
                         f"token ids are {kind} tokens")
    seed = ckpt["train_config"].get("seed")
    if "seed" in given and cfg.seed != seed:
        raise UsageError(f"cannot resume with --seed {cfg.seed}: a resumed run continues the "
                         f"checkpoint's random streams (seed {seed})")


SCHEDULE_FIELDS = ("lr", "max_steps", "warmup_steps", "lr_decay_steps", "min_lr_ratio")


def resumed_config(ckpt: dict, cfg: TrainConfig, overrides: dict, given: set[str] | None,
                   log: Callable, lr_factor: Callable) -> TrainConfig:
    """The checkpoint's trainer config with every flag given now applied (each change
    printed), or a UsageError naming a flag that cannot change."""
    check_resume(ckpt, cfg, overrides, given or set())
    names = {f.name for f in dataclasses.fields(cfg)}
    saved = {k: v for k, v in ckpt["train_config"].items() if k in names}
    saved.update(model=ckpt["model"], preset=ckpt["preset"])
    given = names - {"model", "preset"} if given is None else set(given)
    keep = given | {"out", "overwrite"}  # out: where it was found
    new = dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k not in keep})
    step = ckpt["step"]
    if new.max_steps < step:
        raise UsageError(f"--max_steps {new.max_steps} is below the checkpoint's step {step}: "
                         f"pass --max_steps above {step} to train further")
    changed = sorted(k for k in given & saved.keys() - {"out", "overwrite", "tokenizer"}
                     if saved[k] != getattr(new, k))
    if changed:
        log("resume: applying " + ", ".join(f"--{k} {getattr(new, k)} (was {saved[k]})"
                                            for k in changed))
    if set(changed) & set(SCHEDULE_FIELDS):
        old = dataclasses.replace(new, **{k: saved[k] for k in SCHEDULE_FIELDS if k in saved})
        now, was = new.lr * lr_factor(step, new), old.lr * lr_factor(step, old)
        log(f"resume: learning-rate schedule recomputed: lr {now:.4g} at step {step + 1} "
            f"(was {was:.4g}), cosine ending at step {new.lr_decay_steps or new.max_steps} "
            f"(was {old.lr_decay_steps or old.max_steps})")
    if new.max_steps == step:
        log(f"resume: the run is complete at step {step}; pass --max_steps above {step} to "
            "train further")
    return new


def apply_hyperparameters(optimizer, scheduler, fresh: list[dict], factor: float) -> None:
    """A loaded optimizer state carries the hyperparameters it was saved with: put back this
    run's (``fresh``: the groups built from this run's config) and the lr its schedule gives
    at the scheduler's step (``factor``: that lr over the base lr)."""
    for g, f in zip(optimizer.param_groups, fresh):
        for k in ("weight_decay", "betas", "eps", "initial_lr"):
            g[k] = f[k]
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
        g["lr"] = base * factor  # what LambdaLR computes, bit for bit
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
