"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

The contract (tests and users rely on it):

* CUDA tensors run the Triton kernels.
* CPU tensors run the PyTorch reference, unless ``TRITON_INTERPRET=1`` was set
  before the kernels were imported: then the Triton kernels run on the CPU
  through Triton's interpreter (this is how CI tests every kernel).
* ``NNFAST_BACKEND=torch`` forces the reference everywhere; ``NNFAST_BACKEND=triton``
  forces the kernels and raises where that is impossible. Default ``auto``.

The environment is read on every call so that tests can flip ``NNFAST_BACKEND``;
``TRITON_INTERPRET`` only matters before ``triton.jit`` decorates the kernels,
which is why it must be set before the first nnfast op runs.
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


def backend() -> str:
    value = os.environ.get("NNFAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"NNFAST_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


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


def use_triton(tensor: torch.Tensor) -> bool:
    """Decide the path for an op whose inputs live on ``tensor.device``."""
    choice = backend()
    if choice == "torch":
        return False
    ok, why = triton_available_for(tensor.device)
    if choice == "triton" and not ok:
        raise RuntimeError(f"NNFAST_BACKEND=triton but the Triton kernels cannot run here: {why}")
    return ok


@functools.cache
def warn_once(message: str) -> None:
    """A fallback warning shown once per distinct message, not once per call."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)
