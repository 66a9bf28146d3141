"""What the trainer tells a new user: the data it trains on (first line, metrics.jsonl), its
CPU threads, per-model --help, task demos labelled as such, a steady tokens/s."""

import json
import re

import pytest
import torch

from nnfast import __main__ as cli
from nnfast import train as T


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_cpu_threads_flag_then_env_then_half_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert T.cpu_threads(5) == (5, "--threads")
    assert T.cpu_threads(0) == (3, "$OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    n, why = T.cpu_threads(0)
    assert n == 1 and "half of this machine's 2 cores" in why
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert T.cpu_threads(0)[0] == 8  # capped
    assert T.cpu_threads(0, local_world=4)[0] == 8  # 64 / 2 / 4
    assert T.cpu_threads(0, local_world=16)[0] == 2
    with pytest.raises(ValueError, match="--threads"):
        T.TrainConfig(threads=-1)


def test_throughput_is_a_moving_average():
    tp = T.Throughput(tokens_per_step=1000, window=4)
    assert tp.update(1.0) == 1000
    assert tp.update(0.1) == pytest.approx(2000 / 1.1)
    for _ in range(4):
        last = tp.update(0.5)
    assert last == pytest.approx(2000)  # the slow and the fast step left the window


def test_help_lists_the_chosen_models_fields(capsys):
    assert cli.main(["train", "--help", "--model", "bert"]) == 0
    text = capsys.readouterr().out
    assert "BertConfig" in text and "--mask_prob" in text and "--threads" in text
    assert "--n_kv_head" not in text and "--rope_base" not in text  # the decoder's
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "DecoderConfig" in text and "--n_kv_head" in text
    assert cli.main(["train", "--model=t5", "--preset", "debug", "--help"]) == 0
    assert re.search(r"--n_sentinels\s+int\s+\d+", capsys.readouterr().out)
    assert cli.main(["train", "--help", "--model", "nope"]) == 2
    assert "unknown --model 'nope'" in capsys.readouterr().err


def _run(tmp_path, model: str, *extra: str) -> str:
    argv = ["--model", model, "--preset", "debug", "--max_steps", "2", "--batch_size", "2",
            "--eval_interval", "2", "--eval_steps", "1", "--device", "cpu",
            "--out", str(tmp_path / model), *extra]
    cfg, overrides, resume, given = cli.parse_args(argv)
    T.train(cfg, overrides, resume, given, show_progress=False)
    return (tmp_path / model / "metrics.jsonl").read_text()


def test_embedded_corpus_run_says_so_first(tmp_path, monkeypatch, capsys, keep_threads):
    monkeypatch.delenv("NNFAST_DATA_DIR", raising=False)
    monkeypatch.setenv("NNFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    monkeypatch.chdir(tmp_path)
    metrics = _run(tmp_path, "bert", "--threads", "1")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("data: the EMBEDDED corpus pystdlib")
    assert "--data auto found no Tiny Shakespeare" in lines[0]
    assert lines[1] == "cpu threads: 1 (--threads; set with --threads N or OMP_NUM_THREADS)"
    assert torch.get_num_threads() == 1
    first = json.loads(metrics.splitlines()[0])
    assert first["step"] == 0 and first["embedded_corpus"] is True
    assert first["data"].startswith("the EMBEDDED corpus") and first["cpu_threads"] == 1
    # BERT's demo is a masked-LM demo, not an LM sample.
    assert "masked-LM demo (every 7th token masked):" in lines
    assert not any(line.startswith("sample (") for line in lines)


def test_transformer_demo_shows_its_symbols(tmp_path, monkeypatch, capsys, keep_threads):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    text = tmp_path / "corpus.txt"
    text.write_text("abcdefghij\n" * 200)
    metrics = _run(tmp_path, "transformer", "--data", str(text))
    out = capsys.readouterr().out
    assert json.loads(metrics.splitlines()[0])["embedded_corpus"] is False
    demo = out.split("task demo (seq2seq, greedy decoding):\n")[1].splitlines()
    assert demo[0] == "task: reverse strings of symbols 0..9; input  ->  model"
    for row in demo[1:5]:  # ids of the task's alphabet, not the corpus's characters
        assert re.fullmatch(r"[0-9 ]+ {2}->  [0-9 ]*", row), row
