"""Input validation shared by both paths: bad input gets a ValueError/TypeError naming
the argument and what was expected, never a Triton crash or a silent wrong answer."""

from __future__ import annotations

import numbers
import operator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                "all inputs must be on one device"
            )


def check_same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match"
            )


def check_param_dtype(name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    """Parameters may be the input's dtype or float32 (mixed precision keeps fp32 weights)."""
    if t is None:
        return
    check_float(name, t)
    if t.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"{name} has dtype {t.dtype}; expected the input's dtype ({x.dtype}) or float32"
        )


def check_shape(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def normalized_size(
    x: torch.Tensor, normalized_shape, max_size: int
) -> tuple[int, tuple[int, ...]]:
    """``(product, shape)`` of ``normalized_shape`` after checking the input's trailing dims."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    if len(normalized_shape) == 0 or tuple(x.shape[-len(normalized_shape) :]) != normalized_shape:
        raise ValueError(
            f"input's trailing dims {tuple(x.shape)} do not match "
            f"normalized_shape {normalized_shape}"
        )
    n = 1
    for s in normalized_shape:
        n *= s
    if n > max_size:
        raise ValueError(f"normalized size {n} is over the kernel's limit of {max_size}")
    return n, normalized_shape


def check_class_targets(name: str, target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Every entry of ``target`` is a class in ``[0, n_classes)`` or ``ignore_index``.

    One ``aminmax`` (and one host sync) on the common path, where all targets are in range;
    the entries are only looked at one by one when that fails."""
    if target.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(target))
    if lo >= 0 and hi < n_classes:
        return
    bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise ValueError(
            f"{name} holds {value}, outside the {n_classes} classes [0, {n_classes}) "
            f"and not ignore_index ({ignore_index})"
        )


def check_positions(name: str, positions: torch.Tensor, n_rows: int) -> None:
    """Position ids index a table of ``n_rows`` rows: each must be in ``[0, n_rows)``."""
    if positions.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(positions))
    if lo < 0 or hi >= n_rows:
        raise ValueError(
            f"{name} must be in [0, {n_rows}) (the cos/sin table's rows), "
            f"got values from {lo} to {hi}"
        )


def check_index(name: str, value) -> int:
    """An integer argument (int, numpy or 0-d integer tensor; not bool, not a float)."""
    if type(value) is int:
        return value
    if not isinstance(value, (bool, float)) and hasattr(value, "__index__"):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")


def check_number(name: str, value, *, allow_none: bool = False) -> float:
    """A real number (int, float, numpy scalar; not bool, not a string)."""
    if type(value) is float or (value is None and allow_none):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
