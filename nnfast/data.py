"""Training data: tokenizers, corpus sources, and random-window batches.

Sources (``load_corpus``):

* ``shakespeare``: Tiny Shakespeare, from the first of ``shakespeare_candidates()`` that exists,
  else downloaded once into ``$NNFAST_CACHE_DIR`` (default ``~/.cache/nnfast``); sha256-checked.
* ``pystdlib``: the embedded default. The ASCII ``.py`` files of this machine's Python standard
  library in sorted order, capped at a few MB: no network, and a char vocabulary under 100.
* ``auto``: Tiny Shakespeare when it is on this machine already (``shakespeare_candidates``:
  ``$NNFAST_DATA_DIR``, the current folder, the cache), else ``pystdlib``; never a download.
  The corpus description says which, and where it looked.
* a path: a text file, a folder of text files, or ``.bin`` token shards (nanoGPT's raw uint16
  or llm.c's format with a 256-int32 header), memory-mapped; or a folder made by
  ``python -m nnfast prepare`` (its ``manifest.json`` gives the split and the tokenizer,
  headers are required, an unfinished folder is refused). Shards are never in memory whole:
  batches copy their windows, the trainer's id check scans 16M tokens at a time.

Tokenizers: ``char`` (built from the corpus, saved with the run as JSON), ``byte`` (256) and
``gpt2`` (tiktoken BPE; respects ``TIKTOKEN_CACHE_DIR``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "tinyshakespeare.txt"
PYSTDLIB_MAX_BYTES = 3_000_000
SOURCES = ("auto", "shakespeare", "pystdlib")
TOKENIZERS = ("auto", "char", "byte", "gpt2")
LLMC_MAGIC = 20240520
LLMC_HEADER_INTS = 256
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")


class DataError(ValueError):
    """A data source that cannot be used, with a message that says why and what to do."""


# ----------------------------------------------------------------------------- tokenizers
class CharTokenizer:
    """One id per distinct character of the corpus, in sorted order (nanoGPT's shakespeare_char)."""

    kind = "char"

    def __init__(self, chars: list[str], eot: bool = False):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + eot
        if eot:  # prepared shards separate documents by one extra id after the characters
            self.eot = len(self.chars)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> np.ndarray:
        # Vectorized: code points through a lookup table (a Python loop costs ~1 s per MB).
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        # int32 ids (-1: not in the vocabulary), then the smallest dtype that holds them:
        # a char corpus lives in memory for the whole run, 2 bytes a token rather than 8.
        table = np.full(int(max(codes.max(initial=0), points.max(initial=0))) + 1, -1, np.int32)
        table[codes] = np.arange(len(codes))
        ids = table[points]
        if (ids < 0).any():
            bad = sorted({chr(p) for p in points[ids < 0][:1000]})
            raise DataError(f"characters not in the char tokenizer's vocabulary: {bad[:10]!r}")
        return ids.astype(np.uint16) if len(codes) <= 1 << 16 else ids

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < self.vocab_size)

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars, "eot": hasattr(self, "eot")}


