"""The token-merging transformer (``conv-transformer/shakespeare-char``: widths 48 -> 144 ->
496, merges 2 and 2, 10.3M parameters) against GPT-2 of about the same size
(``gpt2/shakespeare-char``: 6 x 384, 10.8M), both through nnfast's kernels.

Cases:

* training-step throughput (forward + backward + AdamW; bf16 autocast, fused AdamW) at
  contexts 256 and 1024 on CUDA, and a small fp32 case on CPU (reference path). Tokens/s,
  MFU (each model's own FLOP estimate) and peak memory in ``extra_info``;
* the longest context (block_size, doubling from 256) whose training step at batch
  ``NNFAST_BENCH_CTX_BATCH`` (default 8) peaks under ``NNFAST_BENCH_MEM_GIB`` (default 8)
  of GPU memory, for each model (``max_context`` in ``extra_info``), then the step timed at
  that context.

Both models have ``dropout=0`` here (the presets' 0.2 would only add noise to the timing).
"""

from __future__ import annotations

import os

import pytest
import torch

import nnfast.models as models
from benchmarks.conftest import cpu_only, peak_gib, requires_cuda, train_step_bench

MODELS = ("conv-transformer", "gpt2")
PRESET = "shakespeare-char"


def _setup(name: str, batch: int, seq: int, device: str):
    torch.manual_seed(0)
    model = models.create(name, PRESET, block_size=seq, dropout=0.0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1,
                            fused=device == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    V = model.config.vocab_size
    x = torch.randint(0, V, (batch, seq), generator=g).to(device)
    y = torch.randint(0, V, (batch, seq), generator=g).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        return loss

    return model, step


def _bench(benchmark, name: str, batch: int, seq: int, device: str, **info) -> None:
    model, step = _setup(name, batch, seq, device)
    train_step_bench(benchmark, model, step, batch, seq, model=name, preset=PRESET,
                     flops_per_token=model.estimate_flops_per_token(seq), **info)


@requires_cuda
@pytest.mark.parametrize("seq", [256, 1024])
@pytest.mark.parametrize("name", MODELS)
def test_train_step_cuda(benchmark, name, seq):
    batch = int(os.environ.get("NNFAST_BENCH_BATCH", "32"))
    _bench(benchmark, name, batch, seq, "cuda")


@cpu_only
@pytest.mark.parametrize("name", MODELS)
def test_train_step_cpu(benchmark, name):
    _bench(benchmark, name, 2, 64, "cpu")


def _fits(name: str, batch: int, seq: int, budget_gib: float) -> tuple[bool, float | None]:
    """Whether a training step at ``seq`` peaks under the budget (an OOM does not fit)."""
    try:
        _, step = _setup(name, batch, seq, "cuda")
        step()  # allocate the optimizer state, autotune
        peak = peak_gib(step)
        return peak <= budget_gib, peak
    except torch.OutOfMemoryError:
        return False, None
    finally:
        torch.cuda.empty_cache()


@requires_cuda
@pytest.mark.parametrize("name", MODELS)
def test_longest_context_cuda(benchmark, name):
    budget = float(os.environ.get("NNFAST_BENCH_MEM_GIB", "8"))
    batch = int(os.environ.get("NNFAST_BENCH_CTX_BATCH", "8"))
    best, best_peak, seq = None, None, 256
    while seq <= 2**17:  # activations grow linearly in T (flash attention): doubling finds it
        ok, peak = _fits(name, batch, seq, budget)
        if not ok:
            break
        best, best_peak, seq = seq, peak, seq * 2
    if best is None:
        pytest.skip(f"{name}: even context 256 does not fit in {budget} GiB at batch {batch}")
    _bench(benchmark, name, batch, best, "cuda", case="longest_context", max_context=best,
           mem_budget_gib=budget, peak_at_max_context_gib=best_peak)
