"""Training step (forward + backward + AdamW) of BERT-base (MLM) and T5-small (span
corruption) with padding: nnfast vs the same model in plain PyTorch, eager and compiled.

The baseline is the very same model object with ``nnfast.functional``'s ops swapped for plain
PyTorch ones while it runs (``F.layer_norm``/``F.rms_norm``, ``F.scaled_dot_product_attention``
with the same masks and float bias, ``F.gelu``, materialized logits + ``F.cross_entropy``):
same parameters, same batch. ``extra_info``: tokens/s (window tokens, padding included),
MFU and peak memory.

On CUDA: bf16 autocast, fused AdamW, BERT-base at ``NNFAST_BENCH_BATCH`` (default 32) x 512
with half the rows cut to a random length, T5-small at 32 x 512-token windows (encoder
inputs of ~453, targets of ~104) with a quarter of the encoder rows padded.
On CPU: debug-size models in fp32 (nnfast there runs its PyTorch reference path).
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as torch_F

import nnfast.functional as NF
import nnfast.models as models
from benchmarks.conftest import cpu_only, requires_cuda, train_step_bench

IMPLS = ("nnfast", "nnfast-compile", "torch", "torch-compile")


# ----------------------------------------------------------------------------- plain PyTorch
def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)  # PyTorch wants a float mask in q's dtype
    return torch_F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                dropout_p=dropout_p, is_causal=is_causal,
                                                scale=scale, enable_gqa=enable_gqa)


def _lce(input, weight, target, bias=None, ignore_index=-100, reduction="mean",
         label_smoothing=0.0):
    logits = torch_F.linear(input, weight, bias)
    return torch_F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(),
                                 ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=label_smoothing)


def _add_ln(x, residual, shape, weight=None, bias=None, eps=1e-5):
    s = x + residual
    return torch_F.layer_norm(s, shape, weight, bias, eps), s


def _add_rms(x, residual, shape, weight=None, eps=None):
    s = x + residual
    return torch_F.rms_norm(s, shape, weight, eps), s


PLAIN = dict(
    scaled_dot_product_attention=_sdpa, linear_cross_entropy=_lce,
    layer_norm=torch_F.layer_norm, rms_norm=torch_F.rms_norm,
    add_layer_norm=_add_ln, add_rms_norm=_add_rms,
    gelu=lambda x, approximate="none": torch_F.gelu(x, approximate=approximate),
    gelu_mul=lambda g, u, approximate="tanh": torch_F.gelu(g, approximate=approximate) * u,
)


def plain_torch():
    """While active, nnfast's models compute with plain PyTorch ops."""
    return mock.patch.multiple(NF, **PLAIN)


# ----------------------------------------------------------------------------- batches
def _bert_batch(model, batch, seq, device):
    model.config.pad_fraction = 0.5
    x = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    return model.prepare_batch(x, x)


def _t5_batch(model, batch, seq, device):
    x = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    b = model.prepare_batch(x, x)
    src = b["src"]
    S = src.shape[1]
    lengths = torch.full((batch, 1), S, device=device)
    cut = torch.rand(batch, 1, device=device) < 0.25
    lengths = torch.where(cut, torch.randint(S // 4, S + 1, (batch, 1), device=device), lengths)
    real = torch.arange(S, device=device) < lengths
    b["src"], b["src_mask"] = torch.where(real, src, model.pad_id), real
    return b


def _bench(benchmark, name, preset, impl, batch, seq, device, **overrides):
    torch.manual_seed(0)
    model = models.create(name, preset=preset, **overrides).to(device)
    fwd = torch.compile(model) if impl.endswith("compile") else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                            fused=device == "cuda")
    kw = (_bert_batch if name == "bert" else _t5_batch)(model, batch, seq, device)
    ctx = plain_torch if impl.startswith("torch") else contextlib.nullcontext

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            _, loss = fwd(**kw)
            loss.backward()
        opt.step()
        return loss

    real = int(kw["padding_mask"].sum()) if name == "bert" else int(kw["src_mask"].sum())
    real_fraction = real / kw["idx" if name == "bert" else "src"].numel()
    train_step_bench(benchmark, model, step, batch, seq, impl=impl, model=name, preset=preset,
                     real_fraction=real_fraction)


@requires_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,preset", [("bert", "bert-base"), ("t5", "t5-small")])
def test_encoder_train_step_cuda(benchmark, name, preset, impl):
    batch = int(os.environ.get("NNFAST_BENCH_BATCH", "32"))
    overrides = {"dropout": 0.0} if name == "bert" else {}
    _bench(benchmark, name, preset, impl, batch, 512, "cuda", **overrides)


@cpu_only
@pytest.mark.parametrize("impl", ("nnfast", "torch"))
@pytest.mark.parametrize("name", ("bert", "t5"))
def test_encoder_train_step_cpu(benchmark, name, impl):
    _bench(benchmark, name, "debug", impl, 4, 64, "cpu", block_size=64, n_embd=64, n_head=4)
