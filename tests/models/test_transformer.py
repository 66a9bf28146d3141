"""The original Transformer: kernels vs the reference backend, label smoothing, causality,
cached generation, bad input, the generated task, and learning it in a few steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as torch_F

import nnfast.models as models
from nnfast._backend import use_triton
from nnfast.models import objectives
from tests.helpers import assert_close_lowp

KERNELS_RUN = use_triton(torch.empty(0)) or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="the Triton kernels cannot run here")


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return models.create("transformer", preset="debug", **overrides).to(DEVICE)


def _batch(model, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    b = objectives.transduction_task(B, c.n_symbols, c.min_len, c.max_len, model.pad_id,
                                     model.bos_id, model.eos_id, c.task, generator=g)
    return {k: v.to(DEVICE) for k, v in b.items()}


@requires_kernels
def test_kernels_match_reference(monkeypatch):
    m = _model()
    b = _batch(m)
    out = {}
    for backend in ("auto", "torch"):
        monkeypatch.setenv("NNFAST_BACKEND", backend)
        m.zero_grad(set_to_none=True)
        loss = m(**b)[1]
        loss.backward()
        out[backend] = loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}
    assert_close_lowp("loss", out["auto"][0], out["torch"][0], out["torch"][0])
    for name, ref in out["torch"][1].items():
        assert_close_lowp(name, out["auto"][1][name], ref, ref, factor=3.0)


def test_label_smoothing_loss(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    m = _model()
    b = _batch(m)
    assert m.config.label_smoothing == 0.1
    logits = m(b["src"], b["tgt_in"])[0]
    want = torch_F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(),
                                 label_smoothing=0.1)
    torch.testing.assert_close(m(**b)[1], want, atol=1e-5, rtol=1e-5)


@requires_kernels
def test_padding_and_causality():
    m = _model().eval()
    b = _batch(m)
    real = b["src"] != m.pad_id
    with torch.no_grad():
        ref = m(b["src"], b["tgt_in"], src_mask=real)[0]
        out = m(torch.where(real, b["src"], 3), b["tgt_in"], src_mask=real)[0]
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        t = 3
        tgt = b["tgt_in"].clone()
        tgt[:, t] = (tgt[:, t] + 1) % m.config.vocab_size
        out = m(b["src"], tgt)[0]
    torch.testing.assert_close(out[:, :t], ref[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, t], ref[:, t], atol=1e-4)


@requires_kernels
@pytest.mark.parametrize("backend,overrides", [
    ("auto", {}),
    # The other stack options (pre-norm, RMSNorm, learned positions) on the fast path.
    ("torch", {"pos": "learned", "prenorm": True, "norm": "rmsnorm"}),
])
def test_cached_generation_equals_uncached(backend, overrides, monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    m = _model(seed=3, **overrides)
    src = _batch(m)["src"]
    a = m.generate(src, 7, m.bos_id, use_cache=True)
    b = m.generate(src, 7, m.bos_id, use_cache=False)
    assert a.shape == (3, 8) and torch.equal(a, b)


def test_bad_input(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    m = _model()
    b = _batch(m)
    with pytest.raises(ValueError, match="src_mask must be a bool tensor of shape"):
        m(b["src"], b["tgt_in"], src_mask=torch.ones(3, 1, 1, b["src"].shape[1], dtype=bool))
    with pytest.raises(ValueError, match="src length 33 exceeds block_size 32"):
        m(torch.zeros(3, 33, dtype=torch.long, device=DEVICE), b["tgt_in"])
    with pytest.raises(ValueError, match=r"tgt_in ids must be in \[0, 100\), got -1\.\.99"):
        m(b["src"], b["tgt_in"].index_fill(1, torch.tensor([0, 1]).to(DEVICE), -1)
          .index_fill(1, torch.tensor([2]).to(DEVICE), 99))
    with pytest.raises(ValueError, match="max_len < block_size"):
        models.create("transformer", preset="debug", max_len=40)
    with pytest.raises(ValueError, match="task must be"):
        models.create("transformer", preset="debug", task="copy")


@pytest.mark.parametrize("task", ["reverse", "sort"])
def test_task_batches(task):
    g = torch.Generator().manual_seed(0)
    pad, bos, eos = 10, 11, 12
    b = objectives.transduction_task(50, 10, 2, 7, pad, bos, eos, task, generator=g)
    for src, tgt_in, tgt in zip(b["src"].tolist(), b["tgt_in"].tolist(), b["targets"].tolist()):
        n = src.index(eos)
        assert 2 <= n <= 7 and all(t == pad for t in src[n + 1:])
        s = src[:n]
        want = s[::-1] if task == "reverse" else sorted(s)
        assert tgt[:n + 1] == [*want, eos] and all(t == -100 for t in tgt[n + 1:])
        assert tgt_in[0] == bos and tgt_in[1:n + 1] == want


def test_learns_the_task(monkeypatch):
    """A hand-written AdamW loop on prepare_batch: the loss falls; on held-out strings the
    model beats chance by far (teacher-forced token accuracy)."""
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    m = _model(n_symbols=5, min_len=2, max_len=5, label_smoothing=0.0, task="sort")
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    torch.manual_seed(0)
    x = torch.zeros(64, 8, dtype=torch.long, device=DEVICE)
    losses = []
    for _ in range(90):
        loss = m(**m.prepare_batch(x, x))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    m.eval()
    metrics = m.metrics(**_batch(m, B=64, seed=99))
    assert metrics["token_acc"] > 0.7  # chance ~1/6 (5 symbols + EOS)
    assert metrics["exact_match"] > 0.3  # greedy decoding with the KV cache
