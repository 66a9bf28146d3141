"""T5: kernels vs the reference backend (the relative-bias gradient included), the bucket
function, padding, causality, cached generation, bad input, span corruption, a few training
steps, and the parameter counts of the published original T5."""

from __future__ import annotations

import pytest
import torch

import nnfast.models as models
from nnfast._backend import use_triton
from nnfast.models import objectives
from nnfast.models.encoder import relative_bucket
from tests.helpers import assert_close_lowp

KERNELS_RUN = use_triton(torch.empty(0)) or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="the Triton kernels cannot run here")


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return models.create("t5", preset="debug", **overrides).to(DEVICE)


def _batch(model, B=2, S=11, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    src = torch.randint(0, V, (B, S), generator=g)
    src_mask = torch.arange(S) < torch.tensor([S, S - 4])[:B, None]
    src = torch.where(src_mask, src, model.pad_id)
    tgt_in = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, -2:] = -100
    return {k: v.to(DEVICE) for k, v in
            dict(src=src, tgt_in=tgt_in, targets=targets, src_mask=src_mask).items()}


def _loss_and_grads(model, backend, monkeypatch, batch):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    model.zero_grad(set_to_none=True)
    loss = model(**batch)[1]
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@requires_kernels
def test_kernels_match_reference_with_bias_gradient(monkeypatch):
    m = _model()
    batch = _batch(m)
    loss_k, grads_k = _loss_and_grads(m, "auto", monkeypatch, batch)
    loss_r, grads_r = _loss_and_grads(m, "torch", monkeypatch, batch)
    assert_close_lowp("loss", loss_k, loss_r, loss_r)
    assert grads_k.keys() == grads_r.keys() and len(grads_r) == len(list(m.parameters()))
    for name in ("enc_bias.table.weight", "dec_bias.table.weight"):
        assert grads_r[name].abs().max() > 0  # the bias learns through the attention mask
    for name in grads_r:
        assert_close_lowp(name, grads_k[name], grads_r[name], grads_r[name], factor=3.0)


def test_relative_bucket_values():
    rel = torch.tensor([0, -1, 1, -7, -8, -12, -16, -127, -128, -1000, 7, 8, 1000])
    # Bidirectional, 32 buckets (16 per direction, 8 exact), max distance 128:
    # |r| >= 8 maps to 8 + floor(log(|r|/8) / log(16) * 8), capped at 15; r > 0 adds 16.
    got = relative_bucket(rel, True, 32, 128).tolist()
    assert got == [0, 1, 17, 7, 8, 9, 10, 15, 15, 15, 23, 24, 31]
    # Causal: 32 buckets for the past (16 exact), the future all in bucket 0;
    # distance 32 -> 16 + floor(log(32/16) / log(128/16) * 16) = 16 + floor(5.33) = 21.
    got = relative_bucket(torch.tensor([0, 1, 5, -1, -15, -16, -32, -128, -500]), False, 32,
                          128).tolist()
    assert got == [0, 0, 0, 1, 15, 16, 21, 31, 31]


