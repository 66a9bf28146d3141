"""Attention: nnfast's flash kernel vs PyTorch SDPA (the backend PyTorch picks, and the
flash backend forced, i.e. FlashAttention-2) vs the plain PyTorch reference (eager and
compiled), forward and forward+backward, causal or not.

CUDA: bf16, D in {64, 128}, H = 2048 // D, N from 512 to 8192 with B * N = 16k tokens.
FLOPs = 4 * B * H * N^2 * D (two matmuls), halved when causal; forward+backward counts
3.5x the forward (the backward's five matmuls = 2.5x). TFLOP/s goes into ``extra_info``.
The reference materializes (B, H, N, N) fp32 scores and runs only up to N = 2048.
CPU: one small fp32 case (nnfast runs its reference path there).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as torch_F

import nnfast.functional as F
from benchmarks.conftest import DEVICE, cpu_only, requires_cuda, run
from nnfast.reference import attention as ref

IMPLS = ("nnfast", "sdpa", "sdpa_flash", "sdpa_cudnn", "reference", "reference_compile")
_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}


def _fn(impl: str, causal: bool):
    if impl == "nnfast":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if impl == "sdpa":
        return lambda q, k, v: torch_F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if impl in _BACKENDS:  # one SDPA backend forced (FlashAttention-2, cuDNN)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, _BACKENDS[impl])

        def forced(q, k, v):
            with sdpa_kernel(backend):
                return torch_F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return forced

    def reference(q, k, v):
        return ref.attention(q, k, v, None, 0.0, causal, q.shape[-1] ** -0.5)

    return torch.compile(reference) if impl == "reference_compile" else reference


def _bench(benchmark, impl, pass_, causal, B, H, N, D, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE, dtype=dtype, generator=gen)
               .requires_grad_(pass_ == "fwd_bwd") for _ in range(3))
    dout = torch.randn_like(q)
    fn = _fn(impl, causal)
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                return fn(q, k, v)
    else:
        def step():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0) * (3.5 if pass_ == "fwd_bwd" else 1)
    run(benchmark, step, flops=flops, op="attention", impl=impl, **{"pass": pass_},
        causal=causal, shape=f"B={B} H={H} N={N} D={D}", dtype=str(dtype))


@requires_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("N", [512, 1024, 2048, 4096, 8192])
def test_attention_cuda(benchmark, impl, pass_, causal, D, N):
    if impl.startswith("reference") and N > 2048:
        pytest.skip("the reference's (B, H, N, N) fp32 scores do not fit")
    _bench(benchmark, impl, pass_, causal, 16384 // N, 2048 // D, N, D, torch.bfloat16)


@cpu_only
@pytest.mark.parametrize("impl", ["nnfast", "sdpa", "reference"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
def test_attention_cpu(benchmark, impl, pass_):
    _bench(benchmark, impl, pass_, True, 2, 4, 256, 64, torch.float32)
