"""The physical baselines every other number is read against, measured in the same run:
device copy bandwidth and a large matmul (bf16 on GPU, fp32 on CPU)."""

import torch

from benchmarks.conftest import CUDA, DEVICE, run


def test_copy_bandwidth(benchmark, copy_gbps):
    n = (1 << 30) if CUDA else (64 << 20)
    x = torch.empty(n // 4, device=DEVICE)
    y = torch.empty_like(x)
    run(benchmark, lambda: y.copy_(x), nbytes=2 * n, copy_gbps=copy_gbps, op="copy")


def test_matmul(benchmark):
    n = 8192 if CUDA else 1024
    dtype = torch.bfloat16 if CUDA else torch.float32
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    run(benchmark, lambda: a @ b, flops=2 * n**3, op="matmul", dtype=str(dtype))
