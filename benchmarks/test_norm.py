"""RMSNorm / LayerNorm throughput: nnfast vs the PyTorch reference (eager and compiled),
torch.nn.functional's native kernels and Liger-Kernel, forward and forward+backward.

Bytes moved (e = element size): forward reads x and writes y (2·M·n·e, plus weights);
forward+backward adds the backward's read of x and dy and write of dx (5·M·n·e in all).
The fused residual variant (``add_rms``) also reads the residual and writes the sum.
"""

import functools

import pytest
import torch
import torch.nn.functional as TF

import nnfast.functional as F
from benchmarks.conftest import DEVICE, cpu_only, requires_cuda, run
from nnfast.reference import norm as ref

EPS = 1e-6
GPU_SHAPES = [(4096, 4096), (16384, 8192)]
GPU_IMPLS = ["nnfast", "reference", "compile", "torch", "liger"]


def _fn(op: str, impl: str, n: int):
    """(x, residual, w, b) -> y (or (y, s)) for one implementation."""
    rms = op != "layer"
    if impl == "nnfast":
        if op == "add_rms":
            return lambda x, r, w, b: F.add_rms_norm(x, r, (n,), w, EPS)
        if rms:
            return lambda x, r, w, b: F.rms_norm(x, (n,), w, EPS)
        return lambda x, r, w, b: F.layer_norm(x, (n,), w, b, EPS)
    if impl in ("reference", "compile"):
        def fn(x, r, w, b):
            y, s = ref.layer_norm(x, n, w, b, EPS, rms, r)
            return (y, s) if op == "add_rms" else y

        return torch.compile(fn) if impl == "compile" else fn
    if impl == "torch":
        if op == "add_rms":

            def add_rms(x, r, w, b):
                s = x + r
                return TF.rms_norm(s, (n,), w, EPS), s

            return add_rms
        if rms:
            return lambda x, r, w, b: TF.rms_norm(x, (n,), w, EPS)
        return lambda x, r, w, b: TF.layer_norm(x, (n,), w, b, EPS)
    if impl == "liger":
        if op == "layer":
            mod = pytest.importorskip("liger_kernel.ops.layer_norm")
            return lambda x, r, w, b: mod.LigerLayerNormFunction.apply(x, w, b, EPS)
        mod = pytest.importorskip("liger_kernel.ops.rms_norm")
        if op == "add_rms":
            pytest.skip("Liger's fused add + RMSNorm has a different interface")
        # offset 0, Llama casting, out-of-place backward (as nnfast)
        return lambda x, r, w, b: mod.LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
    raise ValueError(impl)


def _case(benchmark, copy_gbps, op, impl, passes, shape, dtype):
    M, n = shape
    e = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(M, n, device=DEVICE, dtype=dtype, generator=g)
    r = torch.randn_like(x) if op == "add_rms" else None
    w = torch.randn(n, device=DEVICE, dtype=dtype, generator=g)
    b = torch.randn(n, device=DEVICE, dtype=dtype, generator=g) if op == "layer" else None
    fn = _fn(op, impl, n)
    params = 1 + (b is not None)
    if passes == "fwd":
        nbytes = (2 + 2 * (r is not None)) * M * n * e + params * n * e
        call = functools.partial(fn, x, r, w, b)
    else:
        leaves = [t.requires_grad_() for t in (x, r, w, b) if t is not None]
        dy = torch.randn_like(x)
        # fwd as above; bwd reads x (or s) and dy, writes dx; params read and grads written.
        nbytes = (5 + 2 * (r is not None)) * M * n * e + 3 * params * n * e

        def call():
            out = fn(x, r, w, b)
            y = out[0] if isinstance(out, tuple) else out
            return torch.autograd.grad(y, leaves, dy)

    run(benchmark, call, nbytes=nbytes, copy_gbps=copy_gbps, op=op, impl=impl, passes=passes,
        shape=list(shape), dtype=str(dtype)[6:])


@requires_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("passes", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("op", ["rms", "layer", "add_rms"])
def test_norm_cuda(benchmark, copy_gbps, op, impl, passes, shape):
    _case(benchmark, copy_gbps, op, impl, passes, shape, torch.bfloat16)


@cpu_only
@pytest.mark.parametrize("passes", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["nnfast", "torch"])
@pytest.mark.parametrize("op", ["rms", "layer"])
def test_norm_cpu(benchmark, copy_gbps, op, impl, passes):
    _case(benchmark, copy_gbps, op, impl, passes, (256, 1024), torch.float32)
