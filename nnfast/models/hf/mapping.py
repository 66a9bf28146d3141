"""Name mapping between a Hugging Face state dict and an nnfast one, both directions, from
one table per architecture (``families.py``).

An ``Entry`` says that our tensor ``ours`` is Hugging Face's tensors ``theirs`` concatenated
along dim 0 (several when nnfast fuses projections: q|k|v -> ``qkv``, gate|up -> ``gate_up``),
transposed when Hugging Face stores a ``Conv1D`` (GPT-2's ``(in, out)`` weights). ``sizes``
are the rows each of ``theirs`` has, to split ours again on export.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch


class Entry(NamedTuple):
    ours: str
    theirs: tuple[str, ...]
    sizes: tuple[int, ...] | None = None  # rows of each of `theirs` (None: one tensor)
    transpose: bool = False


def layer_entries(template: list[tuple], n: int, **fmt) -> list[Entry]:
    """``template`` rows ``(ours, theirs, sizes, transpose)`` with ``{i}`` -> 0 .. n-1."""
    out = []
    for i in range(n):
        for ours, theirs, *rest in template:
            out.append(Entry(ours.format(i=i, **fmt), tuple(t.format(i=i, **fmt) for t in theirs),
                             *rest))
    return out


def to_ours(entries: list[Entry], hf: dict[str, torch.Tensor], expected: dict[str, torch.Size],
            file, aliases: dict[str, str], ignore: re.Pattern | None) -> dict[str, torch.Tensor]:
    """nnfast state dict from Hugging Face tensors. ``expected``: our shapes; ``aliases``:
    Hugging Face names that must hold the same values as another (tied copies); ``ignore``:
    names that carry nothing the model computes with (mask buffers). Every other name must
    be used: a missing, extra or misshapen tensor is a ValueError naming it and ``file``."""
    used, out = set(), {}
    for e in entries:
        missing = [t for t in e.theirs if t not in hf]
        if missing:
            raise ValueError(f"{file}: missing weight {missing[0]!r} (for nnfast's {e.ours})")
        parts = [hf[t] for t in e.theirs]
        if e.sizes is not None:
            for t, p, rows in zip(e.theirs, parts, e.sizes):
                if p.shape[1 if e.transpose else 0] != rows:
                    raise ValueError(f"{file}: {t!r} has shape {tuple(p.shape)}, expected "
                                     f"{rows} {'columns' if e.transpose else 'rows'}")
        t = torch.cat([p.t() if e.transpose else p for p in parts]) if len(parts) > 1 else (
            parts[0].t() if e.transpose else parts[0])
        want = expected[e.ours]
        if tuple(t.shape) != tuple(want):
            names = " + ".join(repr(n) for n in e.theirs)
            raise ValueError(f"{file}: {names} gives shape {tuple(t.shape)} but the config "
                             f"implies {tuple(want)} for {e.ours}")
        out[e.ours] = t.contiguous()
        used.update(e.theirs)
    for alias, target in aliases.items():
        if alias in hf:
            if target in hf and not torch.equal(hf[alias], hf[target]):
                raise ValueError(f"{file}: {alias!r} differs from {target!r}, which nnfast "
                                 "ties it to")
            used.add(alias)
    extra = sorted(k for k in hf if k not in used and not (ignore and ignore.search(k)))
    if extra:
        raise ValueError(f"{file}: unexpected weight {extra[0]!r}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return out


def to_theirs(entries: list[Entry], ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face state dict from an nnfast one (the inverse of ``to_ours``)."""
    out = {}
    for e in entries:
        t = ours[e.ours].detach()
        parts = t.split(list(e.sizes)) if e.sizes else (t,)  # ours rows = their pieces'
        for name, p in zip(e.theirs, parts):
            out[name] = (p.t() if e.transpose else p).contiguous()
    return out
