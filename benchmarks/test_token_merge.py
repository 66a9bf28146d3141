"""Convolutional token merging and expansion: 16k tokens, k = 4, 512 -> 1024 channels (merge)
and back 1024 -> 512 (expand), bf16, forward and forward+backward, plain and causal merge.

Implementations: nnfast (Triton GEMMs through the window view, bias fused); the reference
(``F.conv1d`` / ``F.conv_transpose1d`` on the transposed layout, cuDNN, eager); torch.compile
of the reference. A GEMM, so the unit is TFLOP/s: forward ``2 * B*T * C_in * C_out`` (each
input token meets every output channel once: ``M = B*T/k`` windows of ``k*C_in`` features),
backward twice that (dX and dW).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEVICE, cpu_only, requires_cuda, run
from nnfast import functional as Fn
from nnfast.reference import token_merge as ref

CUDA_SHAPE = (4, 4096, 4, 512, 1024)  # B, T, k, C_in, C_out: 16k tokens
CPU_SHAPE = (2, 256, 4, 64, 128)

_COMPILED = {}


def _compiled(op: str):
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(getattr(ref, op))
    return _COMPILED[op]


def _op_fn(op: str, impl: str, causal: bool):
    if op == "merge":
        fns = {
            "nnfast": lambda x, w, b: Fn.token_merge(x, w, b, causal=causal),
            "eager": lambda x, w, b: ref.token_merge(x, w, b, w.shape[2], causal),
            "compiled": lambda x, w, b: _compiled("token_merge")(x, w, b, w.shape[2], causal),
        }
    else:
        fns = {
            "nnfast": lambda x, w, b: Fn.token_expand(x, w, b),
            "eager": lambda x, w, b: ref.token_expand(x, w, b, w.shape[2], None),
            "compiled": lambda x, w, b: _compiled("token_expand")(x, w, b, w.shape[2], None),
        }
    return fns[impl]


def _bench(benchmark, op, impl, pass_, shape, dtype, causal=False):
    B, T, k, cin, cout = shape
    grad = pass_ == "fwd+bwd"
    if op == "merge":
        x = torch.randn(B, T, cin, device=DEVICE, dtype=dtype, requires_grad=grad)
        w = torch.randn(cout, cin, k, device=DEVICE, dtype=dtype, requires_grad=grad)
    else:  # the inverse shape: (B, T/k, C_out) -> (B, T, C_in)
        x = torch.randn(B, T // k, cout, device=DEVICE, dtype=dtype, requires_grad=grad)
        w = torch.randn(cout, cin, k, device=DEVICE, dtype=dtype, requires_grad=grad)
    bias = torch.randn(w.shape[1] if op == "expand" else cout, device=DEVICE, dtype=dtype,
                       requires_grad=grad)
    f = _op_fn(op, impl, causal)
    dy = torch.randn_like(f(x, w, bias).detach())

    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                return f(x, w, bias)
    else:
        def fn():  # gradients returned, not accumulated into .grad
            return torch.autograd.grad(f(x, w, bias), (x, w, bias), dy)

    flops = 2 * B * T * cin * cout * (1 if pass_ == "fwd" else 3)
    run(benchmark, fn, flops=flops, op=op, impl=impl, pass_=pass_, causal=causal,
        shape=f"B{B} T{T} k{k} Cin{cin} Cout{cout}", dtype=str(dtype))


@requires_cuda
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["nnfast", "eager", "compiled"])
@pytest.mark.parametrize("op,causal", [("merge", False), ("merge", True), ("expand", False)],
                         ids=["merge", "merge-causal", "expand"])
def test_token_merge_cuda(benchmark, op, causal, impl, pass_):
    _bench(benchmark, op, impl, pass_, CUDA_SHAPE, torch.bfloat16, causal)


@cpu_only
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["nnfast", "eager"])  # nnfast = the reference path on a CPU
@pytest.mark.parametrize("op", ["merge", "expand"])
def test_token_merge_cpu(benchmark, op, impl, pass_):
    _bench(benchmark, op, impl, pass_, CPU_SHAPE, torch.float32, causal=op == "merge")
