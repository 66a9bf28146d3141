"""The progressively grown GPT: the function is unchanged at growth, copies share storage,
parameter counts after each growth, checkpoints across a growth step, optimizer groups,
and learning across a growth with the optimizer rebuilt.

All but the kernel test pin ``NNFAST_BACKEND=torch`` (the reference path) for speed.
"""

from __future__ import annotations

import io

import pytest
import torch

import nnfast.models as models
from nnfast.models.progressive import Gated, LoRALinear, ProgressiveGPT

V = 97  # the debug preset's vocabulary


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")


def _model(seed: int = 0, **overrides) -> ProgressiveGPT:
    torch.manual_seed(seed)
    overrides.setdefault("fused_loss", False)
    return models.create("progressive-gpt", "debug", **overrides)


def _perturb(model: ProgressiveGPT, seed: int = 1) -> None:
    """Noise on every parameter (adapters and gates included), as training would leave."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _idx(T: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


LLAMA_STYLE = {"mlp": "swiglu", "pos": "rope", "norm": "rmsnorm", "bias": False,
               "multiple_of": 16}


@pytest.mark.parametrize("style", [{}, LLAMA_STYLE], ids=["gpt2", "llama"])
def test_function_unchanged_at_growth(torch_backend, style):
    model = _model(**style).eval()
    _perturb(model)  # a trained-looking stage-0 model
    idx = _idx()
    before = model(idx)[0]
    assert model.maybe_grow(2) and len(model.blocks) == 4
    torch.testing.assert_close(model(idx)[0], before, atol=0, rtol=0)
    _perturb(model, seed=2)  # adapters and gates moved: now the copies matter
    before = model(idx)[0]
    assert model.maybe_grow(4) and len(model.blocks) == 8
    torch.testing.assert_close(model(idx)[0], before, atol=0, rtol=0)


def test_growth_without_gates_would_change_the_function(torch_backend):
    """Guard for the test above: a copy with its gate open is not the identity."""
    model = _model().eval()
    idx = _idx()
    before = model(idx)[0]
    model.maybe_grow(2)
    with torch.no_grad():
        model.blocks[1].attn.gate.fill_(1.0)
    assert not torch.allclose(model(idx)[0], before)


def test_copies_share_storage(torch_backend):
    model = _model()
    model.grow_to(2)
    n0 = model.config.n_layer
    assert len(model.blocks) == 4 * n0
    for j, block in enumerate(model.blocks):
        base = model.blocks[j - j % 4]  # original i at 4i, its copies right after it
        attn = block.attn.inner if isinstance(block.attn, Gated) else block.attn
        base_attn = base.attn
        mlp = block.mlp.inner if isinstance(block.mlp, Gated) else block.mlp
        assert isinstance(attn.qkv, LoRALinear) and isinstance(mlp.fc, LoRALinear)
        assert attn.qkv.base.weight.data_ptr() == base_attn.qkv.base.weight.data_ptr()
        assert attn.qkv.base.weight is base_attn.qkv.base.weight
        assert mlp.proj.base.bias is base.mlp.proj.base.bias
        assert block.norm1.weight is base.norm1.weight
        if j % 4:  # a copy: its own adapters and gates
            assert attn.qkv.lora_A.data_ptr() != base_attn.qkv.lora_A.data_ptr()
            assert attn.qkv.lora_B.data_ptr() != base_attn.qkv.lora_B.data_ptr()
            assert block.attn.gate.item() == 0.0 and block.mlp.gate.item() == 0.0
        else:  # an original: no gate
            assert not isinstance(block.attn, Gated)
    # A shared weight's gradient is the sum over its uses.
    _perturb(model)
    model.zero_grad()
    model(_idx(), _idx(seed=1))[1].backward()
    w = model.blocks[0].attn.qkv.base.weight
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_param_counts_after_each_growth(torch_backend):
    model = _model()
    c = model.config
    d, r, hidden = c.n_embd, c.lora_rank, c.hidden_dim
    qkv_out = (c.n_head + 2 * c.n_kv_head) * c.head_dim
    # in + out features of every adapted Linear: qkv, attention proj, MLP fc and proj.
    per_block = r * ((d + qkv_out) + (d + d) + (d + hidden) + (hidden + d))
    p0 = model.num_params()
    # The stage-0 model is a GPT-2 of the same config.
    assert p0 == models.create("gpt2", "debug", n_layer=c.n_layer).num_params()
    for stage in (1, 2):
        model.grow()
        n_blocks = c.n_layer * 2**stage
        copies = n_blocks - c.n_layer
        expected = p0 + n_blocks * per_block + 2 * copies  # two gates per copy
        assert len(model.blocks) == n_blocks
        assert model.num_params() == expected
        # Counted with repetition, the shared base appears once per block.
        with_rep = sum(p.numel() for b in model.blocks for p in b.parameters())
        base_block = sum(p.numel() for p in model.blocks[0].parameters()) - per_block
        assert with_rep == n_blocks * (base_block + per_block) + 2 * copies


def test_checkpoint_after_growth_loads_into_fresh_model(torch_backend):
    model = _model().eval()
    model.maybe_grow(4)
    _perturb(model)
    idx = _idx()
    expected = model(idx)[0]
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _model(seed=5).eval()  # another init, stage 0
    assert fresh.stage == 0
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.stage == 2 and len(fresh.blocks) == len(model.blocks)
    torch.testing.assert_close(fresh(idx)[0], expected, atol=0, rtol=0)
    # Still sharing after the load (the load copied into the shared storage).
    assert fresh.blocks[1].attn.inner.qkv.base.weight is fresh.blocks[0].attn.qkv.base.weight
    # The trainer calls maybe_grow with the resumed step: no second growth.
    assert not fresh.maybe_grow(4)
    with pytest.raises(ValueError, match="shrink"):
        fresh.grow_to(1)


def test_optim_groups(torch_backend):
    model = _model(base_lr_scale=0.5)
    groups = model.optim_groups(0.1, lr=1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all("lr" not in g for g in groups)  # stage 0: one ordinary model
    model.grow()
    groups = model.optim_groups(0.1, lr=1e-3)
    base = {id(p) for p in model.base_parameters()}
    assert base and sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= base or not ids & base
        if ids <= base:
            assert g["lr"] == pytest.approx(5e-4) and g["lr_scale"] == 0.5
        else:
            assert "lr" not in g
        assert g["weight_decay"] == (0.1 if g["params"][0].dim() >= 2 else 0.0)
    with pytest.warns(UserWarning, match="lr="):
        model.optim_groups(0.1)
    frozen = _model(base_lr_scale=0.0)
    frozen.grow()
    assert all(not p.requires_grad for p in frozen.base_parameters())
    trainable = {id(p) for g in frozen.optim_groups(0.1, lr=1e-3) for p in g["params"]}
    assert not trainable & {id(p) for p in frozen.base_parameters()}
    assert trainable == {id(p) for p in frozen.parameters() if p.requires_grad}


def test_config_and_schedule(torch_backend):
    model = models.create("progressive-gpt", "debug", grow_at="3")
    assert not model.maybe_grow(2)
    assert model.maybe_grow(3) and not model.maybe_grow(3) and not model.maybe_grow(100)
    assert model.stage == 1
    cfg = models.make_config("progressive-gpt", "debug")
    assert type(cfg)(**{**vars(cfg), "grow_at": (5, 9)}).grow_steps == (5, 9)
    for bad in ({"grow_at": "5,3"}, {"grow_at": "x"}, {"lora_rank": 0},
                {"base_lr_scale": -1.0}):
        with pytest.raises(ValueError):
            models.create("progressive-gpt", "debug", **bad)
    big = models.create("progressive-gpt")  # shakespeare-char: 3 -> 6 -> 12 layers of 384
    assert len(big.blocks) == 3 and big.config.grow_steps == (1000, 2000)
    flops0 = big.estimate_flops_per_token()
    big.grow_to(2)
    gpt12 = models.create("gpt2", "shakespeare-char", n_layer=12)
    # Shared weights count once per use: the FLOPs of a 12-layer GPT plus the adapters'.
    assert gpt12.estimate_flops_per_token() < big.estimate_flops_per_token()
    assert big.estimate_flops_per_token() < 1.1 * gpt12.estimate_flops_per_token()
    assert big.estimate_flops_per_token() > 3 * flops0
    out = big.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0)
    ref = big.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0, use_cache=False)
    assert torch.equal(out, ref)  # one KV cache per grown block


def test_loss_falls_across_growth(torch_backend):
    """A hand-written loop like the trainer's: AdamW rebuilt when maybe_grow says so."""
    words = "the quick brown fox jumps over the lazy dog and seven wise owls".split()
    state, text = 7, []
    for _ in range(1000):
        state = (1103515245 * state + 12345) % 2**31
        text.append(words[state % len(words)])
    data = torch.tensor([ord(ch) - 32 for ch in " ".join(text)])
    model = _model(grow_at="40", base_lr_scale=0.1, fused_loss=True)
    gen = torch.Generator().manual_seed(0)
    lr, losses, opt = 3e-3, [], None
    for step in range(80):
        if model.maybe_grow(step) or opt is None:
            opt = torch.optim.AdamW(model.optim_groups(0.0, lr=lr), lr=lr)
        starts = torch.randint(0, len(data) - 33, (16,), generator=gen)
        x = torch.stack([data[s:s + 32] for s in starts])
        y = torch.stack([data[s + 1:s + 33] for s in starts])
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(model.blocks) == 4
    # Growth itself does not disturb the loss (same function)...
    assert abs(losses[40] - losses[39]) < 0.3
    # ...and the grown model keeps learning.
    assert sum(losses[-5:]) / 5 < sum(losses[35:40]) / 5 - 0.1
    assert losses[-1] < 0.6 * losses[0]
    copy_gate = model.blocks[1].attn.gate
    assert copy_gate.item() != 0.0  # the copies opened up


def test_interpreted_kernels_growth(monkeypatch):
    """The default path (Triton kernels; interpreted on CPU): the function is unchanged at
    growth there too, and matches the reference path."""
    torch.manual_seed(0)
    model = models.create("progressive-gpt", "debug", n_layer=1, fused_loss=False).eval()
    _perturb(model)
    idx = _idx(T=9)
    before = model(idx)[0]
    model.grow()
    after = model(idx)[0]
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    _perturb(model, seed=3)
    out = model(idx)[0]
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    ref = model(idx)[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
