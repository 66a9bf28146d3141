"""nnfast.data: tokenizers, sources (and their errors), shards and random-window batches."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nnfast import data as D

SHARED = os.environ.get("NNFAST_DATA_DIR")
HAS_SHAKESPEARE = bool(SHARED) and (Path(SHARED) / D.SHAKESPEARE_FILE).is_file()
HAS_TIKTOKEN_CACHE = bool(os.environ.get("TIKTOKEN_CACHE_DIR"))


@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    """No NNFAST_DATA_DIR, an empty cache, an empty current folder: a fresh machine."""
    monkeypatch.delenv("NNFAST_DATA_DIR", raising=False)
    monkeypatch.setenv("NNFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------- tokenizers
def test_char_tokenizer_roundtrip_and_json(tmp_path):
    text = "hello, wörld!\nxyz"
    tok = D.CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert tok.vocab_size == len(set(text))
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    D.save_tokenizer(tok, tmp_path / "tok.json")
    again = D.load_tokenizer(tmp_path / "tok.json")
    assert again.chars == tok.chars and again.decode(ids) == text
    with pytest.raises(D.DataError, match="not in the char tokenizer"):
        tok.encode("Q")


def test_byte_tokenizer_roundtrip():
    tok = D.ByteTokenizer()
    ids = tok.encode("naïve ☃")
    assert tok.vocab_size == 256 and ids.max() < 256
    assert tok.decode(ids) == "naïve ☃"


@pytest.mark.skipif(not HAS_TIKTOKEN_CACHE, reason="needs TIKTOKEN_CACHE_DIR (no network here)")
def test_gpt2_tokenizer():
    tok = D.GPT2Tokenizer()
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"


# ----------------------------------------------------------------------------- sources
def test_pystdlib_is_deterministic_capped_and_small_vocab(no_local_data, capsys):
    a = D.load_corpus("pystdlib")
    b = D.load_corpus("pystdlib")
    assert a.description.startswith("the EMBEDDED corpus pystdlib") and a.embedded
    n = len(a.train[0]) + len(a.val[0])
    assert 100_000 < n <= D.PYSTDLIB_MAX_BYTES
    assert np.array_equal(a.train[0], b.train[0]) and a.tokenizer.chars == b.tokenizer.chars
    assert a.tokenizer.vocab_size < 100  # ASCII files only
    assert len(a.val[0]) == int(n * 0.1)
    assert "def " in a.tokenizer.decode(a.train[0][:20000])


def test_auto_without_local_shakespeare_is_pystdlib_and_says_where_it_looked(no_local_data):
    c = D.load_corpus("auto")
    assert c.embedded and c.description.startswith("the EMBEDDED corpus pystdlib")
    for place in ("$NNFAST_DATA_DIR (unset)", "./data/tinyshakespeare.txt",
                  str(no_local_data / "cache" / D.SHAKESPEARE_FILE), "--data PATH"):
        assert place in c.description


@pytest.mark.parametrize("rel", ["tinyshakespeare.txt", "data/tinyshakespeare.txt",
                                 "data/shakespeare_char/input.txt"])
def test_auto_finds_shakespeare_in_the_current_folder(no_local_data, monkeypatch, rel):
    content = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    monkeypatch.setattr(D, "SHAKESPEARE_SHA256", hashlib.sha256(content).hexdigest())
    (no_local_data / rel).parent.mkdir(parents=True, exist_ok=True)
    (no_local_data / rel).write_bytes(content)
    c = D.load_corpus("auto")
    assert not c.embedded
    assert c.description.startswith(f"Tiny Shakespeare from the current folder ({rel})")


def test_auto_rejects_a_different_file_under_the_shakespeare_name(no_local_data):
    (no_local_data / D.SHAKESPEARE_FILE).write_text("not the corpus\n")
    with pytest.raises(D.DataError, match="sha256 mismatch"):
        D.load_corpus("auto")


@pytest.mark.skipif(not HAS_SHAKESPEARE, reason="needs NNFAST_DATA_DIR with tinyshakespeare.txt")
def test_shakespeare_from_data_dir():
    c = D.load_corpus("shakespeare")
    assert c.description.startswith("Tiny Shakespeare from $NNFAST_DATA_DIR")
    assert c.tokenizer.vocab_size == 65
    assert len(c.train[0]) + len(c.val[0]) == 1_115_394
    assert D.load_corpus("auto").description.startswith("Tiny Shakespeare")


def _fake_download(content: bytes, calls: list):
    def urlretrieve(url, dest):
        calls.append(url)
        Path(dest).write_bytes(content)

    return urlretrieve


def test_shakespeare_download_is_checked_and_cached(no_local_data, monkeypatch):
    content = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    calls = []
    monkeypatch.setattr(D.urllib.request, "urlretrieve", _fake_download(content, calls))
    monkeypatch.setattr(D, "SHAKESPEARE_SHA256", hashlib.sha256(content).hexdigest())
    c = D.load_corpus("shakespeare")
    assert calls == [D.SHAKESPEARE_URL]
    assert "downloaded into" in c.description
    assert (no_local_data / "cache" / D.SHAKESPEARE_FILE).read_bytes() == content
    c = D.load_corpus("shakespeare")  # second use: from the cache, no download
    assert calls == [D.SHAKESPEARE_URL] and "from the cache" in c.description


def test_shakespeare_download_sha_mismatch(no_local_data, monkeypatch):
    calls = []
    monkeypatch.setattr(D.urllib.request, "urlretrieve", _fake_download(b"not it\n", calls))
    with pytest.raises(D.DataError, match="sha256 mismatch"):
        D.load_corpus("shakespeare")
    assert not list((no_local_data / "cache").iterdir())  # nothing bad left in the cache


def test_shakespeare_sha_mismatch_in_data_dir(tmp_path, monkeypatch):
    (tmp_path / D.SHAKESPEARE_FILE).write_text("To be, or not to be\n" * 10)
    monkeypatch.setenv("NNFAST_DATA_DIR", str(tmp_path))
    with pytest.raises(D.DataError, match=r"sha256 mismatch for .*tinyshakespeare.txt"):
        D.load_corpus("shakespeare")


def test_shakespeare_offline_error_names_fallbacks(no_local_data, monkeypatch):
    def offline(url, dest):
        raise OSError("Name or service not known")

    monkeypatch.setattr(D.urllib.request, "urlretrieve", offline)
    with pytest.raises(D.DataError, match="could not download.*--data pystdlib"):
        D.load_corpus("shakespeare")


def test_text_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("abc" * 100)
    (tmp_path / "b.md").write_text("xyz" * 100)
    (tmp_path / "skip.bin.bak").write_text("Q")
    c = D.load_corpus(str(tmp_path / "a.txt"))
    assert c.tokenizer.vocab_size == 3 and c.description.startswith("text file")
    c = D.load_corpus(str(tmp_path))
    assert c.tokenizer.vocab_size == 7 and "2 text files" in c.description  # + the newline joiner


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(D.DataError, match=r"empty.txt is empty"):
        D.load_corpus(str(tmp_path / "empty.txt"))


def test_non_utf8_names_file_and_suggests_byte(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café olé ".encode("latin-1") * 20)
    with pytest.raises(D.DataError, match=r"latin1.txt is not UTF-8.*--tokenizer byte"):
        D.load_corpus(str(path))
    c = D.load_corpus(str(path), tokenizer="byte")
    assert c.tokenizer.vocab_size == 256 and len(c.train[0]) + len(c.val[0]) == 180


def test_file_shorter_than_block(tmp_path):
    (tmp_path / "short.txt").write_text("x" * 40)
    c = D.load_corpus(str(tmp_path / "short.txt"), val_fraction=0.0)
    D.Batches(c.train, 39, 2)  # 40 tokens: exactly one window of 39 + 1
    with pytest.raises(D.DataError, match=r"shorter than block_size \+ 1 = 41"):
        D.Batches(c.train, 40, 2)


def test_unknown_source_lists_valid_names():
    with pytest.raises(D.DataError, match="unknown data source 'shakspeare'.*pystdlib"):
        D.load_corpus("shakspeare")
    with pytest.raises(D.DataError, match="unknown tokenizer 'bpe'"):
        D.load_corpus("pystdlib", tokenizer="bpe")


# ----------------------------------------------------------------------------- .bin shards
def _write_llmc(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(D.LLMC_HEADER_INTS, dtype=np.int32)
    header[:3] = (D.LLMC_MAGIC, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())


def test_bin_formats_are_memory_mapped(tmp_path):
    toks = np.arange(1000, dtype=np.uint16) * 37 % 50257
    toks.astype(np.uint16).tofile(tmp_path / "raw.bin")
    _write_llmc(tmp_path / "llmc.bin", toks)
    for name in ("raw.bin", "llmc.bin"):
        arr = D.read_bin(tmp_path / name)
        assert isinstance(arr, np.memmap) and np.array_equal(arr, toks)
    bad = tmp_path / "bad.bin"
    _write_llmc(bad, toks)
    with open(bad, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(D.DataError, match="file has .* bytes: truncated"):
        D.read_bin(bad)


def test_bin_shard_folder_uses_val_names(tmp_path):
    _write_llmc(tmp_path / "fw_val_000000.bin", np.full(500, 7, np.uint16))
    _write_llmc(tmp_path / "fw_train_000001.bin", np.full(800, 1, np.uint16))
    _write_llmc(tmp_path / "fw_train_000002.bin", np.full(600, 2, np.uint16))
    c = D.load_corpus(str(tmp_path))
    assert [len(a) for a in c.train] == [800, 600] and [len(a) for a in c.val] == [500]
    with pytest.raises(D.DataError, match="GPT-2 token ids"):
        D.load_corpus(str(tmp_path), tokenizer="char")


# ----------------------------------------------------------------------------- batches
def test_batches_shift_and_stay_inside_shards():
    shards = [np.arange(0, 100), np.arange(1000, 1050)]
    b = D.Batches(shards, block_size=8, batch_size=64, seed=0)
    assert len(b) == (100 - 8) + (50 - 8)
    x, y = b.next()
    assert x.shape == y.shape == (64, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive: no window crosses shards
    assert (x < 1000).any() and (x >= 1000).any()  # both shards get drawn


def test_batches_generator_state_restores_the_stream():
    b = D.Batches([np.arange(500)], block_size=16, batch_size=4, seed=3)
    b.next()
    state = b.state_dict()
    want = [b.next()[0] for _ in range(3)]
    other = D.Batches([np.arange(500)], block_size=16, batch_size=4, seed=99)
    other.load_state_dict(state)
    assert all(torch.equal(w, other.next()[0]) for w in want)
