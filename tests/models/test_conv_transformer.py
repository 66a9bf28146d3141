"""The token-merging transformer: causality at every position (and a non-shifted merge
that must leak), the decoders' contract, accounting, learning, and one pass through the
interpreted kernels.

All but the kernel test pin ``NNFAST_BACKEND=torch`` (the reference path) for speed.
"""

from __future__ import annotations

import pytest
import torch

import nnfast
import nnfast.models as models
from nnfast.models.conv_transformer import ConvTransformer, ConvTransformerConfig

V = 97  # the debug preset's vocabulary


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")


def _model(seed: int = 0, **overrides) -> ConvTransformer:
    torch.manual_seed(seed)
    model = models.create("conv-transformer", "debug", **overrides)
    # Random biases and norm gains: with the zero-init biases some dependencies would be
    # exactly zero at init and a leak through them could go unseen.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _leaks(model: ConvTransformer, idx: torch.Tensor) -> tuple[list[int], list[int]]:
    """For every t: change token t. Returns (positions t whose change moved a logit before
    t, positions t whose change did NOT move the logit at t)."""
    with torch.no_grad():
        base = model(idx)[0]  # (B, T, V)
        past, own = [], []
        for t in range(idx.shape[1]):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1 + t) % V
            logits = model(changed)[0]
            if not torch.equal(logits[:, :t], base[:, :t]):
                past.append(t)
            if torch.equal(logits[:, t], base[:, t]):
                own.append(t)
    return past, own


@pytest.mark.parametrize("T", [32, 13, 1])
def test_causal_at_every_position(torch_backend, T):
    """Changing token t never changes the logits before t (T = block_size, T not a
    multiple of the merge factors, T = 1), and always changes the logits at t."""
    model = _model(fused_loss=False)
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(T))
    past, own = _leaks(model, idx)
    assert past == [], f"changing these tokens moved earlier logits: {past}"
    assert own == [], f"changing these tokens did not move their own logits: {own}"


@pytest.mark.parametrize("merge", ["2,2", "4,3", "3,2"])
def test_causal_other_merge_factors(torch_backend, merge):
    model = _model(fused_loss=False, merge=merge)
    idx = torch.randint(0, V, (1, 23), generator=torch.Generator().manual_seed(1))
    assert _leaks(model, idx)[0] == []


def test_unshifted_merge_leaks(torch_backend):
    """The same model with the causal shift removed from its merges sees the future: the
    causality test above can fail."""
    model = _model(fused_loss=False)
    for merge in model.merges:
        merge.causal = False
    idx = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(0))
    past = _leaks(model, idx)[0]
    # Token t leaks into position t - 1 whenever t - 1 opens a window of the first merge.
    assert {1, 3, 5, 7, 9, 11} <= set(past)


def test_forward_contract(torch_backend):
    model = _model()
    c = model.config
    assert (c.vocab_size, c.block_size) == (V, 32)
    idx = torch.randint(0, V, (3, 20))
    targets = torch.randint(0, V, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 20, V) and loss is None
    last, _ = model(idx, last_only=True)
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    none, fused = model(idx, targets)
    assert none is None and fused.dim() == 0
    model.config.fused_loss = False
    logits2, plain = model(idx, targets)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(fused, plain)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(plain, expected)
    out = model.generate(idx[:, :5], 6, temperature=0)
    assert out.shape == (3, 11) and torch.equal(out[:, :5], idx[:, :5])
    # Greedy generation = argmax of the forward pass over the generated prefix.
    assert torch.equal(out[:, 5], model(idx[:, :5])[0][:, -1].argmax(-1))


def test_bad_input(torch_backend):
    model = _model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 4), V, dtype=torch.long))
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(1, 4))
    for bad in ({"widths": "16,32", "depths": "1,1,1"}, {"merge": "2"},
                {"widths": "16,30,64"}, {"depths": "1,0,1"}, {"widths": "a,b,c"}):
        with pytest.raises(ValueError):
            models.create("conv-transformer", "debug", **bad)


def test_single_level_is_a_decoder(torch_backend):
    """One level, no merge: the same blocks as a GPT-2 of that width."""
    model = _model(widths="32", depths="2", merge="")
    assert model.config.n_layer == 2 and len(model.merges) == 0
    gpt = models.create("gpt2", "debug", n_embd=32, n_head=2, n_layer=2)
    assert model.num_params() == gpt.num_params()


def test_accounting(torch_backend):
    big = models.create("conv-transformer")  # shakespeare-char
    gpt = models.create("gpt2", "shakespeare-char")
    assert big.config.level_widths == (48, 144, 496)
    # About GPT-2's shakespeare-char parameter count...
    assert 0.8 < big.num_params() / gpt.num_params() < 1.2
    # ...for fewer FLOPs per token: the wide levels run on T/2 and T/4 tokens.
    assert big.estimate_flops_per_token() < 0.6 * gpt.estimate_flops_per_token()
    model = _model()
    c = model.config
    n = model.num_params(exclude_embeddings=True)
    assert n == model.num_params() - c.block_size * 16
    # Every matmul parameter runs at most once per token, the wide ones less often.
    assert model.estimate_flops_per_token(32) < 6 * n + 12 * c.n_layer * 64 * 32
    assert model.estimate_mfu(1000.0, peak=1e12) == pytest.approx(
        1000.0 * model.estimate_flops_per_token() / 1e12)


def _corpus(n: int = 4000) -> torch.Tensor:
    words = "the quick brown fox jumps over the lazy dog and seven wise owls".split()
    state, out = 7, []
    for _ in range(n // 4):
        state = (1103515245 * state + 12345) % 2**31
        out.append(words[state % len(words)])
    return torch.tensor([ord(ch) - 32 for ch in " ".join(out)])


def test_loss_falls(torch_backend):
    torch.manual_seed(0)
    model = models.create("conv-transformer", "debug")
    data = _corpus()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        starts = torch.randint(0, len(data) - 33, (16,), generator=gen)
        x = torch.stack([data[s:s + 32] for s in starts])
        y = torch.stack([data[s + 1:s + 33] for s in starts])
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    counts = torch.bincount(data).float()
    probs = counts[counts > 0] / counts.sum()
    unigram = -(probs * probs.log()).sum().item()  # best loss without context, ~2.9 nats
    assert losses[0] > 4.0  # about log(97) at init
    # Well below the unigram entropy: the model uses its (causal) context.
    assert sum(losses[-5:]) / 5 < unigram - 0.8


def test_interpreted_kernels_match_reference(monkeypatch):
    """The default path (Triton kernels; interpreted on CPU): logits and loss gradients
    match the reference path, and a changed token leaves earlier logits alone."""
    cfg = ConvTransformerConfig(vocab_size=V, block_size=16, widths="16,32", depths="1,1",
                                merge="2", fused_loss=False)
    torch.manual_seed(0)
    model = ConvTransformer(cfg)
    idx = torch.randint(0, V, (1, 11))
    logits, loss = model(idx, idx)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    changed = idx.clone()
    changed[0, 6] = (changed[0, 6] + 1) % V
    with torch.no_grad():
        later = model(changed)[0]
    assert torch.equal(later[:, :6], logits[:, :6].detach())
    assert not torch.equal(later[:, 6], logits[:, 6].detach())
    model.zero_grad()
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    ref_logits, ref_loss = model(idx, idx)
    ref_loss.backward()
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-3, msg=n)
    assert isinstance(model.merges[0], nnfast.TokenMerge) and model.merges[0].causal