class ByteTokenizer:
    """UTF-8 bytes as ids: works for any text, including text that is not valid UTF-8."""

    kind = "byte"

    def __init__(self, eot: bool = False):
        self.vocab_size = 256 + eot
        if eot:  # prepared shards separate documents by id 256
            self.eot = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": "byte", "eot": hasattr(self, "eot")}


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken (set ``TIKTOKEN_CACHE_DIR`` to work offline).

    The BPE files load on first encode/decode, so training on pre-tokenized ``.bin``
    shards needs no tiktoken files at all."""

    kind = "gpt2"
    vocab_size = 50257
    eot = 50256  # <|endoftext|>

    def __init__(self):
        self._enc = None

    @property
    def enc(self):
        if self._enc is None:
            try:
                import tiktoken

                self._enc = tiktoken.get_encoding("gpt2")
            except Exception as e:  # no tiktoken, or offline without its cache
                raise DataError(
                    f"could not load GPT-2's BPE through tiktoken ({e}); offline, point "
                    "TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached gpt2 files"
                ) from e
        return self._enc

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.enc.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def to_dict(self) -> dict:
        return {"kind": "gpt2"}


Tokenizer = CharTokenizer | ByteTokenizer | GPT2Tokenizer


def tokenizer_from_dict(d: dict) -> Tokenizer:
    if d["kind"] == "char":
        return CharTokenizer(d["chars"], d.get("eot", False))
    if d["kind"] == "byte":
        return ByteTokenizer(d.get("eot", False))
    if d["kind"] == "gpt2":
        return GPT2Tokenizer()
    raise DataError(f"unknown tokenizer kind {d['kind']!r}; valid: char, byte, gpt2")


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tok.to_dict(), f)
    os.replace(tmp, path)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    with open(path, encoding="utf-8") as f:
        return tokenizer_from_dict(json.load(f))


# ----------------------------------------------------------------------------- sources
def cache_dir() -> Path:
    return Path(os.environ.get("NNFAST_CACHE_DIR") or Path.home() / ".cache" / "nnfast")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise DataError(
            f"sha256 mismatch for {path}: expected {expected}, got {got}. "
            "The file is corrupt or not the expected corpus: delete it and retry."
        )


def shakespeare_candidates() -> list[tuple[Path, str]]:
    """Where Tiny Shakespeare is looked for on this machine, in order, and how to name each:
    ``$NNFAST_DATA_DIR``, the folder the command runs in (``tinyshakespeare.txt``,
    ``data/tinyshakespeare.txt``, nanoGPT's ``data/shakespeare_char/input.txt``), the cache.
    Any file found must have the corpus's sha256, so a different file is never taken for it."""
    found = []
    data_dir = os.environ.get("NNFAST_DATA_DIR")
    if data_dir:
        found.append((Path(data_dir) / SHAKESPEARE_FILE, "from $NNFAST_DATA_DIR"))
    for rel in (SHAKESPEARE_FILE, f"data/{SHAKESPEARE_FILE}", "data/shakespeare_char/input.txt"):
        found.append((Path(rel), "from the current folder"))
    found.append((cache_dir() / SHAKESPEARE_FILE, f"from the cache {cache_dir()}"))
    return found


def _local_shakespeare() -> tuple[Path, str] | None:
    """Tiny Shakespeare already on this machine, and where it was found."""
    return next(((p, why) for p, why in shakespeare_candidates() if p.is_file()), None)


def _searched() -> str:
    """The places ``auto`` looked, for the line that says it did not find Tiny Shakespeare."""
    places = [str(p) if p.is_absolute() else f"./{p}" for p, _ in shakespeare_candidates()]
    unset = [] if os.environ.get("NNFAST_DATA_DIR") else ["$NNFAST_DATA_DIR (unset)"]
    return ", ".join(unset + places)


def shakespeare_path() -> tuple[Path, str]:
    """The checked Tiny Shakespeare file, downloading it on first use; and why it is that one."""
    found = _local_shakespeare()
    if found is None:
        dest = cache_dir() / SHAKESPEARE_FILE
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")  # several ranks may download
        try:
            urllib.request.urlretrieve(SHAKESPEARE_URL, tmp)
            check_sha256(tmp, SHAKESPEARE_SHA256)
        except (OSError, DataError) as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, DataError):
                raise
            raise DataError(
                f"could not download Tiny Shakespeare from {SHAKESPEARE_URL} ({e}). Put the file "
                f"at {dest} or $NNFAST_DATA_DIR/{SHAKESPEARE_FILE}, or use --data pystdlib."
            ) from e
        os.replace(tmp, dest)  # atomic: a reader never sees half a file
        found = dest, f"downloaded into {cache_dir()}"
    check_sha256(found[0], SHAKESPEARE_SHA256)
    return found


