"""The trainer and ``python -m nnfast``: learning, kernels vs PyTorch, resume, atomic saves,
NaN stops, DDP on CPU, and the command line's type checking.

Runs use the GPT-2 ``debug`` preset cut to one layer on a small text file. All but the
convergence test pin ``NNFAST_BACKEND=torch``: they test the trainer, and the interpreted
kernels would only make them slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import runpy
import socket
import sys
from pathlib import Path

import pytest
import torch

import nnfast.__main__ as cli
import nnfast.models as models
from nnfast import train as T
from nnfast._backend import triton_available_for

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over the lazy dog while seven wise owls watch".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    # Deterministic, learnable text: word sequences from a fixed LCG.
    state, words = 12345, []
    for _ in range(3000):
        state = (1103515245 * state + 12345) % 2**31
        words.append(WORDS[state % len(WORDS)])
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(" ".join(words) + "\n")
    return path


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")


def base_args(corpus: Path, out: Path, **fields) -> list[str]:
    args = {
        "model": "gpt2",
        "preset": "debug",
        "data": corpus,
        "out": out,
        "n_layer": 1,
        "block_size": 16,
        "batch_size": 4,
        "max_steps": 6,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_interval": 1000,
        "eval_steps": 2,
        "log_interval": 1,
        "sample_tokens": 16,
        "seed": 0,
        "device": "cpu",
    }
    args.update(fields)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def run(argv: list[str], resume: bool = False) -> dict:
    cfg, overrides, res, given = cli.parse_args(argv + (["--resume"] if resume else []))
    return T.train(cfg, overrides, res, given, show_progress=False)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- learning
def test_loss_falls_and_run_folder(corpus, tmp_path, torch_backend, capsys):
    out = tmp_path / "run"
    res = run(base_args(corpus, out, max_steps=30, lr=1e-2, eval_interval=15, log_interval=5))
    losses = res["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
    assert res["val_loss"] < losses[0] - 0.5
    logged = [r for r in rows(out) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 5, 10, 15, 20, 25, 30]
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert [r["step"] for r in rows(out) if "val_loss" in r] == [15, 30]
    if importlib.util.find_spec("matplotlib"):  # optional; a dev dependency
        assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "sample.txt").read_text() == res["sample"] and len(res["sample"]) > 16
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_0000015.pt", "ckpt_0000030.pt"]
    printed = capsys.readouterr().out
    assert f"data: text file {corpus}" in printed and "sample (16 tokens)" in printed


@pytest.mark.skipif(
    not triton_available_for(torch.device("cpu"))[0], reason="Triton kernels cannot run on CPU"
)
def test_kernels_converge_like_pytorch(corpus, tmp_path, monkeypatch):
    """The same 5 steps through the (interpreted) kernels and through PyTorch: fp32 on both
    sides, so the per-step losses agree to float rounding amplified by 5 AdamW steps
    (rtol 1e-5; the observed gap is about 1e-7)."""
    argv = base_args(corpus, tmp_path / "k", max_steps=5, lr=1e-2, sample_tokens=0)
    monkeypatch.setenv("NNFAST_BACKEND", "triton")
    kernels = run(argv)
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    reference = run(base_args(corpus, tmp_path / "t", max_steps=5, lr=1e-2, sample_tokens=0))
    k, r = torch.tensor(kernels["losses"]), torch.tensor(reference["losses"])
    assert r[-1] < r[0] - 0.3  # it learned, so the comparison covers real updates
    torch.testing.assert_close(k, r, rtol=1e-5, atol=0)  # seen: <= 1e-7


# ----------------------------------------------------------------------------- checkpoints
def test_resume_matches_uninterrupted(corpus, tmp_path, torch_backend):
    common = dict(dropout=0.1, grad_accum=2, lr_decay_steps=6, save_interval=3)
    full = run(base_args(corpus, tmp_path / "full", max_steps=6, **common))
    first = run(base_args(corpus, tmp_path / "split", max_steps=3, **common))
    second = run(base_args(corpus, tmp_path / "split", max_steps=6, **common), resume=True)
    assert first["losses"] + second["losses"] == full["losses"]
    assert_same_weights(second["model"], full["model"])
    assert [r["step"] for r in rows(tmp_path / "split") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    ckpt_full = T.load_checkpoint(tmp_path / "full" / "ckpt_0000006.pt")
    ckpt_split = T.load_checkpoint(tmp_path / "split" / "ckpt_0000006.pt")
    for a, b in zip(
        ckpt_full["optimizer"]["state"].values(), ckpt_split["optimizer"]["state"].values()
    ):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_growth_hook_and_resume_across_growth(corpus, tmp_path, torch_backend):
    """progressive-gpt grows at steps 2 and 4 (2 -> 4 -> 8 layers): the trainer rebuilds the
    optimizer there, and a run split at step 3 (between growths) resumes exactly."""
    common = dict(model="progressive-gpt", n_layer=2, grow_at="2,4", save_interval=3,
                  lr_decay_steps=6)
    full = run(base_args(corpus, tmp_path / "full", max_steps=6, **common))
    assert len(full["model"].blocks) == 8
    first = run(base_args(corpus, tmp_path / "split", max_steps=3, **common))
    assert len(first["model"].blocks) == 4
    second = run(base_args(corpus, tmp_path / "split", max_steps=6, **common), resume=True)
    assert first["losses"] + second["losses"] == full["losses"]
    assert_same_weights(second["model"], full["model"])


def test_kill_during_save_keeps_latest(corpus, tmp_path, torch_backend, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the second save dies halfway through writing
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt("killed during save")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(base_args(corpus, out, max_steps=6, save_interval=2))
    monkeypatch.setattr(torch, "save", real_save)
    assert str(calls[1]).endswith(".tmp")
    assert (out / "latest").read_text().strip() == "ckpt_0000002.pt"
    assert T.load_checkpoint(T.latest_checkpoint(out))["step"] == 2
    assert not list(out.glob("*.tmp"))
    # Only what changes on the command line: data, model and the rest come from the checkpoint.
    res = run(["--out", str(out), "--keep_checkpoints", "2"], resume=True)
    assert len(res["losses"]) == 4
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_0000004.pt", "ckpt_0000006.pt"]


def test_existing_run_needs_resume(corpus, tmp_path, torch_backend, capsys):
    argv = base_args(corpus, tmp_path / "run", max_steps=1, sample_tokens=0)
    assert cli.main(["train", *argv]) == 0
    assert cli.main(["train", *argv]) == 1
    assert "holds a run already: pass --resume" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot resume with a different model: --n_layer 2"):
        run(base_args(corpus, tmp_path / "run", max_steps=2, n_layer=2), resume=True)


def test_nan_loss_stops_naming_the_step(corpus, tmp_path, torch_backend, capsys):
    # AdamW's first step moves every weight by ~lr: 1e30 overflows the next forward pass.
    argv = base_args(corpus, tmp_path / "run", lr=1e30, warmup_steps=0, grad_clip=0)
    with pytest.raises(T.TrainingDiverged, match=r"loss is (nan|inf) at step 2"):
        run(argv)
    assert cli.main(["train", *base_args(corpus, tmp_path / "cli", lr=1e30, warmup_steps=0)]) == 1
    assert "at step 2; stopping" in capsys.readouterr().err


# ----------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        NNFAST_BACKEND="torch",
    )
    torch.set_num_threads(1)
    cfg, overrides, resume, given = cli.parse_args(argv)
    try:
        res = T.train(cfg, overrides, resume, given, show_progress=False)
    finally:
        torch.distributed.destroy_process_group()
    torch.save(
        {"state": res["model"].state_dict(), "losses": res["losses"]}, Path(out) / f"rank{rank}.pt"
    )


def test_ddp_gloo_two_ranks(corpus, tmp_path):
    argv = base_args(corpus, tmp_path / "run", max_steps=4, lr=1e-2, sample_tokens=0)
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), argv, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert_same_weights(r0["state"], r1["state"])
    assert r0["losses"] == r1["losses"]  # the all-reduced loss
    ckpt = T.load_checkpoint(tmp_path / "run" / "ckpt_0000004.pt")
    assert_same_weights(ckpt["model_state"], r0["state"])
    # One global data order: both ranks are at the same position of it.
    assert [s["data"]["step"] for s in ckpt["rank_states"]] == [4, 4]
    # Each rank its own slice of a global batch of 8: not a one-process run with batch 4.
    single = run(base_args(corpus, tmp_path / "single", max_steps=4, lr=1e-2, sample_tokens=0))
    assert single["losses"][0] != r0["losses"][0]


# ----------------------------------------------------------------------------- command line
def test_cli_types_and_unknown_fields(corpus, tmp_path, capsys):
    cfg, overrides, resume, given = cli.parse_args(
        [
            "--max-steps",
            "7",
            "--lr=0.01",
            "--compile",
            "--top_k",
            "none",
            "--dropout",
            "0.1",
            "--bias",
            "false",
            "--resume",
        ]
    )
    assert (cfg.max_steps, cfg.lr, cfg.compile, cfg.top_k, resume) == (7, 0.01, True, None, True)
    assert overrides == {"dropout": 0.1, "bias": False}
    assert given == {"max_steps", "lr", "compile", "top_k", "dropout", "bias"}
    with pytest.raises(TypeError, match="--batch_size expects int, got 'eight'"):
        cli.parse_args(["--batch_size", "eight"])
    with pytest.raises(TypeError, match="'n_layer' expects an int"):
        cli.parse_args(["--n_layer", "2.5"])
    with pytest.raises(ValueError, match=r"unknown option\(s\) --n_layers.*Model fields \(gpt2\)"):
        cli.parse_args(["--n_layers", "2"])
    with pytest.raises(ValueError, match="unknown --model 'gpt3'"):
        cli.parse_args(["--model", "gpt3"])
    with pytest.raises(ValueError, match="unknown preset 'tiny'"):
        cli.parse_args(["--preset", "tiny"])
    with pytest.raises(ValueError, match="--lr needs a value"):
        cli.parse_args(["--lr"])
    with pytest.raises(ValueError, match="--batch_size must be >= 1, got 0"):
        cli.parse_args(["--batch_size", "0"])
    with pytest.raises(ValueError, match="--dtype must be one of auto, float32"):
        cli.parse_args(["--dtype", "fp8"])
    assert cli.main(["train", "--warmup_steps", "1.5"]) == 2
    assert "--warmup_steps expects int" in capsys.readouterr().err
    assert cli.main(["train", "--help"]) == 0 and "--grad_accum" in capsys.readouterr().out
    assert cli.main(["fit"]) == 2


def test_vocab_comes_from_the_tokenizer(corpus, tmp_path, torch_backend):
    res = run(base_args(corpus, tmp_path / "a", max_steps=1, sample_tokens=0))
    assert res["model"].config.vocab_size == len(set(corpus.read_text()))
    res = run(base_args(corpus, tmp_path / "b", max_steps=1, sample_tokens=0, vocab_size=64))
    assert res["model"].config.vocab_size == 64  # padding up is allowed
    with pytest.raises(ValueError, match="--vocab_size 8 < the tokenizer's"):
        run(base_args(corpus, tmp_path / "c", max_steps=1, vocab_size=8))


@pytest.mark.parametrize("script", ["train_gpt2.py", "train_llama2.py"])
def test_examples_pass_arguments_through(script, corpus, tmp_path, torch_backend, monkeypatch):
    argv = [
        script,
        "--data",
        str(corpus),
        "--out",
        str(tmp_path),
        "--max_steps",
        "2",
        "--n_layer",
        "1",
        "--n_embd",
        "32",
        "--n_head",
        "2",
        "--block_size",
        "16",
        "--batch_size",
        "2",
        "--sample_tokens",
        "4",
        "--eval_steps",
        "1",
        "--device",
        "cpu",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    assert exit_.value.code == 0
    assert [r["step"] for r in rows(tmp_path) if "loss" in r][-1] == 2



@pytest.mark.parametrize("model", ["llama2", "bert", "t5", "transformer", "conv-transformer"])
def test_resume_is_exact_for_every_family(model, corpus, tmp_path, torch_backend):
    """Masking, span corruption and generated-task batches (prepare_batch draws from the
    global RNG), eval metrics and dropout: a run split at step 2 equals the uninterrupted one."""
    fields = models.field_types(model)

    def argv(out: Path, steps: int) -> list[str]:
        args = base_args(corpus, out, model=model, max_steps=steps, lr_decay_steps=4,
                         save_interval=2, eval_interval=2, sample_tokens=0)
        pairs = list(zip(args[::2], args[1::2]))  # the model fields this family has
        keep = [(k, v) for k, v in pairs if k[2:] not in ("n_layer", "block_size")
                or k[2:] in fields]
        return [x for pair in keep for x in pair]

    full = run(argv(tmp_path / "full", 4))
    first = run(argv(tmp_path / "split", 2))
    second = run(argv(tmp_path / "split", 4), resume=True)
    assert first["losses"] + second["losses"] == full["losses"]
    assert second["val_loss"] == full["val_loss"]
    assert second["val_metrics"] == full["val_metrics"]
    assert_same_weights(second["model"], full["model"])
