"""End-to-end training step (forward + backward + AdamW) of GPT-2 124M and its Llama2
counterpart at batch x 1024 tokens: nnfast vs the same architecture in plain PyTorch.

The baseline is the very same model object with its nnfast modules swapped for plain
PyTorch ones (``F.layer_norm``/``F.rms_norm``, ``F.scaled_dot_product_attention``,
``F.gelu``/``F.silu``, materialized logits + ``F.cross_entropy``): same parameters, same
init, so the two differ only in the ops. Cases: nnfast eager, nnfast compiled, PyTorch eager,
PyTorch compiled (``torch.compile``, SDPA inside). ``extra_info`` records tokens/s, MFU
(``Decoder.estimate_mfu``, dense bf16 peak) and peak memory.

On CUDA: bf16 autocast, fused AdamW, ``NNFAST_BENCH_BATCH`` sequences of 1024 (default 16).
On CPU: a small model in fp32 (nnfast there runs its PyTorch reference path).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as torch_F

import nnfast
import nnfast.models as models
from benchmarks.conftest import CUDA, requires_cuda, train_step_bench

IMPLS = ("nnfast", "nnfast-compile", "torch", "torch-compile")


# ----------------------------------------------------------------------------- plain PyTorch
class _TorchLayerNorm(nnfast.LayerNorm):
    def forward(self, x):
        return torch_F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward_residual(self, x, residual):
        s = x + residual
        return self(s), s


class _TorchRMSNorm(nnfast.RMSNorm):
    def forward(self, x):
        return torch_F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def forward_residual(self, x, residual):
        s = x + residual
        return self(s), s


class _TorchMLP(nnfast.MLP):
    def forward(self, x):
        return self.dropout(self.proj(torch_F.gelu(self.fc(x), approximate="tanh")))


class _TorchSwiGLU(nnfast.SwiGLU):
    def forward(self, x):
        gate, up = self.gate_up(x).split(self.hidden_dim, dim=-1)
        return self.dropout(self.down(torch_F.silu(gate) * up))


def _rotate_half(x, cos, sin):
    """Hugging Face's RoPE (half-split pairs) in the activations' dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _TorchSelfAttention(nnfast.SelfAttention):
    def forward(self, x, attn_mask=None, cache=None, position_ids=None):
        B, T, _ = x.shape
        H, Hk, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hk * D, Hk * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hk, D).transpose(1, 2)  # (B, Hk, T, D)
        v = v.view(B, T, Hk, D).transpose(1, 2)
        if self.rotary is not None:
            cos = self.rotary.cos[:T].repeat(1, 2).to(q.dtype)  # (T, D)
            sin = self.rotary.sin[:T].repeat(1, 2).to(q.dtype)
            q, k = _rotate_half(q, cos, sin), _rotate_half(k, cos, sin)
        y = torch_F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout_p if self.training else 0.0, is_causal=True,
            enable_gqa=Hk != H,
        )  # (B, H, T, D)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, H * D)))


_SWAP = {nnfast.LayerNorm: _TorchLayerNorm, nnfast.RMSNorm: _TorchRMSNorm,
         nnfast.MLP: _TorchMLP, nnfast.SwiGLU: _TorchSwiGLU,
         nnfast.SelfAttention: _TorchSelfAttention}


def to_plain_torch(model: models.Decoder) -> models.Decoder:
    """The same model, computed with plain PyTorch ops (in place; parameters untouched)."""
    for module in model.modules():
        if type(module) in _SWAP:
            module.__class__ = _SWAP[type(module)]
    model.config.fused_loss = False
    return model


# ----------------------------------------------------------------------------- the step
def _setup(name, preset, impl, batch, seq, device, **overrides):
    torch.manual_seed(0)
    model = models.create(name, preset=preset, **overrides).to(device)
    if impl.startswith("torch"):
        to_plain_torch(model)
    fwd = torch.compile(model) if impl.endswith("compile") else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=device == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    V = model.config.vocab_size
    x = torch.randint(0, V, (batch, seq), generator=g).to(device)
    y = torch.randint(0, V, (batch, seq), generator=g).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        return loss

    return model, step


def _bench(benchmark, name, preset, impl, batch, seq, device, **overrides):
    model, step = _setup(name, preset, impl, batch, seq, device, **overrides)
    train_step_bench(benchmark, model, step, batch, seq, impl=impl, model=name, preset=preset,
                     rounds=10 if device == "cuda" else 5)


@requires_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,preset", [("gpt2", "gpt2-124m"), ("llama2", "llama2-124m")])
def test_train_step_cuda(benchmark, name, preset, impl):
    batch = int(os.environ.get("NNFAST_BENCH_BATCH", "16"))
    _bench(benchmark, name, preset, impl, batch, 1024, "cuda")


@pytest.mark.skipif(CUDA, reason="CPU benchmark: a GPU is present, its cases run instead")
@pytest.mark.parametrize("impl", ("nnfast", "torch"))
@pytest.mark.parametrize("name", ("gpt2", "llama2"))
def test_train_step_cpu(benchmark, name, impl):
    _bench(benchmark, name, "debug", impl, 4, 128, "cpu", n_layer=2, n_embd=128, n_head=4,
           n_kv_head=None if name == "gpt2" else 2, block_size=128, vocab_size=512)
