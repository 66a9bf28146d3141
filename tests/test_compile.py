"""``torch.compile(fullgraph=True)`` over nnfast modules: no graph break, same numbers.

Under the interpreter (the default in tests) the block runs through the registered custom
ops, so this checks their fake implementations and autograd registration; with
``NNFAST_TEST_INTERPRET=0`` it checks that the reference path compiles too.
"""

import pytest
import torch
from torch import nn

import nnfast


class Block(nn.Module):
    """A pre-norm Llama-style block built only from nnfast modules."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.norm1 = nnfast.RMSNorm(dim)
        self.attn = nnfast.SelfAttention(dim, heads, kv_heads, rope=True, max_seq_len=64)
        self.norm2 = nnfast.LayerNorm(dim)
        self.mlp = nnfast.SwiGLU(dim, 48)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h, x = self.norm2.forward_residual(x, torch.zeros_like(x))
        return x + self.mlp(h)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_block_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(2, 11, 32)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()

    y_eager = block(x1)
    y_eager.square().sum().backward()
    g_eager = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    y = compiled(x2)
    y.square().sum().backward()

    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    for n, p in block.named_parameters():
        torch.testing.assert_close(p.grad, g_eager[n], rtol=1e-4, atol=1e-5, msg=n)


def test_compile_before_any_eager_call():
    """A fresh process whose first nnfast call is traced by torch.compile(fullgraph=True):
    the backend decision must be traceable then (it once compared the environment's value
    with a sentinel object, which dynamo cannot do; later calls hit the cache, so only a
    fresh process shows it)."""
    import subprocess
    import sys

    code = ("import torch, nnfast\n"
            "m = nnfast.SwiGLU(16, 32)\n"
            "x = torch.randn(2, 16)\n"
            "y = torch.compile(m, fullgraph=True, backend='eager')(x)\n"
            "torch.testing.assert_close(y, m(x))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
