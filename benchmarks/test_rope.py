"""RoPE on q and k: nnfast vs the PyTorch reference (eager and torch.compile) vs Liger-Kernel.

Memory-bound: the forward reads q and k and writes them rotated (the cos/sin rows are
negligible), the backward does the same on the gradients. GB/s counts those bytes.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEVICE, cpu_only, requires_cuda, run
from nnfast import functional as F
from nnfast.reference import rope as ref

# Llama-7B-like: 32 heads of 128, 2048 tokens, batch 4, MHA; and a GQA variant (8 kv heads).
CUDA_SHAPES = [(4, 2048, 32, 32, 128), (4, 2048, 32, 8, 128)]
CPU_SHAPE = (1, 128, 8, 8, 64)


def _liger(q, k, cos, sin, position_ids, offset, interleaved):
    rope = pytest.importorskip("liger_kernel.ops.rope")
    T = q.shape[2]
    # Liger takes Hugging Face's full-width (1, T, D) tables in the activations' dtype.
    c = torch.cat((cos, cos), dim=-1)[offset : offset + T][None].to(q.dtype)
    s = torch.cat((sin, sin), dim=-1)[offset : offset + T][None].to(q.dtype)
    return lambda q, k: rope.LigerRopeFunction.apply(q, k, c, s)


def _impl(name: str):
    if name == "nnfast":
        return lambda q, k, cos, sin: F.apply_rotary(q, k, cos, sin)
    if name == "reference":
        return lambda q, k, cos, sin: ref.apply_rotary(q, k, cos, sin, None, 0, False)
    if name == "compiled":
        fn = torch.compile(ref.apply_rotary)
        return lambda q, k, cos, sin: fn(q, k, cos, sin, None, 0, False)
    raise ValueError(name)


def _bench(benchmark, copy_gbps, impl, pass_, shape, dtype):
    B, T, H, Hk, D = shape
    q = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype, requires_grad=pass_ == "fwd+bwd")
    k = torch.randn(B, Hk, T, D, device=DEVICE, dtype=dtype, requires_grad=pass_ == "fwd+bwd")
    cos, sin = ref.rotary_cos_sin(T, D, device=DEVICE)
    if impl == "liger":
        rotate = _liger(q, k, cos, sin, None, 0, False)
    else:
        f = _impl(impl)
        rotate = lambda q, k: f(q, k, cos, sin)
    moved = 2 * (q.numel() + k.numel()) * q.element_size()  # read + write of q and k
    if pass_ == "fwd":
        fn = lambda: rotate(q, k)
    else:
        gq, gk = torch.randn_like(q), torch.randn_like(k)

        def fn():  # autograd.grad: no accumulation into .grad inside the timing
            qo, ko = rotate(q, k)
            return torch.autograd.grad((qo, ko), (q, k), (gq, gk))

        moved *= 2
    run(
        benchmark, fn, nbytes=moved, copy_gbps=copy_gbps,
        op="rope", impl=impl, shape=f"B{B} T{T} H{H} Hk{Hk} D{D}", dtype=str(dtype),
        **{"pass": pass_},
    )


@requires_cuda
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["nnfast", "reference", "compiled", "liger"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "B{}-T{}-H{}-Hk{}-D{}".format(*s))
def test_rope_cuda(benchmark, copy_gbps, impl, pass_, shape):
    _bench(benchmark, copy_gbps, impl, pass_, shape, torch.bfloat16)


@cpu_only
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["nnfast", "reference"])
def test_rope_cpu(benchmark, copy_gbps, impl, pass_):
    _bench(benchmark, copy_gbps, impl, pass_, CPU_SHAPE, torch.float32)
