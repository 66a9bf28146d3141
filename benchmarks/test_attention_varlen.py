"""Packed variable-length attention: nnfast's varlen kernel on a pack of mixed-length
sequences vs the same batch padded to the longest sequence through PyTorch SDPA (causal:
real queries never reach the padding keys), and vs flash-attention's
``flash_attn_varlen_func`` where installed. Causal, forward+backward. ``extra_info``:
tokens/s (real tokens, not padding), ``padded_tokens`` (the rows the layout holds: B * longest
padded, the real tokens packed), ``io_gib`` (the bytes of q, k, v, dout and the three
gradients, from the tensors themselves, on every device) and, on CUDA, ``peak_gib``, the
peak memory of one step.

CUDA: bf16, H = 16, D = 128; lengths drawn from a long-tailed mix (64 .. 4096) to 32k real
tokens. Padded SDPA computes B * longest^2 / 2 scores per head, varlen sum(len^2) / 2.
CPU: one tiny fp32 pack of 1 .. 256 tokens (nnfast's reference path, one sequence at a time,
vs PyTorch's padded SDPA): a smoke run, not a speed claim.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as torch_F

import nnfast.functional as F
from benchmarks.conftest import CUDA, DEVICE, cpu_only, peak_gib, requires_cuda, run

IMPLS = ("nnfast_varlen", "sdpa_padded", "flash_attn_varlen")


def _lengths(total: int, longest: int, seed: int = 0) -> list[int]:
    """Long-tailed document lengths (most short, a few long), summing to ``total``."""
    g = torch.Generator().manual_seed(seed)
    lens, left = [], total
    while left > 0:
        n = int(min(longest, max(1, 64 * 2 ** (torch.rand((), generator=g).item() * 6))))
        lens.append(min(n, left))
        left -= lens[-1]
    return lens


def _step(impl: str, lens: list[int], H: int, D: int, dtype):
    total, B, L = sum(lens), len(lens), max(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if impl == "sdpa_padded":  # (B, H, L, D): every sequence padded to the longest
        q, k, v = (torch.randn(B, H, L, D, device=DEVICE, dtype=dtype, generator=gen)
                   .requires_grad_() for _ in range(3))
        dout = torch.randn_like(q)

        def step():
            # Causal alone keeps real queries off the padding keys (they come after), so
            # no mask is needed and SDPA may pick its flash backend: the fastest padded run.
            out = torch_F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return torch.autograd.grad(out, (q, k, v), dout)
        return step, (q, k, v, dout)
    q, k, v = (torch.randn(total, H, D, device=DEVICE, dtype=dtype, generator=gen)
               .requires_grad_() for _ in range(3))
    dout = torch.randn_like(q)
    if impl == "nnfast_varlen":
        def fn():
            return F.varlen_attention(q, k, v, cu, cu, L, L, causal=True)
    else:
        from flash_attn import flash_attn_varlen_func

        def fn():
            return flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True)

    def step():
        return torch.autograd.grad(fn(), (q, k, v), dout)
    return step, (q, k, v, dout)


def _bench(benchmark, impl, lens, H, D, dtype):
    if impl == "flash_attn_varlen" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    step, tensors = _step(impl, lens, H, D, dtype)
    info = dict(op="attention_varlen", impl=impl, shape=f"docs={len(lens)} tokens={sum(lens)} "
                f"longest={max(lens)} H={H} D={D}", dtype=str(dtype),
                padded_tokens=tensors[0].numel() // (H * D),
                # inputs + dout, and a gradient as large as each of q, k, v
                io_gib=sum(t.nbytes for t in tensors[:3]) * 2 / 2**30 + tensors[3].nbytes / 2**30)
    if CUDA:
        step()
        info["peak_gib"] = peak_gib(step)
    seconds = run(benchmark, step, **info)
    benchmark.extra_info["tokens_per_s"] = sum(lens) / seconds


@requires_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("longest", [1024, 4096])
def test_varlen_cuda(benchmark, impl, longest):
    _bench(benchmark, impl, _lengths(32768, longest), 16, 128, torch.bfloat16)


@cpu_only
@pytest.mark.parametrize("impl", IMPLS[:2])
def test_varlen_cpu(benchmark, impl):
    # Fixed mixed lengths (the long-tailed draw capped at 256 gives mostly 256s: no padding).
    _bench(benchmark, impl, [256, 1, 7, 113, 64, 31], 2, 32, torch.float32)
