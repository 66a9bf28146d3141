"""Fused (gated) activation: SwiGLU's ``silu_mul`` at Llama-7B's MLP width and GPT-2's
``gelu`` (tanh) at its MLP width, forward and forward+backward.

Implementations: nnfast; the reference (fp32 compute, eager); torch.compile of the
reference; PyTorch's own ops in the input dtype (``F.silu(g) * u``, what Hugging Face runs);
Liger-Kernel's ``LigerSiLUMulFunction`` (SwiGLU only; skipped when not installed).

Memory-bound, so the unit is GB/s of unavoidable traffic and its fraction of the copy
bandwidth measured in the same session. Bytes per element (``e`` = element size):
silu_mul fwd reads gate and up and writes y (3e); its backward reads dy, gate, up and writes
dgate, dup (5e), so fwd+bwd moves 8e. gelu: 2e forward, 3e backward, 5e in all.
gate and up are separate contiguous tensors for every implementation (Liger assumes one
row stride for its inputs and output); ``layout="halves"`` adds nnfast on the two halves of
one (N, 2H) GEMM output, the way ``nnfast.SwiGLU`` calls it (its fwd+bwd time includes
autograd concatenating dgate and dup into the fused gradient, not counted in the bytes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import DEVICE, cpu_only, requires_cuda, run
from nnfast import functional as Fn
from nnfast.reference import activation as ref

LLAMA = (16384, 11008)  # B*T tokens, Llama-7B MLP hidden
GPT2 = (16384, 3072)  # B*T tokens, GPT-2 MLP hidden (4 * 768)
CPU_SHAPE = (256, 1024)

_COMPILED = {}


def _compiled_reference():
    if "ref" not in _COMPILED:
        _COMPILED["ref"] = torch.compile(ref.act_mul)
    return _COMPILED["ref"]


def _op_fn(op: str, impl: str):
    """``f(gate, up)`` (``up`` unused for gelu) for one implementation."""
    if op == "silu_mul":
        fns = {
            "nnfast": Fn.silu_mul,
            "eager": lambda g, u: ref.act_mul(g, u, "silu"),
            "compiled": lambda g, u: _compiled_reference()(g, u, "silu"),
            "torch_native": lambda g, u: F.silu(g) * u,
        }
        if impl == "liger":
            swiglu = pytest.importorskip("liger_kernel.ops.swiglu")
            return swiglu.LigerSiLUMulFunction.apply
        return fns[impl]
    fns = {
        "nnfast": lambda g, u: Fn.gelu(g, approximate="tanh"),
        "eager": lambda g, u: ref.act_mul(g, None, "gelu_tanh"),
        "compiled": lambda g, u: _compiled_reference()(g, None, "gelu_tanh"),
        "torch_native": lambda g, u: F.gelu(g, approximate="tanh"),
    }
    if impl == "liger":
        pytest.skip("Liger-Kernel has no plain GELU kernel")
    return fns[impl]


def _bench(benchmark, copy_gbps, op, impl, pass_, shape, dtype, layout="separate"):
    N, H = shape
    gated = op == "silu_mul"
    grad = pass_ == "fwd+bwd"
    if layout == "halves":
        h = torch.randn(N, 2 * H, device=DEVICE, dtype=dtype, requires_grad=grad)
        g, u = h.split(H, dim=-1)
        inputs = (h,)
    else:
        g = torch.randn(N, H, device=DEVICE, dtype=dtype, requires_grad=grad)
        u = torch.randn(N, H, device=DEVICE, dtype=dtype, requires_grad=grad) if gated else None
        inputs = (g, u) if gated else (g,)
    f = _op_fn(op, impl)
    dy = torch.randn(N, H, device=DEVICE, dtype=dtype)

    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                return f(g, u)
    else:
        def fn():  # gradients returned, not accumulated into .grad
            return torch.autograd.grad(f(g, u), inputs, dy)

    per_elem = (3 if gated else 2) if pass_ == "fwd" else (8 if gated else 5)
    nbytes = per_elem * N * H * g.element_size()
    run(benchmark, fn, nbytes=nbytes, copy_gbps=copy_gbps, op=op, impl=impl, pass_=pass_,
        shape=f"N{N} H{H}", dtype=str(dtype), layout=layout)


@requires_cuda
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["nnfast", "eager", "compiled", "torch_native", "liger"])
@pytest.mark.parametrize(
    "op,shape",
    [("silu_mul", LLAMA), ("silu_mul", GPT2), ("gelu", GPT2)],
    ids=["silu_mul-llama", "silu_mul-gpt2", "gelu-gpt2"],
)
def test_activation_cuda(benchmark, copy_gbps, op, shape, impl, pass_):
    _bench(benchmark, copy_gbps, op, impl, pass_, shape, torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["nnfast", "eager"])
def test_silu_mul_gemm_halves_cuda(benchmark, copy_gbps, impl, pass_):
    _bench(benchmark, copy_gbps, "silu_mul", impl, pass_, LLAMA, torch.bfloat16, layout="halves")


@cpu_only
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["nnfast", "torch_native"])
@pytest.mark.parametrize("op", ["silu_mul", "gelu"])
def test_activation_cpu(benchmark, copy_gbps, op, impl, pass_):
    _bench(benchmark, copy_gbps, op, impl, pass_, CPU_SHAPE, torch.float32)
