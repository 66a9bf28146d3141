"""BERT: kernels vs the reference backend, padding invariance, bad input, MLM masking
statistics, the trainer hooks, a few training steps, and the published parameter count."""

from __future__ import annotations

import pytest
import torch

import nnfast.models as models
from nnfast._backend import use_triton
from nnfast.models import objectives
from tests.helpers import assert_close_lowp

KERNELS_RUN = use_triton(torch.empty(0)) or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="the Triton kernels cannot run here")


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return models.create("bert", preset="debug", **overrides).to(DEVICE)


def _batch(model, B=3, T=13, seed=1):
    """MLM batch with rows of lengths T, T-4, 5 (the rest padding)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    idx = torch.randint(0, c.vocab_size, (B, T), generator=g)
    lengths = torch.tensor([T, T - 4, 5])[:B, None]
    real = torch.arange(T) < lengths
    idx = torch.where(real, idx, model.pad_id)
    targets = torch.where(real & (torch.rand(B, T, generator=g) < 0.4), idx, -100)
    targets[0, 0] = idx[0, 0]  # at least one target
    idx = torch.where(targets != -100, model.mask_id, idx)
    return idx.to(DEVICE), targets.to(DEVICE), real.to(DEVICE)


def _loss_and_grads(model, backend, monkeypatch, **batch):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    model.zero_grad(set_to_none=True)
    loss = model(**batch)[1]
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@requires_kernels
def test_kernels_match_reference(monkeypatch):
    m = _model()
    idx, targets, real = _batch(m)
    kw = dict(idx=idx, targets=targets, padding_mask=real)
    loss_k, grads_k = _loss_and_grads(m, "auto", monkeypatch, **kw)
    loss_r, grads_r = _loss_and_grads(m, "torch", monkeypatch, **kw)
    assert_close_lowp("loss", loss_k, loss_r, loss_r)
    assert grads_k.keys() == grads_r.keys() and len(grads_r) == len(list(m.parameters()))
    for name in grads_r:
        assert_close_lowp(name, grads_k[name], grads_r[name], grads_r[name], factor=3.0)


@requires_kernels
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_padding_never_changes_real_positions(backend, monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    m = _model().eval()
    idx, _, real = _batch(m)
    g = torch.Generator().manual_seed(5)
    other = torch.randint(0, m.config.vocab_size, idx.shape, generator=g).to(DEVICE)
    perturbed = torch.where(real, idx, other)  # padded tokens become arbitrary words
    with torch.no_grad():
        a = m(idx, padding_mask=real)[0]
        b = m(perturbed, padding_mask=real)[0]
    assert torch.equal(a[real], b[real]) or torch.allclose(a[real], b[real], atol=1e-6, rtol=0)
    # ... and the mask matters: without it the perturbation reaches the real positions.
    with torch.no_grad():
        c = m(perturbed, padding_mask=torch.ones_like(real))[0]
    assert not torch.allclose(a[real], c[real], atol=1e-3)


def test_bad_input(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    m = _model()
    idx, targets, real = _batch(m)
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor of shape"):
        m(idx, padding_mask=real[:, :-1])
    with pytest.raises(ValueError, match="padding_mask must be a bool"):
        m(idx, padding_mask=real.float())
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        m(torch.zeros(1, 33, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"idx ids must be in \[0, 101\), got 0\.\.101"):
        m(torch.full((1, 4), 101, device=DEVICE).index_fill_(1, torch.tensor([0]).to(DEVICE), 0))
    with pytest.raises(ValueError, match="token_type_ids ids must be in"):
        m(idx, token_type_ids=torch.full_like(idx, 2))
    with pytest.raises(ValueError, match="targets must have idx's shape"):
        m(idx, targets[:, 1:])
    with pytest.raises(ValueError, match="idx must be an int32/int64"):
        m(idx.float())


def test_mlm_mask_statistics():
    g = torch.Generator().manual_seed(0)
    V, mask_id = 1000, 1001
    ids = torch.randint(0, V, (256, 512), generator=g)
    eligible = torch.rand(ids.shape, generator=g) < 0.9
    inputs, targets = objectives.mlm_mask(ids, eligible, mask_id, V, 0.15, generator=g)
    chosen = targets != -100
    n = int(chosen.sum())
    assert not (chosen & ~eligible).any()
    assert torch.equal(targets[chosen], ids[chosen])
    assert abs(n / int(eligible.sum()) - 0.15) < 0.005  # ~104k eligible: std ~0.0011
    masked = (inputs == mask_id) & chosen
    unchanged = (inputs == ids) & chosen
    replaced = chosen & ~masked & ~unchanged
    assert abs(int(masked.sum()) / n - 0.8) < 0.01
    # A random replacement equal to the original (1/V) counts as unchanged.
    assert abs(int(unchanged.sum()) / n - 0.1) < 0.01
    assert abs(int(replaced.sum()) / n - 0.1) < 0.01
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert int(inputs[replaced].max()) < V


def test_prepare_batch():
    m = _model(pad_fraction=0.5)
    torch.manual_seed(3)
    x = torch.randint(0, m.config.vocab_size, (64, 32), device=DEVICE)
    b = m.prepare_batch(x, x)
    idx, targets, real = b["idx"], b["targets"], b["padding_mask"]
    assert idx.shape == (64, 32) and (idx[:, 0] == m.cls_id).all()
    lengths = real.sum(1)
    assert (lengths >= 3).all() and (lengths < 32).any() and (lengths == 32).any()
    assert (idx.gather(1, lengths[:, None] - 1) == m.sep_id).all()
    assert (idx[~real] == m.pad_id).all()
    chosen = targets != -100
    assert chosen.any() and not (chosen & ~real).any()
    assert (targets[chosen] < m.config.vocab_size).all()  # never a special token
    # Unmasked real text is the window's, shifted by the [CLS].
    keep = real & ~chosen
    keep[:, 0] = False
    keep.scatter_(1, lengths[:, None] - 1, False)
    shifted = torch.cat((x[:, :1], x[:, :31]), 1)
    assert torch.equal(idx[keep], shifted[keep])


def test_loss_falls_and_metrics(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    torch.manual_seed(0)
    # A tiny repetitive corpus the MLM can learn: every window is the same 30 tokens.
    x = torch.arange(30, device=DEVICE).repeat(8, 1) % m.config.vocab_size
    losses = []
    for _ in range(30):
        batch = m.prepare_batch(x, x)
        loss = m(**batch)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    m.eval()
    acc = m.metrics(**m.prepare_batch(x, x))["mlm_acc"]
    assert 0.3 < acc <= 1.0


def test_parameter_count_and_flops():
    with torch.device("meta"):
        m = models.create("bert", preset="bert-base", vocab_size=30522 - 4)
    # Hugging Face's BertForMaskedLM(bert-base-uncased): 109,514,298.
    assert m.num_params() == 109_514_298
    assert m.config.total_vocab == 30522
    dense = m.num_params(exclude_embeddings=True)
    assert dense == 109_514_298 - 512 * 768 - 2 * 768
    assert m.estimate_flops_per_token(128) == 6 * dense + 12 * 12 * 768 * 128
    assert m.estimate_mfu(1000.0, peak=1e12, seq_len=128) == pytest.approx(
        1000.0 * m.estimate_flops_per_token(128) / 1e12)
    assert {"bert-base", "bert-small", "debug"} <= set(models.list_models()["bert"])
