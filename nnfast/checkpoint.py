"""A run folder's files on disk: checkpoints, the ``latest`` pointer, ``metrics.jsonl`` and
the lock that keeps one trainer per folder.

Every write is atomic (a temporary file, fsync, rename, fsync of the folder): a crash or a
full disk leaves the old file or the new one, never half of one, and no ``.tmp`` behind.
``latest`` moves only after its checkpoint is in place, and rotation never deletes the
checkpoint it names.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock is then advisory (pid file only)
    fcntl = None

CKPT_RE = re.compile(r"ckpt_(\d+)\.(pt|dcp)")  # .dcp: a sharded (FSDP) checkpoint folder
SHARDED_META = "trainer.pt"  # the trainer's state inside a .dcp folder
LOCK_NAME = "run.lock"
METRICS_NAME = "metrics.jsonl"
RUN_FILES = ("latest", METRICS_NAME, "loss.png", "sample.txt", "tokenizer.json")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (in use, unwritable, holds no loadable run)."""


def _quiet(*args, **kwargs) -> None:
    pass


# ----------------------------------------------------------------------------- atomic writes
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)``, then fsync and rename ``tmp`` to ``path``; ``tmp`` never outlives it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, path)  # atomic on POSIX: the name holds the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the rename itself survives a power loss
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_step(path: Path) -> int | None:
    m = CKPT_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


def is_checkpoint(path: Path) -> bool:
    """A ``ckpt_*.pt`` file, or a complete ``ckpt_*.dcp`` folder."""
    if checkpoint_step(path) is None:
        return False
    return (path / SHARDED_META).is_file() if path.suffix == ".dcp" else path.is_file()


def remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def checkpoints(out: Path) -> list[Path]:
    """Checkpoints in ``out`` (``ckpt_*.pt`` and ``ckpt_*.dcp``), oldest step first."""
    found = [p for p in out.glob("ckpt_*") if is_checkpoint(p)]
    return sorted(found, key=checkpoint_step)


def rotate_checkpoints(out: Path, path: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step``, ``path`` (the newest) included."""
    older = [p for p in checkpoints(out) if checkpoint_step(p) <= step and p != path]
    for old in older[: max(0, len(older) - max(1, keep) + 1)]:
        remove_checkpoint(old)


def save_checkpoint(out: Path, state: dict, step: int, keep: int) -> Path:
    """Write ``ckpt_<step>.pt`` atomically, point ``latest`` at it, and keep the newest
    ``keep`` checkpoints up to ``step`` (later ones, left by a run this one resumed from an
    earlier point, are overwritten as it gets there)."""
    path = out / f"ckpt_{step:07d}.pt"
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        write_text_atomic(out / "latest", path.name + "\n")
    except OSError as e:
        last = latest_checkpoint(out)
        raise RunFolderError(
            f"could not write the checkpoint {path}: {e.strerror or e}"
            + (f"; {last} is still the last checkpoint" if last else "")
        ) from e
    rotate_checkpoints(out, path, step, keep)
    return path


def latest_checkpoint(out: Path) -> Path | None:
    """The file ``latest`` names, else the newest ``ckpt_*.pt`` (no loading: see
    ``find_checkpoint``)."""
    ptr = out / "latest"
    if ptr.is_file():
        path = out / ptr.read_text().strip()
        if is_checkpoint(path):
            return path
    found = checkpoints(out) if out.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    """The trainer's state; of a sharded checkpoint without the weights and optimizer state
    (``nnfast.distributed.load_sharded`` reads those into a model)."""
    if path.is_dir():
        if not (path / SHARDED_META).is_file():
            raise FileNotFoundError(f"{path}: not a complete sharded checkpoint "
                                    f"(no {SHARDED_META})")
        path = path / SHARDED_META
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Our own file from before RNG states were tensors (numpy objects in it): load it as
        # that version did, so older runs still resume.
        return torch.load(path, map_location="cpu", weights_only=False)


def find_checkpoint(out: Path, log: Callable = _quiet) -> tuple[Path, dict] | None:
    """The checkpoint a resume continues from: the one ``latest`` names, or, when that is
    missing or unreadable, the newest loadable ``ckpt_*.pt`` (with a note)."""
    ptr, named = out / "latest", None
    if ptr.is_file():
        named = out / ptr.read_text(errors="replace").strip()
    candidates = [named] if named is not None and CKPT_RE.fullmatch(named.name) else []
    candidates += [p for p in reversed(checkpoints(out)) if p not in candidates]
    problems = []
    if named is None and candidates:
        problems.append(f"{ptr} is missing")
    elif named is not None and not CKPT_RE.fullmatch(named.name):
        problems.append(f"{ptr} is corrupt")
    for path in candidates:
        try:
            state = load_checkpoint(path)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not an nnfast checkpoint")
        except Exception as e:  # torn, truncated or foreign file: try the next one
            problems.append(f"{path.name} is unreadable ({type(e).__name__})"
                            if path.exists() else f"{path.name} is missing")
            continue
        if problems:
            log(f"note: {'; '.join(problems)}; resuming from {path.name} instead")
        return path, state
    if problems:
        raise RunFolderError(
            f"no loadable checkpoint in {out} ({'; '.join(problems)}); pass --overwrite to "
            "start afresh there, or choose another --out"
        )
    return None


def run_files(out: Path) -> list[Path]:
    """The files of a previous run in ``out`` (a folder holding any of them holds a run)."""
    if not out.is_dir():
        return []
    found = checkpoints(out) + [out / n for n in RUN_FILES if (out / n).is_file()]
    return [p for p in found if p.name != "tokenizer.json" or len(found) > 1]


# ----------------------------------------------------------------------------- metrics
def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _parse_metrics(path: Path) -> tuple[list[str], list[dict], bool]:
    """(lines, rows, torn): a last line cut off mid-write (a crash) is left out and flagged;
    an unreadable line before it is an error, since that is not a crash's doing."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return lines[:-1], rows, True
            raise RunFolderError(f"{path}, line {i + 1}, is not JSON: {line[:60]!r}") from None
    return lines, rows, False


def read_metrics(path: Path) -> list[dict]:
    return _parse_metrics(path)[1]


def truncate_metrics(path: Path, step: int, log: Callable = _quiet) -> None:
    """Drop rows after ``step`` (written after the checkpoint a resume continues from) and a
    torn last line (with a note)."""
    if not path.is_file():
        return
    lines, rows, torn = _parse_metrics(path)
    if torn:
        log(f"note: dropped the torn last line of {path} (the run stopped while writing it)")
    keep = [line for line, row in zip(lines, rows) if row["step"] <= step]
    if torn or len(keep) < len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- lock
class RunLock:
    """``out/run.lock``: one trainer per run folder. The holder keeps an exclusive ``flock``
    on it (the kernel drops it when the process dies, however it dies) and writes its pid
    and host into it for the message a second trainer prints."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME
        self.fd: int | None = None

    def acquire(self, log: Callable = _quiet) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunFolderError(
                    f"{self.path.parent} is in use by another trainer ({holder}); wait for it "
                    f"to finish or choose another --out"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have deleted the file between our open and flock:
            # then we locked an orphan; try again on the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        previous = _read_holder(fd)
        if previous:
            log(f"note: taking over the stale lock {self.path} of {previous}: "
                "that process is gone")
        mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, mine.encode() + b"\n", 0)
        os.fsync(fd)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # before unlocking: a waiter then retries on a new file
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return ""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"lock text {text[:60]!r}"
