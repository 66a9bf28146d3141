"""The trainer under faults: NaN weights after a finite loss, flags given on resume, two
trainers on one folder, SIGKILL, a missing or corrupt ``latest``, a torn ``metrics.jsonl``,
a full disk, and every bad config value (one line, exit 2, before any work).

Same tiny runs as tests/test_train.py (one-layer GPT-2 ``debug``, PyTorch path).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nnfast.__main__ as cli
from nnfast import train as T
from tests import test_train as base
from tests.test_train import ROOT, assert_same_weights, base_args, rows, run

corpus, torch_backend = base.corpus, base.torch_backend  # fixtures


def ckpt_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("ckpt_*.pt"))


def finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def one_line_error(capsys, text: str) -> str:
    """The one ``error:`` line (after any progress bar), and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]) and "Traceback" not in err, err
    assert text in lines[0], err
    return lines[0]


# ----------------------------------------------------------------------------- NaN state
@pytest.mark.parametrize("where,value", [("weight", "nan"), ("optimizer", "nan"),
                                         ("weight", "-inf")])
def test_nonfinite_state_is_never_saved(where, value, corpus, tmp_path, torch_backend, monkeypatch,
                                        capsys):
    """Step 2's loss is finite but its update leaves a NaN (injected here, as a huge lr
    does): ckpt 2 must not be written, latest stays at the finite ckpt 1, and rotation
    (--keep_checkpoints 1) keeps it."""
    real_step = T.Trainer.train_step

    def poisoned(self, step):
        loss = real_step(self, step)
        if step == 2:
            p = self.raw_model.lm_head.weight if hasattr(self.raw_model, "lm_head") else next(
                self.raw_model.parameters())
            target = p if where == "weight" else self.optimizer.state[p]["exp_avg_sq"]
            with torch.no_grad():
                target.view(-1)[0] = float(value)
        return loss

    monkeypatch.setattr(T.Trainer, "train_step", poisoned)
    out = tmp_path / "run"
    argv = base_args(corpus, out, save_interval=1, keep_checkpoints=1, sample_tokens=0)
    assert cli.main(["train", *argv]) == 1
    err = one_line_error(capsys, "not finite after step 2")
    assert f"the last good checkpoint is {out / 'ckpt_0000001.pt'}" in err
    assert ("optimizer's exp_avg_sq" in err) == (where == "optimizer")
    assert ckpt_names(out) == ["ckpt_0000001.pt"]
    assert (out / "latest").read_text().strip() == "ckpt_0000001.pt"
    assert finite(T.load_checkpoint(out / "ckpt_0000001.pt")["model_state"])
    assert not list(out.glob("*.tmp")) and not (out / "run.lock").exists()


# ----------------------------------------------------------------------------- resume flags
def test_resume_applies_given_flags(corpus, tmp_path, torch_backend, capsys):
    out = tmp_path / "run"
    run(base_args(corpus, out, max_steps=3, sample_tokens=0))
    capsys.readouterr()
    new = dict(lr=0.01, weight_decay=0.2, beta1=0.8, beta2=0.9, adam_eps=1e-6, grad_clip=0.5,
               max_steps=8)
    run(["--out", str(out), *[x for k, v in new.items() for x in (f"--{k}", str(v))]],
        resume=True)
    printed = capsys.readouterr().out
    assert "resume: applying --adam_eps 1e-06 (was 1e-08), --beta1 0.8 (was 0.9)" in printed
    assert "--lr 0.01 (was 0.003)" in printed and "--max_steps 8 (was 3)" in printed
    assert "learning-rate schedule recomputed" in printed and "ending at step 8 (was 3)" in printed
    ckpt = T.load_checkpoint(out / "ckpt_0000008.pt")
    cfg = T.TrainConfig(**ckpt["train_config"])
    for k, v in new.items():
        assert getattr(cfg, k) == v, k
    decay, no_decay = ckpt["optimizer"]["param_groups"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0)
    assert decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-6
    assert decay["initial_lr"] == 0.01
    # The schedule of the new max_steps from the first resumed step (rows log lr after it).
    lrs = {r["step"]: r["lr"] for r in rows(out) if "lr" in r}
    for step in (4, 8):
        assert lrs[step] == pytest.approx(0.01 * T.lr_factor(step, cfg), rel=1e-12)


@pytest.mark.parametrize("flag,value,message", [
    ("tokenizer", "byte", "cannot resume with --tokenizer byte"),
    ("seed", "5", "cannot resume with --seed 5"),
    ("preset", "gpt2-124m", "cannot resume with a different model: --preset gpt2-124m"),
    ("block_size", "32", "cannot resume with a different model: --block_size 32"),
    ("max_steps", "2", "--max_steps 2 is below the checkpoint's step 3"),
])
def test_resume_refuses_what_it_cannot_apply(flag, value, message, corpus, tmp_path,
                                             torch_backend, capsys):
    out = tmp_path / "run"
    run(base_args(corpus, out, max_steps=3, sample_tokens=0))
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), f"--{flag}", value, "--resume"]) == 2
    one_line_error(capsys, message)
    assert ckpt_names(out) == ["ckpt_0000003.pt"] and not (out / "run.lock").exists()


