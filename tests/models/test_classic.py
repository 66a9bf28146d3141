"""The classic small models (bigram, MLP, WaveNet, residual MLP): registry, shapes,
causality, learning, the counting bigram against hand counts, generation, and training
through ``python -m nnfast train``.

All but the kernel test pin ``NNFAST_BACKEND=torch``: resmlp's LayerNorm and MLP would
otherwise run the interpreted kernels, which only makes these tests slow.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

import nnfast.__main__ as cli
import nnfast.models as models
from nnfast import train as T
from nnfast._backend import use_triton

FAMILIES = ("bigram", "mlp", "wavenet", "resmlp")
# (family, preset overrides) for every kind of model: the count bigram is a mode of bigram,
# and the MLP with BatchNorm is checked next to Bengio's plain one.
VARIANTS = [
    ("bigram", {}),
    ("bigram", {"mode": "count"}),
    ("mlp", {}),
    ("mlp", {"batchnorm": True}),
    ("wavenet", {}),
    ("resmlp", {}),
]
IDS = ["bigram", "bigram-count", "mlp", "mlp-bn", "wavenet", "resmlp"]
WORDS = "the quick brown fox jumps over the lazy dog while seven wise owls watch".split()


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")


def _model(name, overrides=None, seed=0):
    torch.manual_seed(seed)
    return models.create(name, preset="debug", **(overrides or {}))


def _text(n_words: int = 2000) -> str:
    # Deterministic, learnable text: word sequences from a fixed LCG.
    state, words = 12345, []
    for _ in range(n_words):
        state = (1103515245 * state + 12345) % 2**31
        words.append(WORDS[state % len(WORDS)])
    return " ".join(words) + "\n"


def _randomize(model, seed=3):
    """A model whose rows differ: counts for the count bigram, noise on the parameters
    (the neural bigram starts as an all-zero table, every row the same)."""
    g = torch.Generator().manual_seed(seed)
    if getattr(model.config, "mode", None) == "count":
        V = model.config.vocab_size
        # Distinct counts: no ties, so greedy decoding is unambiguous.
        model.counts.copy_(torch.randperm(V * V, generator=g).view(V, V))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- registry
def test_registered_with_debug_and_default_presets():
    listed = models.list_models()
    for name in FAMILIES:
        assert "debug" in listed[name] and "shakespeare-char" in listed[name]
        m = models.create(name, vocab_size=65)  # the default preset
        assert m.config.vocab_size == 65 and m.config.block_size == 64
    assert "count" in listed["bigram"]
    assert models.create("bigram", preset="count").config.mode == "count"
    assert models.create("wavenet").config.context == 8
    assert models.create("resmlp", preset="debug", d_model=48).config.hidden_dim == 4 * 48


def test_config_errors():
    with pytest.raises(ValueError, match="context must be a power of 2"):
        models.create("wavenet", preset="debug", context=6)
    with pytest.raises(ValueError, match=r"context \(32\) must be <= block_size \(16\)"):
        models.create("mlp", preset="debug", context=32)
    with pytest.raises(ValueError, match="mode must be 'neural' or 'count'"):
        models.create("bigram", preset="debug", mode="trigram")
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        models.create("bigram", preset="count", alpha=-1.0)
    with pytest.raises(ValueError, match="n_hidden must be positive"):
        models.create("mlp", preset="debug", n_hidden=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        models.create("resmlp", preset="debug", dropout=1.0)


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=IDS)
def test_forward_shapes_and_initial_loss(name, overrides):
    m = _model(name, overrides)
    V = m.config.vocab_size
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (3, 11), generator=g)
    targets = torch.randint(0, V, (3, 11), generator=g)
    logits, loss = m(idx, targets)
    assert logits.shape == (3, 11, V) and loss.shape == ()
    # Zero table, empty counts, or a 10x-shrunk head: close to uniform at init.
    assert abs(loss.item() - math.log(V)) < 0.1
    m.eval()
    _randomize(m)
    full, none = m(idx)
    assert none is None
    last, _ = m(idx, last_only=True)
    assert last.shape == (3, 1, V)
    torch.testing.assert_close(last, full[:, -1:])
    # ignore_index drops positions from the mean.
    masked = targets.clone()
    masked[:, 5:] = -100
    expected = torch.nn.functional.cross_entropy(full[:, :5].flatten(0, 1),
                                                 targets[:, :5].flatten())
    torch.testing.assert_close(m(idx, masked)[1], expected)


def test_bad_input():
    m = _model("mlp")
    with pytest.raises(ValueError, match="token ids must be in"):
        m(torch.tensor([[0, 97]]))
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have idx's shape"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_causal_with_a_finite_window(name, overrides, mode):
    """Changing token t changes the logits at t .. t + context - 1 and nowhere else. In
    training mode BatchNorm's batch statistics mix positions, so those models are checked
    in eval mode only."""
    m = _model(name, overrides)
    _randomize(m)
    uses_bn = any(isinstance(x, torch.nn.BatchNorm1d) for x in m.modules())
    if mode == "train" and uses_bn:
        pytest.skip("BatchNorm normalizes with the whole batch in training mode")
    m.train(mode == "train")
    if uses_bn:  # non-trivial running statistics, so eval mode is not an identity BN
        m.train()
        with torch.no_grad():
            m(torch.randint(0, m.config.vocab_size, (8, 16)))
        m.eval()
    n, V, T_ = m.config.context, m.config.vocab_size, 16
    idx = torch.randint(0, V, (2, T_), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = m(idx)[0]
        for t in (0, 5, T_ - 1):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % V
            out = m(changed)[0]
            assert torch.equal(out[:, :t], base[:, :t]), f"position < {t} saw token {t}"
            assert torch.equal(out[:, t + n:], base[:, t + n:]), "context longer than set"
            for s in range(t, min(t + n, T_)):
                assert not torch.equal(out[:, s], base[:, s]), f"position {s} ignores token {t}"


# ----------------------------------------------------------------------------- learning
@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=IDS)
def test_loss_falls(name, overrides):
    """40 steps on a small character corpus: train loss well below log V."""
    text = _text(400)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    m = _model(name, {"vocab_size": len(chars), **overrides})
    params = list(m.parameters())
    opt = torch.optim.AdamW(params, lr=3e-2) if params else None
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        starts = torch.randint(0, len(ids) - 17, (16,), generator=g)
        xy = torch.stack([ids[s : s + 17] for s in starts])  # (B, T + 1)
        loss = m(xy[:, :-1], xy[:, 1:])[1]
        losses.append(loss.item())
        if opt:
            opt.zero_grad()
            loss.backward()
            opt.step()
    start = math.log(len(chars))
    assert abs(losses[0] - start) < 0.1
    assert sum(losses[-5:]) / 5 < start - 1.0, losses


def test_count_bigram_is_the_empirical_distribution():
    text = "abracadabra alakazam"
    chars = sorted(set(text))
    ids = [chars.index(c) for c in text]
    V = len(chars)
    pairs = Counter(zip(ids[:-1], ids[1:]))
    rows = Counter(ids[:-1])
    for alpha in (0.0, 0.5):
        m = models.create("bigram", preset="count", vocab_size=V, alpha=alpha).fit(ids)
        assert int(m.counts.sum()) == len(ids) - 1
        probs = m.log_probs().exp()
        for a in range(V):
            for b in range(V):
                if rows[a] == 0 and alpha == 0:
                    expected = 1 / V  # a token never followed by anything: uniform
                else:
                    expected = (pairs[a, b] + alpha) / (rows[a] + alpha * V)
                assert probs[a, b].item() == pytest.approx(expected, rel=1e-6), (a, b)
        # The model's logits are these log-probabilities.
        m.eval()
        logits = m(torch.tensor([ids[:8]]))[0]
        torch.testing.assert_close(logits[0], m.log_probs()[ids[:8]])
    # Several sequences: pairs never cross a boundary.
    m = models.create("bigram", preset="count", vocab_size=V).fit([ids[:5], ids[5:]])
    assert int(m.counts.sum()) == len(ids) - 2


def test_count_bigram_counts_in_training_forward():
    V = 7
    g = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, V, (2, 2, 9), generator=g)
    m = models.create("bigram", preset="count", vocab_size=V, block_size=9)
    _, loss = m(idx, targets)
    assert loss.item() == pytest.approx(math.log(V))  # measured before counting this batch
    assert loss.requires_grad  # the trainer's backward() is a no-op, not an error
    fitted = models.create("bigram", preset="count", vocab_size=V)
    fitted.add_counts(idx, targets)
    assert torch.equal(m.counts, fitted.counts) and int(m.counts.sum()) == 18
    m.eval()
    m(idx, targets)
    targets[0, 0] = -100
    m.train()
    m(idx, targets)
    assert int(m.counts.sum()) == 18 + 17  # eval does not count, ignored targets neither


def test_fit_errors():
    with pytest.raises(RuntimeError, match="fit needs mode='count'"):
        _model("bigram").fit([1, 2, 3])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 5\)"):
        models.create("bigram", preset="count", vocab_size=5).fit([1, 2, 5])


def test_flops_count_matmuls_only():
    m = _model("mlp")
    c = m.config
    fc = c.context * c.n_embd * c.n_hidden + c.n_hidden  # weight + bias
    matmul = fc + c.n_hidden * c.vocab_size + c.vocab_size
    assert m.estimate_flops_per_token() == 6 * matmul
    assert _model("bigram").estimate_flops_per_token() == 0  # a lookup table
    assert m.estimate_mfu(1e6, peak=1e12) == pytest.approx(1e6 * 6 * matmul / 1e12)


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=IDS)
def test_generate(name, overrides):
    m = _model(name, overrides)
    _randomize(m)
    m.train()
    prompt = torch.tensor([[1], [2]])
    out = m.generate(prompt, 20, temperature=0)
    assert out.shape == (2, 21) and torch.equal(out[:, :1], prompt)
    assert m.training  # restored
    # Greedy is the argmax of the model's own next-token logits at every step.
    m.eval()
    for t in range(1, 21):
        window = out[:, max(0, t - m.config.context) : t]
        assert torch.equal(out[:, t], m(window)[0][:, -1].argmax(-1))
    assert torch.equal(m.generate(prompt, 20, top_k=1), out)
    a = m.generate(prompt, 12, generator=torch.Generator().manual_seed(5), top_p=0.9)
    b = m.generate(prompt, 12, generator=torch.Generator().manual_seed(5), top_p=0.9)
    assert torch.equal(a, b) and int(a.max()) < m.config.vocab_size
    long_prompt = torch.randint(0, m.config.vocab_size, (1, 40))  # longer than block_size
    assert m.generate(long_prompt, 3).shape == (1, 43)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        m.generate(prompt, 1, top_k=0)


# ----------------------------------------------------------------------------- kernels
@pytest.mark.skipif(not (use_triton(torch.empty(0)) or torch.cuda.is_available()),
                    reason="the Triton kernels cannot run here")
def test_resmlp_kernels_match_reference(monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = _model("resmlp", {"n_layer": 1}).to(device)
    idx = torch.randint(0, m.config.vocab_size, (1, 5), device=device)
    monkeypatch.setenv("NNFAST_BACKEND", "triton")
    kernel = m(idx, idx)
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    reference = m(idx, idx)
    torch.testing.assert_close(kernel[0], reference[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- trainer
def _train_args(data: Path, out: Path, model: str, preset: str, steps: int) -> list[str]:
    args = {"model": model, "preset": preset, "data": data, "out": out, "max_steps": steps,
            "batch_size": 4, "warmup_steps": 1, "eval_interval": steps, "eval_steps": 2,
            "log_interval": 1, "sample_tokens": 8, "device": "cpu", "seed": 0}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(_text())
    return path


def test_cli_trains_wavenet(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *_train_args(corpus, out, "wavenet", "debug", 3)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert math.isfinite([r for r in rows if "val_loss" in r][-1]["val_loss"])
    assert len((out / "sample.txt").read_text()) > 8
    assert "model: wavenet/debug" in capsys.readouterr().out


# The trainer clips over no parameters (a count model has none) and torch warns about it.
@pytest.mark.filterwarnings("ignore:`parameters` is an empty generator")
def test_trainer_fills_count_bigram(corpus, tmp_path):
    argv = _train_args(corpus, tmp_path / "count", "bigram", "count", 3)
    cfg, overrides, resume, given = cli.parse_args(argv)
    res = T.train(cfg, overrides, resume, given, show_progress=False)
    m = res["model"]
    assert m.num_params() == 0
    # 3 steps of 4 windows of block_size 64: every (token, next) pair counted once.
    assert int(m.counts.sum()) == 3 * 4 * 64
    assert res["losses"][0] == pytest.approx(math.log(m.config.vocab_size))
    assert res["losses"][-1] < res["losses"][0] - 0.5 and res["val_loss"] < res["losses"][0]
    ckpt = T.load_checkpoint(tmp_path / "count" / "ckpt_0000003.pt")
    assert torch.equal(ckpt["model_state"]["counts"], m.counts)  # resumable
