"""Shared test utilities: which devices run the kernels, and the low-precision rule.

The rule (flash-attention's): compare against an fp32 reference; the kernel's max error
may be at most ``factor`` (2 for outputs, 3 for gradients) times the error PyTorch itself
makes computing the same thing in the input's dtype, plus a small floor.
"""

from __future__ import annotations

import pytest
import torch

from nnfast._backend import triton_available_for

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def kernel_devices() -> list[str]:
    """Devices where the Triton kernels run in this session (CUDA, or CPU via the interpreter)."""
    return [
        d
        for d in ("cpu", "cuda")
        if (d != "cuda" or CUDA) and triton_available_for(torch.device(d))[0]
    ]


def kernel_dtypes(device: str) -> list[torch.dtype]:
    """bf16 ``tl.dot`` is wrong in the interpreter (Triton 3.9): bf16 is tested on GPUs only."""
    if device == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16]


def device_dtype_params() -> list:
    """``pytest.mark.parametrize("device,dtype", device_dtype_params())`` over kernel devices."""
    params = [
        pytest.param(d, t, id=f"{d}-{str(t)[6:]}")
        for d in kernel_devices()
        for t in kernel_dtypes(d)
    ]
    if not params:
        params = [
            pytest.param(
                "cpu",
                torch.float32,
                marks=pytest.mark.skip(reason="Triton kernels cannot run here"),
            )
        ]
    return params


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def assert_close_lowp(
    name: str,
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    torch_lowp: torch.Tensor,
    factor: float = 2.0,
    floor: float | None = None,
) -> None:
    """``out`` (kernel, input dtype) vs ``ref_fp32``, judged against PyTorch's own error.

    In fp32 PyTorch's error is ~0, so the floor carries the check: 1e-5 relative to the
    reference's magnitude by default; low precision gets a floor of one ulp-ish of the
    magnitude so near-zero tensors do not demand exactness.
    """
    assert out.shape == ref_fp32.shape, (
        f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    )
    assert not torch.isnan(out).any(), f"{name}: output has NaN"
    scale = ref_fp32.abs().max().item() if ref_fp32.numel() else 0.0
    if floor is None:
        floor = (1e-5 if out.dtype == torch.float32 else 1e-3) * max(scale, 1.0)
    kernel_err = max_err(out, ref_fp32)
    torch_err = max_err(torch_lowp, ref_fp32)
    bound = factor * torch_err + floor
    assert kernel_err <= bound, (
        f"{name}: kernel error {kernel_err:.3e} > {factor}x PyTorch's "
        f"{torch_err:.3e} + floor {floor:.1e}"
    )


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values laid out with a stride gap in the last dim."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


def profiled_peak_bytes(fn) -> int:
    """Peak CPU bytes allocated while ``fn()`` runs, above what was live before, from the
    torch profiler's allocation events (allocations positive, frees negative, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
