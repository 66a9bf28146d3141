"""``python -m nnfast prepare SOURCE --out DIR``: a text corpus -> llm.c-format token shards.

SOURCE is a text file, a ``.jsonl``/``.jsonl.gz`` file with one document per line (a
``text`` field, as FineWeb's), or a folder of them (sorted, recursive). Each document is
tokenized (``gpt2``, ``char`` or ``byte``) in ``--workers`` processes, in order, and
preceded by the end-of-text token, as llm.c's and nanoGPT's FineWeb scripts do. The first
``--val_tokens`` tokens form the validation shard ``shard_val_000000.bin``; the rest
``shard_train_000001.bin ...`` of ``--shard_tokens`` each. A shard is llm.c's format:
a 256-int32 header (magic 20240520, version 1 for uint16 ids, 2 for uint32 when the
vocabulary has more than 65536 ids, token count), then the ids.

Each shard is written under a ``.tmp`` name and renamed when complete, and
``manifest.json`` (settings, tokenizer, the sources' sizes and sha256, every finished
shard's tokens, sha256 and where the next shard starts in the source) is rewritten
atomically after each. An interrupted run leaves only complete shards; running the same
command again continues after the last one, and a folder whose manifest is not complete is
refused by the trainer. ``char`` builds its vocabulary in a first pass over the corpus.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from nnfast import data as D

JSONL = (".jsonl", ".jsonl.gz")
MANIFEST = "manifest.json"
PREFIX = "shard"


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith(JSONL)


def source_files(source: str | os.PathLike) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and (p.suffix in D.TEXT_SUFFIXES or _is_jsonl(p)))
        if not files:
            raise D.DataError(f"{path}: no text ({', '.join(D.TEXT_SUFFIXES)}) or "
                              f"{'/'.join(JSONL)} files in it")
    else:
        raise D.DataError(f"{path}: no such file or folder")
    empty = [str(f) for f in files if f.stat().st_size == 0]
    if len(empty) == len(files):
        raise D.DataError(f"{path}: the source is empty")
    return files


def documents(files: list[Path], text_field: str) -> Iterator[tuple[str, int]]:
    """Every document in order, with the number of source bytes it stands for."""
    for f in files:
        if not _is_jsonl(f):
            if f.stat().st_size:
                yield D.read_text(f), f.stat().st_size
            continue
        gz = f.name.endswith(".gz")
        with (gzip.open if gz else open)(f, "rb") as raw:
            last = 0
            for n, line in enumerate(raw, 1):
                pos = raw.fileobj.tell() if gz else raw.tell()  # source bytes, for progress
                nbytes, last = pos - last, pos
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise D.DataError(f"{f}:{n}: not a JSON object ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise D.DataError(f"{f}:{n}: no string field {text_field!r} (has {keys}); "
                                      "choose the field with --text_field")
                yield row[text_field], nbytes


# ----------------------------------------------------------------------------- workers
_TOK: D.Tokenizer | None = None


def _init(tok_dict: dict) -> None:
    global _TOK
    _TOK = D.tokenizer_from_dict(tok_dict)


def _encode(text: str) -> np.ndarray:
    ids = _TOK.encode(text.encode("utf-8", "surrogateescape") if _TOK.kind == "byte" else text)
    return np.concatenate([[_TOK.eot], ids]).astype(np.uint32)


def _chars(text: str) -> set[str]:
    return set(text)


def _pool_map(fn, items, workers: int, tok_dict: dict | None = None):
    """``fn`` over ``items`` in order, in ``workers`` processes (in this one for 1)."""
    if workers <= 1:
        if tok_dict is not None:
            _init(tok_dict)
        yield from map(fn, items)
        return
    # fork where there is one: a spawned worker would import torch again (seconds each).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    init, args = (_init, (tok_dict,)) if tok_dict is not None else (None, ())
    items, chunk = iter(items), 256 * workers
    with ctx.Pool(workers, initializer=init, initargs=args) as pool:
        # Two chunks in flight at most: the corpus is never read into memory ahead of use
        # (Pool.imap would read its whole input eagerly).
        ahead = pool.map_async(fn, list(islice(items, chunk)), chunksize=16)
        while results := ahead.get():
            ahead = pool.map_async(fn, list(islice(items, chunk)), chunksize=16)
            yield from results


# ----------------------------------------------------------------------------- shards
def write_shard(path: Path, ids: np.ndarray, version: int) -> str:
    """One llm.c shard, atomically; returns its sha256."""
    header = np.zeros(D.LLMC_HEADER_INTS, np.int32)
    header[:3] = D.LLMC_MAGIC, version, len(ids)
    body = ids.astype(np.uint16 if version == 1 else np.uint32).tobytes()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(header.tobytes() + body).hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


@dataclass
class Settings:
    shard_tokens: int
    val_tokens: int
    text_field: str


def _make_tokenizer(name: str, files, text_field: str, workers: int) -> D.Tokenizer:
    if name == "gpt2":
        tok = D.GPT2Tokenizer()
        tok.encode("")  # fail now (offline without tiktoken's files), not in a worker
        return tok
    if name == "byte":
        return D.ByteTokenizer(eot=True)
    if name == "char":
        chars: set[str] = set()
        texts = (t for t, _ in documents(files, text_field))
        for s in _pool_map(_chars, texts, workers):
            chars |= s
        return D.CharTokenizer(sorted(chars), eot=True)
    raise D.DataError(f"--tokenizer {name!r}: valid: gpt2, char, byte")


def _resume_point(out: Path, manifest: dict) -> tuple[list[dict], int, int]:
    """The manifest's shards that are on disk intact, and where the next one starts."""
    done = []
    for entry in manifest["shards"]:
        f = out / entry["file"]
        if not f.is_file() or D.sha256_file(f) != entry["sha256"]:
            break
        done.append(entry)
    doc, offset = done[-1]["next"] if done else (0, 0)
    return done, doc, offset


