"""HellaSwag-format eval and ``generate``: on a briefly trained run (beats chance; the trainer's
``--eval_hellaswag`` rows), scores equal a direct computation, bad input, an HF folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import nnfast.__main__ as cli
from nnfast import data as D
from nnfast import evaluate as E
from nnfast.runs import RunError, load_run
from tests.test_train import WORDS, base_args, rows, run

LETTERS = sorted(set("".join(WORDS)))


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """These test eval and generate; interpreted kernels would only make them slow."""
    monkeypatch.setenv("NNFAST_BACKEND", "torch")


def make_hellaswag(path: Path, n: int = 24, seed: int = 0) -> Path:
    """Context: words of the corpus; the right ending: two more words; the wrong ones: random
    letters of the same length (a model that learned to spell tells them apart)."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ctx = " ".join(rng.choice(WORDS, 4))
        right = " ".join(rng.choice(WORDS, 2))
        wrong = ["".join(rng.choice(LETTERS, len(right))) for _ in range(3)]
        label = int(rng.integers(4))
        endings = wrong[:label] + [right] + wrong[label:]
        lines.append(json.dumps({"ctx": ctx, "endings": endings, "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained 60 steps with HellaSwag scored at steps 30 and 60."""
    tmp = tmp_path_factory.mktemp("hs")
    state, words = 7, []
    for _ in range(4000):
        state = (1103515245 * state + 12345) % 2**31
        words.append(WORDS[state % len(WORDS)])
    corpus = tmp / "corpus.txt"
    corpus.write_text(" ".join(words) + "\n")
    hs = make_hellaswag(tmp / "hellaswag.jsonl")
    out = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:  # module scope: before the autouse fixture
        mp.setenv("NNFAST_BACKEND", "torch")
        run(base_args(corpus, out, max_steps=60, lr=1e-2, block_size=32, batch_size=8,
                      eval_hellaswag=hs, eval_hellaswag_every=30, sample_tokens=0))
    return out, hs


def test_trained_run_beats_chance_and_cli_agrees(trained, capsys):
    out, hs = trained
    logged = [r for r in rows(out) if "hellaswag_acc" in r]
    assert [r["step"] for r in logged] == [30, 60]
    assert logged[-1]["hellaswag_acc_norm"] >= 0.75, logged  # chance: 0.25
    assert cli.main(["eval", str(out), "--task", "hellaswag", "--data", str(hs),
                     "--batch_size", "8"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 24 and res["acc"] == logged[-1]["hellaswag_acc"]
    assert res["acc_norm"] == logged[-1]["hellaswag_acc_norm"]


def test_scores_equal_a_direct_computation(trained):
    out, hs = trained
    loaded = load_run(out)
    model, tok = loaded.model, loaded.tokenizer
    examples = E.read_hellaswag(hs)[:6]
    rows_ = [r for ex in examples for r in E._rows(ex, tok, model.config.block_size)]
    batched = E.ending_logprobs(model, rows_, "cpu")
    right = 0
    for k, ex in enumerate(examples):
        ctx = [tok.stoi[c] for c in ex.ctx]
        sums = []
        for j, end in enumerate(ex.endings):
            end_ids = [tok.stoi[c] for c in " " + end]
            ids = (ctx + end_ids)[-model.config.block_size :]  # the oldest context goes
            with torch.no_grad():
                logits = model(torch.tensor([ids]))[0][0].double()
            logp = torch.log_softmax(logits, -1)
            first = len(ids) - len(end_ids)
            direct = torch.stack([logp[t - 1, ids[t]] for t in range(first, len(ids))])
            torch.testing.assert_close(batched[4 * k + j].double(), direct, rtol=1e-4,
                                       atol=1e-4)
            sums.append(direct.sum())
        right += int(torch.stack(sums).argmax()) == ex.label
    assert E.hellaswag(model, tok, examples, batch_size=4)["acc"] == right / len(examples)


def test_generate_uses_the_cache_and_is_repeatable(trained, capsys):
    out, _ = trained
    argv = ["generate", str(out), "--prompt", "the quick", "--max_new_tokens", "40",
            "--seed", "3"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("the quick")
    loaded = load_run(out)
    idx = torch.tensor([[loaded.tokenizer.stoi[c] for c in "the quick"]])
    greedy = [loaded.model.generate(idx, 40, temperature=0, use_cache=c)[0].tolist()
              for c in (True, False)]
    assert greedy[0] == greedy[1]  # KV cache == full recompute
    assert cli.main(["generate", str(out), "--prompt", "the quick", "--max_new_tokens", "40",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == loaded.tokenizer.decode(greedy[0]).strip()


@pytest.mark.parametrize("row,msg", [
    ({"ctx": "a", "endings": ["x", "y", "z"], "label": 0}, "field 'endings' has 3 endings"),
    ({"ctx": "a", "endings": ["w", "x", "y", "z"], "label": 4}, "field 'label' must be an int"),
    ({"endings": ["w", "x", "y", "z"], "label": 1}, "field 'ctx'"),
])
def test_bad_hellaswag_lines_name_file_line_and_field(tmp_path, row, msg):
    path = tmp_path / "hs.jsonl"
    good = {"ctx": "a", "endings": ["w", "x", "y", "z"], "label": 1}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(D.DataError, match=f"hs.jsonl:2: {msg}"):
        E.read_hellaswag(path)


def test_eval_without_a_checkpoint_is_one_line(tmp_path, capsys):
    hs = make_hellaswag(tmp_path / "hs.jsonl", n=2)
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", str(tmp_path / "empty"), "--data", str(hs)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty: no checkpoint" in err[0]
    with pytest.raises(RunError, match="no such run folder"):
        load_run(tmp_path / "missing")


def test_hf_folder(tmp_path, capsys):
    from nnfast import models
    from nnfast.models import hf

    if not hasattr(hf, "to_hf"):
        pytest.skip("needs nnfast.models.hf.to_hf (issue 11) to write an HF folder")
    try:
        D.GPT2Tokenizer().encode("x")
    except D.DataError:
        pytest.skip("GPT-2 BPE files unavailable offline (set TIKTOKEN_CACHE_DIR)")
    torch.manual_seed(0)
    model = models.create("gpt2", "debug", vocab_size=50257, n_layer=1)
    folder = hf.to_hf(model, tmp_path / "hf")
    hs = make_hellaswag(tmp_path / "hs.jsonl", n=3)
    assert cli.main(["eval", str(folder), "--data", str(hs)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loaded = load_run(folder)
    assert res["acc"] == E.hellaswag(loaded.model, loaded.tokenizer,
                                     E.read_hellaswag(hs))["acc"]
    assert cli.main(["generate", str(folder), "--prompt", "Hello", "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
