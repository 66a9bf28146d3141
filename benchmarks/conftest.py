"""Shared benchmark machinery (pytest-benchmark).

``pytest benchmarks --benchmark-only`` runs the CPU cases everywhere and the GPU cases
where CUDA is present. On CUDA every timed call ends in ``torch.cuda.synchronize()`` so
pytest-benchmark's wall clock covers the kernel, and CUDA events give a second, tighter
median stored in ``extra_info``. Throughput goes into ``extra_info`` in the unit that
matters: GB/s (and the fraction of the copy bandwidth measured in the same session) for
memory-bound ops, TFLOP/s for attention and matmuls.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="GPU benchmark: needs CUDA")
cpu_only = pytest.mark.skipif(CUDA, reason="CPU benchmark: a GPU is present, its cases run instead")

if CUDA:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


# NNFAST_BENCH_REPS: repetitions of each timing (scripts/gpu_check.py lowers it to fit its
# time budget); unset, the defaults below.
_REPS = int(os.environ.get("NNFAST_BENCH_REPS", "0"))


def cuda_event_ms(fn, reps: int = 50, warmup: int = 10) -> float:
    """Median milliseconds of ``fn`` by CUDA events, L2 flushed between calls."""
    if _REPS:
        reps, warmup = _REPS, min(warmup, _REPS)
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def run(
    benchmark,
    fn,
    *,
    nbytes: float | None = None,
    flops: float | None = None,
    copy_gbps: float | None = None,
    rounds: int | None = None,
    **info,
):
    """Time ``fn`` with pytest-benchmark and record throughput in ``extra_info``."""

    def timed():
        out = fn()
        sync()
        return out

    timed()  # compile / autotune outside the timing
    if rounds is None:
        rounds = _REPS or (20 if CUDA else 3)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2 if CUDA else 1, iterations=1)
    seconds = benchmark.stats.stats.median
    if CUDA:
        seconds = cuda_event_ms(fn) / 1e3
        info["cuda_event_ms"] = seconds * 1e3
    info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    if nbytes is not None:
        info["gbps"] = nbytes / seconds / 1e9
        if copy_gbps:
            info["frac_copy_bw"] = info["gbps"] / copy_gbps
    if flops is not None:
        info["tflops"] = flops / seconds / 1e12
    benchmark.extra_info.update(info)
    return seconds


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """Device copy bandwidth (read + write bytes / s), measured in this session."""
    n = (1 << 30) if CUDA else (64 << 20)
    n = int(os.environ.get("NNFAST_BENCH_COPY_BYTES", n))
    x = torch.empty(n // 4, dtype=torch.float32, device=DEVICE).uniform_()
    y = torch.empty_like(x)
    if CUDA:
        ms = cuda_event_ms(lambda: y.copy_(x))
    else:
        import time

        y.copy_(x)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            y.copy_(x)
            times.append(time.perf_counter() - t)
        ms = sorted(times)[2] * 1e3
    return 2 * n / (ms / 1e3) / 1e9


def peak_gib(step) -> float:
    """Peak CUDA memory (GiB) of one call of ``step``."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def train_step_bench(benchmark, net, step, batch: int, seq: int, **info) -> float:
    """Time ``step``, a whole training step of model ``net``: warm-up (compile, autotune,
    allocation) outside the timing, peak memory on CUDA, then tokens/s, TFLOP/s and MFU from
    the model's FLOPs per token."""
    for _ in range(3):
        step()
    peak = peak_gib(step) if CUDA else None
    tokens = batch * seq
    flops_per_token = net.estimate_flops_per_token(seq)
    info.update(op="train_step", batch=batch, seq=seq, params=net.num_params(),
                dtype="bf16-autocast" if CUDA else "fp32")
    seconds = run(benchmark, step, flops=tokens * flops_per_token,
                  rounds=info.pop("rounds", 10 if CUDA else 3), **info)
    tps = tokens / seconds
    benchmark.extra_info.update(tokens_per_s=tps, mfu=net.estimate_mfu(tps, seq_len=seq),
                                peak_mem_gib=peak)
    return seconds