def prepare(source: str, out: str | os.PathLike, tokenizer: str = "gpt2",
            shard_tokens: int = 100_000_000, val_tokens: int | None = None, workers: int = 1,
            text_field: str = "text", progress: bool = True) -> dict:
    """Tokenize ``source`` into shards in ``out``; returns the manifest."""
    from tqdm.auto import tqdm

    if shard_tokens < 1 or (val_tokens is not None and val_tokens < 1) or workers < 1:
        raise D.DataError("--shard_tokens, --val_tokens and --workers must be >= 1")
    settings = Settings(shard_tokens, val_tokens or shard_tokens, text_field)
    files = source_files(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = [{"path": str(f), "bytes": f.stat().st_size, "sha256": h}
               for f, h in zip(files, map(D.sha256_file, files))]
    old = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else None
    if old is not None:
        same = (old["sources"], old["settings"], old["tokenizer"]["kind"]) == (
            sources, vars(settings), tokenizer)
        if not same:
            raise D.DataError(f"{out / MANIFEST}: made from other sources or settings; "
                              "choose another --out (nothing was changed)")
        if old["complete"]:
            return old
        tok = D.tokenizer_from_dict(old["tokenizer"])
        done, doc0, off0 = _resume_point(out, old)
    else:
        tok = _make_tokenizer(tokenizer, files, text_field, workers)
        done, doc0, off0 = [], 0, 0
    for stray in [*out.glob(f"{PREFIX}_*.bin"), *out.glob("*.tmp")]:  # redone from here on
        if stray.name not in {e["file"] for e in done}:
            stray.unlink()
    version = 1 if tok.vocab_size <= 2**16 else 2
    manifest = {"format": "llm.c", "version": version, "tokenizer": tok.to_dict(),
                "vocab_size": tok.vocab_size, "eot": tok.eot, "settings": vars(settings),
                "sources": sources, "shards": done, "complete": False}

    def flush(ids: np.ndarray, nxt: tuple[int, int]) -> None:
        k = len(manifest["shards"])
        split = "val" if k == 0 else "train"
        name = f"{PREFIX}_{split}_{k:06d}.bin"
        digest = write_shard(out / name, ids, version)
        manifest["shards"].append({"file": name, "split": split, "tokens": len(ids),
                                   "sha256": digest, "next": list(nxt)})
        _write_json(out / MANIFEST, manifest)

    def target() -> int:
        return settings.val_tokens if not manifest["shards"] else settings.shard_tokens

    pending: list[np.ndarray] = []  # ids not yet in a shard, from documents before `doc`
    n_pending, doc, total_bytes = 0, doc0, sum(s["bytes"] for s in sources)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress,
               desc=f"prepare {tok.kind}")
    try:
        docs = documents(files, text_field)
        for _, (_, nbytes) in zip(range(doc0), docs):  # already in shards: read, not tokenized
            bar.update(nbytes)
        sizes: list[int] = []
        texts = ((sizes.append(n), t)[1] for t, n in docs)
        for ids in _pool_map(_encode, texts, workers, tok.to_dict()):
            if doc == doc0:
                ids = ids[off0:]
            pending.append(ids)
            n_pending += len(ids)
            while n_pending >= target():
                buf = np.concatenate(pending)
                n = target()
                rest = buf[n:]
                # The next shard starts `len(rest)` tokens before the end of document `doc`.
                full = len(ids) + (off0 if doc == doc0 else 0)
                nxt = (doc, full - len(rest)) if len(rest) else (doc + 1, 0)
                flush(buf[:n], nxt)
                pending, n_pending = ([rest] if len(rest) else []), len(rest)
            doc += 1
            bar.update(sizes.pop(0))
            bar.set_postfix(shards=len(manifest["shards"]), refresh=False)
    finally:
        bar.close()
    if n_pending:
        if not manifest["shards"]:
            raise D.DataError(f"{source}: only {n_pending:,} tokens, fewer than the val shard's "
                              f"{settings.val_tokens:,} (--val_tokens) and nothing left to train")
        flush(np.concatenate(pending), (doc, 0))
    if len(manifest["shards"]) < 2:
        raise D.DataError(f"{source}: all its tokens went into the val shard (--val_tokens "
                          f"{settings.val_tokens:,}); nothing left to train on")
    manifest.update(complete=True, documents=doc,
                    tokens={s: sum(e["tokens"] for e in manifest["shards"] if e["split"] == s)
                            for s in ("val", "train")})
    _write_json(out / MANIFEST, manifest)
    D.save_tokenizer(tok, out / "tokenizer.json")
    return manifest


def parser():
    p = argparse.ArgumentParser(prog="python -m nnfast prepare", description=__doc__.split("\n")[0])
    p.add_argument("source", help="a text file, a .jsonl/.jsonl.gz file, or a folder of them")
    p.add_argument("--out", required=True, help="the shard folder (resumes an unfinished one)")
    p.add_argument("--tokenizer", default="gpt2", choices=("gpt2", "char", "byte"))
    p.add_argument("--shard_tokens", type=int, default=100_000_000)
    p.add_argument("--val_tokens", type=int, default=None, help="default: --shard_tokens")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--text_field", default="text", help="the .jsonl field holding the text")
    return p


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    try:
        m = prepare(a.source, a.out, a.tokenizer, a.shard_tokens, a.val_tokens, a.workers,
                    a.text_field)
    except D.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": a.out, "shards": len(m["shards"]), **m["tokens"]}))
    return 0
