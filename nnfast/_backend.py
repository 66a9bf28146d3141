"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

The contract (tests and users rely on it):

* CUDA tensors run the Triton kernels.
* CPU tensors run the PyTorch reference, unless ``TRITON_INTERPRET=1`` was set
  before the kernels were imported: then the Triton kernels run on the CPU
  through Triton's interpreter (this is how CI tests every kernel).
* ``NNFAST_BACKEND=torch`` forces the reference everywhere; ``NNFAST_BACKEND=triton``
  forces the kernels and raises where that is impossible. Default ``auto``.

Per call, ``use_triton`` costs one environment lookup (``NNFAST_BACKEND``, so that tests
and users can flip it at any time) and a comparison: the parsed choice and the per-device
answers are cached until that value changes. ``TRITON_INTERPRET`` is read when a CPU
decision is made (first call, or after ``NNFAST_BACKEND`` changed): it only matters
before ``triton.jit`` decorates the kernels (which happens when the first kernel runs),
so it must be set before the first nnfast op runs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton")


# Found once at import (without importing triton) so torch.compile traces a constant.
HAS_TRITON = importlib.util.find_spec("triton") is not None


def has_triton() -> bool:
    """True where the ``triton`` package can be imported (Linux)."""
    return HAS_TRITON


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _parse(raw: str | None) -> str:
    value = (raw or "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"NNFAST_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def backend() -> str:
    return _parse(os.environ.get("NNFAST_BACKEND"))


def triton_available_for(device: torch.device) -> tuple[bool, str]:
    """Whether a Triton kernel can run on ``device``, and if not, why."""
    if not has_triton():
        return False, "the triton package is not installed"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu":
        if interpreting():
            return True, ""
        return (
            False,
            "CPU tensors need TRITON_INTERPRET=1 (set before nnfast's kernels are imported)",
        )
    return False, f"no Triton backend for device type {device.type!r}"


def _decide(choice: str, device: torch.device) -> bool:
    if choice == "torch":
        return False
    ok, why = triton_available_for(device)
    if choice == "triton" and not ok:
        raise RuntimeError(f"NNFAST_BACKEND=triton but the Triton kernels cannot run here: {why}")
    return ok


class _Cache:
    """The last ``NNFAST_BACKEND`` value seen, its parsed choice, and the decision per
    device type under it. ``raw`` starts as a sentinel no environment value equals."""

    raw: object = object()
    choice: str = "auto"
    by_type: dict = {}


# os.environ.get encodes the key and decodes the value on every call; the mapping it wraps
# (kept current by every os.environ assignment, monkeypatch.setenv included) answers in a
# fraction of that, and the raw value is decoded only when it changed. ``os.environ.get``
# where that CPython detail is missing, and under torch.compile.
_ENV = getattr(os.environ, "_data", None)
_KEY = os.environ.encodekey("NNFAST_BACKEND") if hasattr(os.environ, "encodekey") else None


def _raw_backend():
    if _ENV is None or _KEY is None or torch.compiler.is_compiling():
        return os.environ.get("NNFAST_BACKEND")
    return _ENV.get(_KEY)


def use_triton(tensor: torch.Tensor) -> bool:
    """Decide the path for an op whose inputs live on ``tensor.device``."""
    raw = _raw_backend()
    # Identity, not ==: torch.compile cannot compare a str with the sentinel object (a
    # model compiled before any eager call would break its graph here); a new value
    # object is re-parsed, which an unchanged environment never produces outside compile.
    if raw is not _Cache.raw:
        value = os.environ.decodevalue(raw) if isinstance(raw, bytes) else raw
        _Cache.choice = _parse(value)  # a bad value raises on every call until it is fixed
        _Cache.by_type = {}
        _Cache.raw = raw
    kind = "cuda" if tensor.is_cuda else "cpu" if tensor.is_cpu else tensor.device.type
    ok = _Cache.by_type.get(kind)
    if ok is None:  # an impossible forced choice raises here, uncached, on every call
        ok = _Cache.by_type[kind] = _decide(_Cache.choice, tensor.device)
    return ok


class _CpuCache:
    """The ``NNFAST_BACKEND`` object last seen by ``cpu_reference`` and whether CPU tensors
    take the reference under it. ``raw`` starts as a sentinel no environment value is."""

    raw: object = object()
    reference: bool = False


_CPU = torch.empty(0)
_FAST_ENV = _ENV is not None and _KEY is not None


def cpu_reference(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a CPU tensor that takes the reference path now: the question
    of nnfast.functional's fast paths, asked on every call. While ``NNFAST_BACKEND`` stays
    as it was, its value in the environment's mapping is the same object, so the answer is
    an identity test away (~0.3 us, where ``use_triton`` costs ~0.9 us); a new value (set
    any time, by a user or a test) is decided once by ``use_triton``, which also raises for
    an impossible forced choice, uncached, on every call. Traceable by torch.compile (a
    dict read, guarded)."""
    if not tensor.is_cpu:
        return False
    raw = _ENV.get(_KEY) if _FAST_ENV else os.environ.get("NNFAST_BACKEND")
    if raw is not _CpuCache.raw:
        reference = not use_triton(_CPU)
        _CpuCache.raw, _CpuCache.reference = raw, reference
    return _CpuCache.reference


@functools.cache
def warn_once(message: str) -> None:
    """A fallback warning shown once per distinct message, not once per call."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)
