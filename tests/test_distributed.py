"""World-size-independent data order, DDP and FSDP2 on CPU (2 gloo ranks), sharded
checkpoints: resume on another world size, consolidation to a single file.

Kept tiny (2 layers, width 32, block 16, 4 steps): each 2-rank run spawns two processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nnfast import data as D
from nnfast import distributed as FS
from nnfast import train as T
from tests.test_train import WORDS, _ddp_worker, _free_port, base_args, cli, rows, run

STEPS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    words = np.random.default_rng(0).choice(WORDS, 3000)
    path = tmp_path_factory.mktemp("data") / "words.txt"
    path.write_text(" ".join(words) + "\n")
    return path


def spawn(argv: list[str], out: Path) -> list[dict]:
    """Two gloo ranks (test_train's DDP worker); each rank's losses and final weights."""
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), argv, str(out)), nprocs=2)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def args(corpus, out, **kw):
    fields = {"n_layer": 2, "max_steps": STEPS, "lr": 1e-2, "sample_tokens": 0, **kw}
    return base_args(corpus, out, **fields)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> list[float]:
    """The reference curve: one process, batch 8."""
    os.environ["NNFAST_BACKEND"] = "torch"
    try:
        return run(args(corpus, tmp_path_factory.mktemp("single") / "r", batch_size=8))["losses"]
    finally:
        del os.environ["NNFAST_BACKEND"]


# ----------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("world,accum,batch", [(1, 1, 8), (1, 2, 4), (2, 1, 4), (4, 2, 1)])
def test_global_order_does_not_depend_on_the_world_size(world, accum, batch):
    shards = [np.arange(0, 300), np.arange(1000, 1200)]

    def step_windows(world, accum, batch, step):
        ranks = [D.Batches(shards, 8, batch, seed=5, rank=r, world=world, grad_accum=accum)
                 for r in range(world)]
        for b in ranks:
            b.seek(step)
        rows = [b.next()[0] for _ in range(accum) for b in ranks]
        return sorted(map(tuple, torch.cat(rows).tolist()))

    for step in (0, 3):
        assert step_windows(world, accum, batch, step) == step_windows(1, 1, 8, step)
    assert step_windows(1, 1, 8, 0) != step_windows(1, 1, 8, 1)


def test_sampler_state_resumes_exactly():
    b = D.Batches([np.arange(500)], 16, 4, seed=3, grad_accum=2)
    b.next()
    state = b.state_dict()
    want = [b.next()[0] for _ in range(3)]
    other = D.Batches([np.arange(500)], 16, 4, seed=99, grad_accum=2)
    other.load_state_dict(state)
    assert all(torch.equal(w, other.next()[0]) for w in want)


def test_ids_past_the_vocabulary_name_shard_and_position(tmp_path):
    from nnfast import prepare as P

    folder = tmp_path / "shards"
    folder.mkdir()
    for name, ids in (("a_val_000000.bin", np.zeros(100)), ("a_train_000001.bin", np.zeros(300))):
        if "train" in name:
            ids[250] = 97
        P.write_shard(folder / name, ids, 1)
    corpus = D.load_corpus(str(folder))
    with pytest.raises(D.DataError, match=r"a_train_000001.bin holds token id 97 at position 250"):
        T._check_token_ids(corpus, 97)


# ----------------------------------------------------------------------------- DDP, FSDP2
def test_ddp_two_ranks_equal_one_rank_and_accumulation(corpus, tmp_path, single):
    r0, r1 = spawn(args(corpus, tmp_path / "ddp"), tmp_path)
    assert r0["losses"] == r1["losses"]
    np.testing.assert_allclose(r0["losses"], single, rtol=1e-5)
    os.environ["NNFAST_BACKEND"] = "torch"
    try:
        accum = run(args(corpus, tmp_path / "accum", grad_accum=2))["losses"]
    finally:
        del os.environ["NNFAST_BACKEND"]
    np.testing.assert_allclose(accum, single, rtol=1e-5)


def test_fsdp_matches_and_resumes_on_another_world_size(corpus, tmp_path, single, capsys):
    out = tmp_path / "fsdp"
    hs = tmp_path / "hs.jsonl"  # scored on the sharded model by both ranks
    hs.write_text("".join(json.dumps({"ctx": "the fox", "endings": [" owls", "qq", "zz", "xx"],
                                      "label": 0}) + "\n" for _ in range(3)))
    fsdp = args(corpus, out, parallel="fsdp", save_interval=2, sample_tokens=8,
                activation_checkpointing="true", eval_hellaswag=hs)
    r0, r1 = spawn(fsdp, tmp_path)
    np.testing.assert_allclose(r0["losses"], single, rtol=1e-5)
    assert len((out / "sample.txt").read_text()) > 8  # generate on the sharded model
    assert [r["step"] for r in rows(out) if "hellaswag_acc" in r] == [STEPS]
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_0000002.dcp", "ckpt_0000004.dcp"]
    assert not list(out.glob("*.tmp"))
    # The step-2 checkpoint, resumed by one process (no sharding): the same last two steps.
    (out / "latest").write_text("ckpt_0000002.dcp\n")
    (out / "ckpt_0000004.dcp").rename(out / "later.dcp")
    os.environ["NNFAST_BACKEND"] = "torch"
    try:
        resumed = run(args(corpus, out, grad_accum=2), resume=True)["losses"]
    finally:
        del os.environ["NNFAST_BACKEND"]
    np.testing.assert_allclose(resumed, single[2:], rtol=1e-5)
    # Consolidated to one plain file: the same weights as the single-process resume wrote.
    plain = FS.consolidate(out / "later.dcp", tmp_path / "plain.pt")
    a = T.load_checkpoint(plain)
    b = T.load_checkpoint(out / "ckpt_0000004.pt")
    assert a["step"] == b["step"] == STEPS and a["model_state"].keys() == b["model_state"].keys()
    for k, v in a["model_state"].items():
        torch.testing.assert_close(v, b["model_state"][k], rtol=1e-4, atol=1e-5)
    # eval and generate read the sharded checkpoint directly, in one process.
    scores = []
    for ckpt in (out / "later.dcp", plain):
        assert cli.main(["eval", str(ckpt), "--data", str(hs)]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["acc"])
    assert scores[0] == scores[1]
    assert cli.main(["generate", str(out / "later.dcp"), "--prompt", "the", "--seed", "1",
                     "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the")
    assert cli.main(["consolidate", str(out / "ckpt_0000004.pt")]) == 1  # plain already
    assert cli.main(["consolidate", str(out / "later.dcp")]) == 0
    assert (out / "later.pt").is_file()
    # A plain run folder from the sharded run's latest: what export and eval read.
    (out / "latest").write_text("later.dcp\n")
    assert cli.main(["consolidate", str(out), "--out", str(tmp_path / "plain_run")]) == 0
    assert (tmp_path / "plain_run" / "latest").read_text() == "later.pt\n"
    assert T.load_checkpoint(tmp_path / "plain_run" / "later.pt")["step"] == STEPS