def pystdlib_text(max_bytes: int = PYSTDLIB_MAX_BYTES) -> tuple[str, int]:
    """The embedded corpus: ASCII ``.py`` files of the standard library, sorted by path.

    Tests, site-packages and bundled copies are skipped; each file is prefixed by its path.
    Returns the text and the number of files in it.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        paths += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    paths.sort(key=lambda p: p.relative_to(root).as_posix())
    parts, size = [], 0
    for p in paths:
        try:
            text = p.read_bytes().decode("ascii")
        except (OSError, UnicodeDecodeError):
            continue
        part = f"# file: {p.relative_to(root).as_posix()}\n{text}\n"
        parts.append(part)
        size += len(part)
        if size >= max_bytes:
            break
    if not parts:
        raise DataError(f"no readable .py files under {root}; pass --data PATH to a text file")
    return "".join(parts)[:max_bytes], len(parts)


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if not data:
        raise DataError(f"{path} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
            "use --tokenizer byte to train on its raw bytes"
        ) from e


def read_bin(path: Path, llmc: bool = False) -> np.ndarray:
    """Token ids of one shard, memory-mapped: llm.c's format (header) or nanoGPT's raw uint16
    (``llmc``: the header is required)."""
    nbytes = path.stat().st_size
    if nbytes == 0:
        raise DataError(f"{path} is empty")
    header = np.fromfile(path, dtype=np.int32, count=min(LLMC_HEADER_INTS, nbytes // 4))
    if llmc and (not header.size or header[0] != LLMC_MAGIC):
        got = int(header[0]) if header.size else None
        raise DataError(f"{path}: not an llm.c shard (magic {got}, want {LLMC_MAGIC})")
    if header.size and header[0] == LLMC_MAGIC:
        if header.size < LLMC_HEADER_INTS:
            raise DataError(f"{path}: llm.c header truncated")
        version, ntok = int(header[1]), int(header[2])
        # llm.c: version 1 holds GPT-2 uint16 ids, version 2 holds Llama-3 uint32 ids.
        dtype = {1: np.uint16, 2: np.uint32}.get(version)
        if dtype is None:
            raise DataError(f"{path}: unsupported llm.c shard version {version} (want 1 or 2)")
        offset = LLMC_HEADER_INTS * 4
        want = offset + ntok * np.dtype(dtype).itemsize
        if nbytes != want:
            raise DataError(f"{path}: header says {ntok} tokens ({want} bytes), the file has "
                            f"{nbytes} bytes: truncated or not a shard")
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(ntok,))
    if nbytes % 2:
        raise DataError(f"{path}: odd size; not a uint16 token file (nor llm.c's format)")
    return np.memmap(path, dtype=np.uint16, mode="r")


# ----------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """Token ids split into train and val, each a list of 1-D arrays (shards)."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    tokenizer: Tokenizer
    description: str  # the one line that says which corpus and why
    embedded: bool = False  # the embedded default (pystdlib), not data the user chose


def _split(ids: np.ndarray, val_fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    n_val = int(len(ids) * val_fraction)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    if isinstance(val, np.memmap):  # errors name positions in the shard file
        val.token_offset = getattr(ids, "token_offset", 0) + len(ids) - n_val
    return [train], ([val] if n_val else [])


def _make_tokenizer(name: str, text: str | None, saved: Tokenizer | None) -> Tokenizer:
    if saved is not None:
        return saved
    if name in ("auto", "char"):
        return CharTokenizer.from_text(text)
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise DataError(f"unknown tokenizer {name!r}; valid: {', '.join(TOKENIZERS)}")


def _text_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"no text files ({', '.join(TEXT_SUFFIXES)}) or .bin shards in {folder}")
    return files


