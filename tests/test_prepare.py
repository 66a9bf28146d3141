"""``python -m nnfast prepare``: text, .jsonl and .jsonl.gz -> llm.c shards (contents equal
a direct tokenization), the manifest, resuming an interrupted run, bad input, and training
on the shards by memory map."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

import nnfast.__main__ as cli
from nnfast import data as D
from nnfast import prepare as P

DOCS = [f"document {i}: " + "the owls watch the fox. " * (3 + i % 5) for i in range(40)]


@pytest.fixture
def source(tmp_path) -> Path:
    """A folder: one .txt document, 20 documents in .jsonl, 19 in .jsonl.gz (sorted order)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(DOCS[0])
    (src / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                         for i, d in enumerate(DOCS[1:21])) + "\n")
    with gzip.open(src / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in DOCS[21:])
    return src


def expected(tok: D.Tokenizer) -> np.ndarray:
    return np.concatenate([np.concatenate([[tok.eot], tok.encode(d)]) for d in DOCS])


def shard_ids(out: Path) -> np.ndarray:
    m = json.loads((out / "manifest.json").read_text())
    return np.concatenate([D.read_bin(out / e["file"], llmc=True) for e in m["shards"]])


@pytest.mark.parametrize("tokenizer,workers", [("char", 2), ("byte", 1)])
def test_shards_hold_the_tokenized_documents(source, tmp_path, tokenizer, workers):
    out = tmp_path / "shards"
    m = P.prepare(str(source), out, tokenizer, shard_tokens=700, val_tokens=300,
                  workers=workers, progress=False)
    tok = D.load_tokenizer(out / "tokenizer.json")
    want = expected(tok)
    assert np.array_equal(shard_ids(out), want)
    names = [e["file"] for e in m["shards"]]
    assert names[0] == "shard_val_000000.bin" and names[1] == "shard_train_000001.bin"
    assert [e["tokens"] for e in m["shards"][:-1]] == [300] + [700] * (len(names) - 2)
    assert m["complete"] and m["tokens"] == {"val": 300, "train": len(want) - 300}
    assert m["vocab_size"] == tok.vocab_size and m["version"] == 1
    assert [s["sha256"] for s in m["sources"]] == [D.sha256_file(f) for f in
                                                   sorted(source.iterdir())]
    header = np.fromfile(out / names[1], np.int32, count=3)
    assert header.tolist() == [D.LLMC_MAGIC, 1, 700]
    corpus = D.load_corpus(str(out))
    assert isinstance(corpus.train[0], np.memmap) and len(corpus.val) == 1
    assert corpus.tokenizer.vocab_size == tok.vocab_size


def test_interrupted_prepare_resumes_to_the_same_shards(source, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    P.prepare(str(source), whole, "char", shard_tokens=500, val_tokens=200, progress=False)
    out = tmp_path / "cut"
    real, calls = P.write_shard, []

    def dies_on_third(path, ids, version):
        calls.append(path)
        if len(calls) == 3:
            path.with_name(path.name + ".tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real(path, ids, version)

    monkeypatch.setattr(P, "write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(str(source), out, "char", shard_tokens=500, val_tokens=200, progress=False)
    with pytest.raises(D.DataError, match="preparation did not finish"):
        D.load_corpus(str(out))
    assert sorted(p.name for p in out.glob("*.bin")) == ["shard_train_000001.bin",
                                                         "shard_val_000000.bin"]
    monkeypatch.setattr(P, "write_shard", real)
    P.prepare(str(source), out, "char", shard_tokens=500, val_tokens=200, progress=False)
    assert not list(out.glob("*.tmp"))
    mw, mc = (json.loads((d / "manifest.json").read_text()) for d in (whole, out))
    assert [e["sha256"] for e in mc["shards"]] == [e["sha256"] for e in mw["shards"]]
    with pytest.raises(D.DataError, match="other sources or settings"):
        P.prepare(str(source), out, "char", shard_tokens=400, val_tokens=200, progress=False)


def test_bad_sources_name_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text"}\n')
    assert cli.main(["prepare", str(bad), "--out", str(tmp_path / "o"), "--tokenizer", "byte",
                     "--workers", "1"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith(f"error: {bad}:2: no string field 'text'")
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:2: not a JSON object"):
        P.prepare(str(bad), tmp_path / "o2", "byte", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("")
    with pytest.raises(D.DataError, match="the source is empty"):
        P.prepare(str(tmp_path / "empty"), tmp_path / "o3", "byte", progress=False)
    (tmp_path / "small.txt").write_text("tiny")
    with pytest.raises(D.DataError, match="fewer than the val shard"):
        P.prepare(str(tmp_path / "small.txt"), tmp_path / "o4", "byte", val_tokens=100,
                  progress=False)


def test_bad_shards_are_refused(source, tmp_path):
    out = tmp_path / "shards"
    P.prepare(str(source), out, "byte", shard_tokens=2000, val_tokens=300, progress=False)
    shard = out / "shard_train_000001.bin"
    good = shard.read_bytes()
    header = np.frombuffer(good[:1024], np.int32).copy()
    for i, value, msg in [(0, 1234, "not an llm.c shard"), (1, 7, "unsupported llm.c shard"),
                          (2, 5, "header says 5 tokens")]:
        h = header.copy()
        h[i] = value
        shard.write_bytes(h.tobytes() + good[1024:])
        with pytest.raises(D.DataError, match=f"shard_train_000001.bin: {msg}"):
            D.load_corpus(str(out))
    shard.write_bytes(good)
    # uint32 ids (version 2) for vocabularies past 65536.
    big = np.array([70000, 1, 65536], np.uint32)
    P.write_shard(tmp_path / "v2.bin", big, 2)
    assert D.read_bin(tmp_path / "v2.bin", llmc=True).tolist() == big.tolist()


def test_train_on_prepared_shards(source, tmp_path, monkeypatch):
    from tests.test_train import base_args, run

    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    out = tmp_path / "shards"
    assert cli.main(["prepare", str(source), "--out", str(out), "--tokenizer", "char",
                     "--shard_tokens", "1000", "--val_tokens", "400", "--workers", "1"]) == 0
    res = run(base_args(out, tmp_path / "run", max_steps=3, sample_tokens=0))
    assert len(res["losses"]) == 3 and all(np.isfinite(res["losses"]))
    assert res["model"].config.vocab_size == D.load_tokenizer(out / "tokenizer.json").vocab_size