# ----------------------------------------------------------------------------- one run per folder
def _trainer_process(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, NNFAST_BACKEND="torch", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "nnfast", "train", *argv], env=env,
                                stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"trainer exited early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()}"
        time.sleep(0.05)


def test_two_trainers_then_sigkill_and_resume(corpus, tmp_path, torch_backend, capsys):
    """A second trainer on a busy folder fails at once naming the holder; after SIGKILL
    (possibly mid-save) the stale lock is taken over and the resumed run equals an
    uninterrupted one bit for bit."""
    out = tmp_path / "run"
    common = dict(lr_decay_steps=1000, save_interval=2, log_interval=1, sample_tokens=0)
    proc = _trainer_process(base_args(corpus, out, max_steps=100_000, **common),
                            tmp_path / "a.log")
    try:
        _wait_for(lambda: len(ckpt_names(out)) >= 2, proc, tmp_path / "a.log")
        t0 = time.monotonic()
        assert cli.main(["train", *base_args(corpus, out, max_steps=4, **common),
                         "--resume"]) == 1
        assert time.monotonic() - t0 < 10  # before loading data or building a model
        one_line_error(capsys, f"{out} is in use by another trainer (pid {proc.pid} on host")
        assert "data:" not in capsys.readouterr().out
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    step = T.load_checkpoint(T.latest_checkpoint(out))["step"]
    target = step + 2
    resumed = run(base_args(corpus, out, max_steps=target, **common), resume=True)
    printed = capsys.readouterr().out
    assert f"taking over the stale lock {out / 'run.lock'} of pid {proc.pid}" in printed
    full = run(base_args(corpus, tmp_path / "full", max_steps=target, **common))
    assert resumed["losses"] == full["losses"][step:]
    assert_same_weights(resumed["model"], full["model"])
    assert [r["step"] for r in rows(out) if "loss" in r] == list(range(1, target + 1))
    assert not (out / "run.lock").exists() and not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------- history
