"""Input validation shared by both paths: bad input gets a ValueError/TypeError naming
the argument and what was expected, never a Triton crash or a silent wrong answer."""

from __future__ import annotations

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
