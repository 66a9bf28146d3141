"""A run folder's files on disk: checkpoints, the ``latest`` pointer, and ``metrics.jsonl``.

Checkpoints are written to a temporary file and renamed, and ``latest`` moves only after that
rename, so a crash mid-save never loses a run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


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
    return path if path.is_file() else None


def load_checkpoint(path: Path) -> dict:
    # Our own file, holding numpy RNG state: not loadable with weights_only=True.
    return torch.load(path, map_location="cpu", weights_only=False)


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after ``step`` (written after the checkpoint a resume continues from)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