def test_missing_or_corrupt_latest_falls_back(corpus, tmp_path, torch_backend, capsys):
    out = tmp_path / "run"
    common = dict(save_interval=2, keep_checkpoints=3, sample_tokens=0)
    full = run(base_args(corpus, out, max_steps=6, **common))
    assert ckpt_names(out) == ["ckpt_0000002.pt", "ckpt_0000004.pt", "ckpt_0000006.pt"]
    (out / "ckpt_0000006.pt").unlink()  # latest names a missing file
    # Without --resume the folder still holds a run: nothing is overwritten.
    assert cli.main(["train", *base_args(corpus, out, max_steps=6, **common)]) == 1
    one_line_error(capsys, "holds a run already")
    assert ckpt_names(out) == ["ckpt_0000002.pt", "ckpt_0000004.pt"]
    # A torn newest checkpoint and a corrupt pointer: the newest loadable one is used.
    data = (out / "ckpt_0000004.pt").read_bytes()
    (out / "ckpt_0000004.pt").write_bytes(data[: len(data) // 2])
    (out / "latest").write_bytes(b"\x00\xffgarbage")
    res = run(base_args(corpus, out, max_steps=6, **common), resume=True)
    printed = capsys.readouterr().out
    assert "is corrupt; ckpt_0000004.pt is unreadable" in printed
    assert "resuming from ckpt_0000002.pt instead" in printed
    assert res["losses"] == full["losses"][2:]
    assert_same_weights(res["model"], full["model"])


def test_no_loadable_checkpoint_needs_overwrite(corpus, tmp_path, torch_backend, capsys):
    out = tmp_path / "run"
    run(base_args(corpus, out, max_steps=2, sample_tokens=0))
    (out / "ckpt_0000002.pt").write_bytes(b"not a checkpoint")
    history = (out / "metrics.jsonl").read_text()
    assert cli.main(["train", *base_args(corpus, out, max_steps=2), "--resume"]) == 1
    one_line_error(capsys, "no loadable checkpoint in")
    assert (out / "metrics.jsonl").read_text() == history
    (out / "ckpt_0000002.pt").unlink()
    (out / "latest").unlink()  # only metrics.jsonl left: still a run's history
    assert cli.main(["train", *base_args(corpus, out, max_steps=2), "--resume"]) == 1
    one_line_error(capsys, "holds no checkpoint to resume from, but a run's files")
    assert cli.main(["train", *base_args(corpus, out, max_steps=2), "--resume",
                     "--overwrite"]) == 2
    one_line_error(capsys, "pass one of them")
    assert (out / "metrics.jsonl").read_text() == history
    assert cli.main(["train", *base_args(corpus, out, max_steps=1, sample_tokens=0),
                     "--overwrite"]) == 0
    assert "overwrite: deleted the previous run's" in capsys.readouterr().out
    assert [r["step"] for r in rows(out) if "loss" in r or "val_loss" in r] == [1, 1]  # new run
    assert ckpt_names(out) == ["ckpt_0000001.pt"]


def test_torn_metrics_line_is_dropped(corpus, tmp_path, torch_backend, capsys):
    out = tmp_path / "run"
    run(base_args(corpus, out, max_steps=3, sample_tokens=0))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 3.1')  # the run died mid-write
    capsys.readouterr()
    run(base_args(corpus, out, max_steps=5, sample_tokens=0), resume=True)
    assert "dropped the torn last line" in capsys.readouterr().out
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4, 5]
    (out / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    assert cli.main(["train", *base_args(corpus, out, max_steps=6), "--resume"]) == 1
    one_line_error(capsys, "line 2, is not JSON")


# ----------------------------------------------------------------------------- disk
def test_full_disk_is_one_line_and_leaves_no_tmp(corpus, tmp_path, torch_backend, monkeypatch,
                                                 capsys):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert cli.main(["train", *base_args(corpus, out, max_steps=4, save_interval=2)]) == 1
    one_line_error(capsys, "could not write the checkpoint")
    assert ckpt_names(out) == ["ckpt_0000002.pt"] and not list(out.glob("*.tmp"))
    assert not (out / "run.lock").exists()


def test_full_disk_while_logging_is_one_line(corpus, tmp_path, torch_backend, monkeypatch,
                                             capsys):
    def full_disk(path, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(T, "append_metrics", full_disk)
    out = tmp_path / "run"
    assert cli.main(["train", *base_args(corpus, out)]) == 1
    one_line_error(capsys, "No space left on device")
    assert not (out / "run.lock").exists()


def test_unwritable_out_is_a_usage_error(corpus, tmp_path, torch_backend, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["train", *base_args(corpus, blocker / "run")]) == 2
    one_line_error(capsys, f"cannot write to --out {blocker / 'run'}")


# ----------------------------------------------------------------------------- validation
BAD = [
    ("temperature", "-1", "--temperature must be > 0, got -1.0"),
    ("top_k", "0", "--top_k must be >= 1 (or none), got 0"),
    ("top_p", "2", "--top_p must be in (0, 1] (or none), got 2.0"),
    ("weight_decay", "-1", "--weight_decay must be >= 0, got -1.0"),
    ("grad_clip", "-1", "--grad_clip must be >= 0, got -1.0"),
    ("lr", "0", "--lr must be > 0, got 0.0"),
    ("lr", "1e38", "--lr must be small enough that AdamW's step lr / (1 - beta1) = 1e+39"),
    ("lr", "nan", "--lr must be a finite number, got nan"),
    ("lr", "inf", "--lr must be a finite number, got inf"),
    ("beta1", "1", "--beta1 must be in [0, 1), got 1.0"),
    ("beta2", "-0.1", "--beta2 must be in [0, 1), got -0.1"),
    ("adam_eps", "0", "--adam_eps must be > 0, got 0.0"),
    ("min_lr_ratio", "2", "--min_lr_ratio must be in [0, 1], got 2.0"),
    ("seed", "-1", "--seed must be in [0, 2**32), got -1"),
    ("seed", str(2**32), "--seed must be in [0, 2**32), got 4294967296"),
    ("device", "cuda:x", "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ("device", "tpu", "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
]
if not torch.cuda.is_available():
    BAD.append(("device", "cuda", "--device cuda but no CUDA GPU is available"))


@pytest.mark.parametrize("flag,value,message", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_values_fail_before_any_work(flag, value, message, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *base_args(corpus, out, **{flag: value})]) == 2
    one_line_error(capsys, message)
    assert "data:" not in capsys.readouterr().out and not out.exists()


def test_bad_values_in_python_too():
    with pytest.raises(T.UsageError, match="--lr expects float, got '0.1'"):
        T.TrainConfig(lr="0.1")
    with pytest.raises(T.UsageError, match="--max_steps expects int, got True"):
        T.TrainConfig(max_steps=True)


def test_vocab_errors_are_one_line(corpus, tmp_path, torch_backend, capsys):
    assert cli.main(["train", *base_args(corpus, tmp_path / "a", vocab_size=8)]) == 2
    one_line_error(capsys, "--vocab_size 8 < the tokenizer's")
    shard = tmp_path / "tokens.bin"
    np.array([1, 2, 3, 60000, 5] * 200, dtype=np.uint16).tofile(shard)
    argv = base_args(shard, tmp_path / "b", sample_tokens=0)
    assert cli.main(["train", *argv]) == 1
    one_line_error(capsys, f"{shard} holds token id 60000 at position 3, past the vocabulary "
                   "(ids 0..50256)")