def load_corpus(
    source: str = "auto",
    tokenizer: str = "auto",
    val_fraction: float = 0.1,
    saved_tokenizer: Tokenizer | None = None,
) -> Corpus:
    """Resolve ``source`` to token ids. ``saved_tokenizer`` (from a run being resumed) wins
    over ``tokenizer`` so that ids mean the same thing before and after the resume."""
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; valid: {', '.join(TOKENIZERS)}")
    path = Path(os.path.expanduser(source))
    embedded = False
    if source in SOURCES:
        auto = source == "auto"
        if auto:
            source = "shakespeare" if _local_shakespeare() else "pystdlib"
        if source == "shakespeare":
            file, why = shakespeare_path()
            text, desc = read_text(file), f"Tiny Shakespeare {why} ({file})"
        else:
            text, nfiles = pystdlib_text()
            embedded = True
            desc = (
                f"the EMBEDDED corpus pystdlib ({nfiles} files of this Python's standard "
                f"library, {len(text):,} characters)"
            )
            if auto:
                desc += (f", because --data auto found no Tiny Shakespeare in {_searched()}; "
                         "pass --data shakespeare to download it, or --data PATH for a file "
                         "or folder")
    elif path.is_dir() and (path / "manifest.json").is_file():
        return _load_prepared(path, tokenizer, saved_tokenizer)
    elif path.is_dir() and sorted(path.glob("*.bin")):
        return _load_shards(sorted(path.glob("*.bin")), tokenizer, val_fraction, saved_tokenizer)
    elif path.is_file() and path.suffix == ".bin":
        return _load_shards([path], tokenizer, val_fraction, saved_tokenizer)
    elif path.is_dir():
        files = _text_files(path)
        texts = []
        for f in files:
            if tokenizer == "byte" and f.stat().st_size:
                texts.append(f.read_bytes().decode("utf-8", errors="surrogateescape"))
            else:
                texts.append(read_text(f))
        text, desc = "\n".join(texts), f"{len(files)} text files in {path}"
    elif path.is_file():
        if tokenizer == "byte" or getattr(saved_tokenizer, "kind", None) == "byte":
            raw = path.read_bytes()
            if not raw:
                raise DataError(f"{path} is empty")
            tok = ByteTokenizer()
            train, val = _split(tok.encode(raw), val_fraction)
            return Corpus(train, val, tok, f"{path} (raw bytes)")
        text, desc = read_text(path), f"text file {path}"
    else:
        raise DataError(
            f"unknown data source {source!r}: not a file or folder. Valid names: "
            f"{', '.join(SOURCES)}; or a path to a text file, a folder, or .bin shards"
        )
    if not text:
        raise DataError(f"the corpus {desc} is empty")
    tok = _make_tokenizer(tokenizer, text, saved_tokenizer)
    if isinstance(tok, ByteTokenizer):
        ids = tok.encode(text.encode("utf-8", errors="surrogateescape"))
    else:
        ids = tok.encode(text)
    train, val = _split(ids, val_fraction)
    return Corpus(train, val, tok, f"{desc}; {tok.kind} tokenizer, {len(ids):,} tokens",
                  embedded)


def _load_shards(files, tokenizer, val_fraction, saved_tokenizer) -> Corpus:
    """llm.c names shards ``*_val_*.bin`` / ``*_train_*.bin``: use that split when present."""
    arrays = {f: read_bin(f) for f in files}
    val = [a for f, a in arrays.items() if "val" in f.stem]
    train = [a for f, a in arrays.items() if "val" not in f.stem]
    if not train:
        raise DataError(f"only validation shards among {[str(f) for f in files]}")
    if not val:  # one split from the last shard
        train_last, val = _split(train[-1], val_fraction)
        train = train[:-1] + train_last
    if tokenizer not in ("auto", "gpt2") and saved_tokenizer is None:
        raise DataError(".bin shards hold GPT-2 token ids: use --tokenizer gpt2 (or auto)")
    tok = saved_tokenizer or GPT2Tokenizer()
    ntok = sum(len(a) for a in train + val)
    where = files[0].parent if len(files) > 1 else files[0]
    return Corpus(train, val, tok, f"{len(files)} token shard(s) in {where}; {ntok:,} tokens")