@requires_kernels
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_encoder_padding_and_decoder_causality(backend, monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    m = _model().eval()
    b = _batch(m)
    with torch.no_grad():
        ref = m(b["src"], b["tgt_in"], src_mask=b["src_mask"])[0]
        # Perturb the padded source tokens: nothing changes.
        other = torch.where(b["src_mask"], b["src"], 5)
        out = m(other, b["tgt_in"], src_mask=b["src_mask"])[0]
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        # Change decoder input token t: logits before t stay, logits at t move.
        t = 4
        tgt = b["tgt_in"].clone()
        tgt[:, t] = (tgt[:, t] + 1) % m.config.vocab_size
        out = m(b["src"], tgt, src_mask=b["src_mask"])[0]
    torch.testing.assert_close(out[:, :t], ref[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, t], ref[:, t], atol=1e-4)


@requires_kernels
def test_cached_generation_equals_uncached():
    m = _model(seed=2)
    src = _batch(m)["src"]
    a = m.generate(src, 7, m.pad_id, use_cache=True)
    b = m.generate(src, 7, m.pad_id, use_cache=False)
    assert a.shape == (2, 8) and torch.equal(a, b)


def test_bad_input(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    m = _model()
    b = _batch(m)
    with pytest.raises(ValueError, match="src_mask must be a bool tensor of shape"):
        m(b["src"], b["tgt_in"], src_mask=b["src_mask"][:, :3])
    with pytest.raises(ValueError, match="src length 65 exceeds block_size 64"):
        m(torch.zeros(1, 65, dtype=torch.long, device=DEVICE), b["tgt_in"][:1])
    with pytest.raises(ValueError, match="tgt_in length 65 exceeds block_size 64"):
        m(b["src"][:1], torch.zeros(1, 65, dtype=torch.long, device=DEVICE))
    V = m.config.total_vocab
    with pytest.raises(ValueError, match=rf"src ids must be in \[0, {V}\)"):
        m(b["src"] + V, b["tgt_in"])
    with pytest.raises(ValueError, match=r"tgt_in ids must be in \[0, "):
        m(b["src"], b["tgt_in"] - 200)
    with pytest.raises(ValueError, match="targets must have tgt_in's shape"):
        m(b["src"], b["tgt_in"], b["targets"][:, :3])


def test_span_corruption_round_trip_and_shape():
    torch.manual_seed(0)
    V, n_sent = 50, 20
    sentinels = torch.arange(n_sent) + V + 2
    eos = V + 1
    ids = torch.randint(0, V, (64, 100))
    inputs, targets = objectives.span_corrupt(ids, sentinels, eos, 0.15, 3.0)
    n_noise, n_spans = objectives.span_shape(100, 0.15, 3.0)
    assert (n_noise, n_spans) == (15, 5)
    assert inputs.shape == (64, 100 - 15 + 5 + 1) and targets.shape == (64, 15 + 5 + 1)
    s = set(sentinels.tolist())
    for row_in, row_t, row in zip(inputs.tolist(), targets.tolist(), ids.tolist()):
        assert objectives.span_uncorrupt(row_in, row_t, s, eos) == row
        # Sentinels in order, each once, in both; the targets start with one.
        assert [t for t in row_in if t in s] == sentinels[:n_spans].tolist()
        assert [t for t in row_t if t in s] == sentinels[:n_spans].tolist()
        assert row_t[0] == sentinels[0] and row_in[-1] == row_t[-1] == eos
    # Spans vary: not every row has the same layout.
    assert len({tuple(r) for r in (inputs >= V + 2).int().tolist()}) > 10


def test_prepare_batch_fits_block_size():
    m = _model()
    torch.manual_seed(1)
    x = torch.randint(0, m.config.vocab_size, (4, m.config.block_size), device=DEVICE)
    b = m.prepare_batch(x, x)
    assert b["src"].shape[1] <= m.config.block_size
    assert torch.equal(b["tgt_in"][:, 1:], b["targets"][:, :-1])
    assert (b["tgt_in"][:, 0] == m.pad_id).all() and (b["targets"][:, -1] == m.eos_id).all()
    s = set(m.sentinel_ids.tolist())
    row = objectives.span_uncorrupt(b["src"][0].tolist(), b["targets"][0].tolist(), s, m.eos_id)
    assert row == x[0, :len(row)].tolist() and len(row) >= m.config.block_size - 8


def test_loss_falls_and_metrics(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    torch.manual_seed(0)
    x = (torch.arange(64, device=DEVICE) % 23).repeat(8, 1)  # a periodic "corpus"
    losses = []
    for _ in range(30):
        loss = m(**m.prepare_batch(x, x))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    m.eval()
    acc = m.metrics(**m.prepare_batch(x, x))["span_acc"]
    assert 0.3 < acc <= 1.0


def test_parameter_counts():
    with torch.device("meta"):
        # The published original T5 (ReLU MLP, tied head, 32128 embedding rows).
        small = models.create("t5", "t5-small", mlp="relu", tie_embeddings=True,
                              vocab_size=32128 - 102)
        base = models.create("t5", "t5-base", mlp="relu", tie_embeddings=True,
                             vocab_size=32128 - 102)
        ours = models.create("t5", "t5-small")
    assert small.num_params() == 60_506_624
    assert base.num_params() == 222_903_552
    # The v1.1 recipe on t5-small's shapes: gated MLP (+1 matrix per layer) and an untied head.
    d, f, V, L = 512, 2048, 32128, 6
    assert ours.num_params() == small.num_params() + 2 * L * d * f + V * d
    assert ours.estimate_flops_per_token(64) > 6 * ours.num_params(exclude_embeddings=True)