def _load_prepared(folder: Path, tokenizer: str, saved_tokenizer) -> Corpus:
    """A folder made by ``python -m nnfast prepare``: its manifest names the shards, their
    split and the tokenizer; an unfinished one is refused (run prepare again to finish)."""
    where = folder / "manifest.json"
    try:
        m = json.loads(where.read_text())
        complete, shards, tok_dict = m["complete"], m["shards"], m["tokenizer"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: not a manifest written by nnfast prepare ({e!r})") from None
    if not complete:
        raise DataError(f"{where}: preparation did not finish; run the same prepare command "
                        "again to continue it")
    tok = saved_tokenizer or tokenizer_from_dict(tok_dict)
    if tokenizer not in ("auto", tok.kind):
        raise DataError(f"{folder} holds {tok.kind} token ids: use --tokenizer {tok.kind}")
    split = {"val": [], "train": []}
    for entry in shards:
        arr = read_bin(folder / entry["file"], llmc=True)
        if len(arr) != entry["tokens"]:
            raise DataError(f"{folder / entry['file']}: {len(arr)} tokens, the manifest says "
                            f"{entry['tokens']}")
        split[entry["split"]].append(arr)
    ntok = sum(e["tokens"] for e in shards)
    desc = f"{len(shards)} prepared shard(s) in {folder}; {tok.kind} tokenizer, {ntok:,} tokens"
    return Corpus(split["train"], split["val"], tok, desc)


# ----------------------------------------------------------------------------- batches
class GlobalOrder:
    """The world-size-independent sampling position shared by every batch source: step
    ``s`` draws ``batch_size * world * grad_accum`` picks from a generator keyed on
    ``(seed, stream, s)``; micro-batch ``m`` of rank ``r`` takes rows
    ``(m * world + r) * batch_size ...``. The state is ``(step, micro)``."""

    def _order(self, seed: int, batch_size: int, rank: int, world: int, grad_accum: int,
               stream: int) -> None:
        self.seed, self.stream, self.batch_size = seed, stream, batch_size
        self.rank, self.world, self.grad_accum = rank, world, grad_accum
        self.step, self.micro = 0, 0

    def global_picks(self, step: int, n: int) -> np.ndarray:
        """Every pick in ``range(n)`` of optimizer step ``step``, all ranks and micro-batches."""
        rng = np.random.default_rng([self.seed, self.stream, step])
        return rng.integers(n, size=self.batch_size * self.world * self.grad_accum)

    def next_picks(self, n: int) -> np.ndarray:
        """This rank's picks for the current micro-batch; advances the position."""
        first = (self.micro * self.world + self.rank) * self.batch_size
        picks = self.global_picks(self.step, n)[first : first + self.batch_size]
        self.micro += 1
        if self.micro == self.grad_accum:
            self.step, self.micro = self.step + 1, 0
        return picks

    def seek(self, step: int, micro: int = 0) -> None:
        """Continue from optimizer step ``step`` (what a resume does)."""
        self.step, self.micro = step, micro

    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if "step" not in state:
            raise DataError(
                "this checkpoint's data-sampler state is from an older nnfast (per-rank "
                "generators); its data order cannot be continued exactly"
            )
        self.seed = state.get("seed", self.seed)
        self.seek(state["step"], state["micro"])


class Batches(GlobalOrder):
    """Random windows of ``block_size + 1`` tokens: ``x`` and ``y`` shifted by one.

    The order is global, so it does not depend on the world size: optimizer step ``s``
    draws ``batch_size * world * grad_accum`` window starts from a generator keyed on
    ``(seed, stream, s)`` alone, and micro-batch ``m`` of rank ``r`` is rows
    ``(m * world + r) * batch_size ...`` of them. One rank with batch 8, one with batch 4
    and accumulation 2, and two ranks with batch 4 all train on the same tokens at every
    step. The state is the position ``(step, micro)``; resuming sets it, on any world size.
    Starts are uniform over every valid start across shards.
    """

    def __init__(
        self,
        shards: list[np.ndarray],
        block_size: int,
        batch_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        name: str = "train split",
        rank: int = 0,
        world: int = 1,
        grad_accum: int = 1,
        stream: int = 0,
    ):
        shards = [s for s in shards if len(s) > block_size]
        if not shards:
            raise DataError(
                f"the {name} is shorter than block_size + 1 = {block_size + 1} tokens: "
                "use a longer corpus or a smaller --block_size"
            )
        self.shards, self.block_size = shards, block_size
        self.device = torch.device(device)
        self._order(seed, batch_size, rank, world, grad_accum, stream)
        # Valid starts per shard: 0 .. len - block_size - 1.
        self.starts = np.cumsum([0] + [len(s) - block_size for s in shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        picks = self.next_picks(len(self))
        shard = np.searchsorted(self.starts, picks, side="right") - 1
        rows = [
            self.shards[s][i - self.starts[s] : i - self.starts[s] + T + 1]
            for s, i in zip(shard, picks)
        ]
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        x, y = xy[:, :-1], xy[:, 1:]
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with the previous step's kernels.
            x, y = x.pin_memory(), y.pin_memory()
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x.contiguous(), y.contiguous()
