"""Document packing for the trainer (``--pack_documents``).

A corpus (or shard) is a stream of documents separated by the tokenizer's end-of-text
token (EOT). A document is taken to start at its EOT separator (``<EOT> text ...``, the
first document of a shard at token 0), so the token before an EOT predicts the EOT: the
model learns where documents end, and nothing is predicted across a document boundary.

Policy: nothing is dropped, nothing is padded. Each shard is cut into consecutive rows of
``block_size`` tokens (row r holds tokens ``r*T .. r*T + T - 1`` as inputs and the next
``T`` as targets), so every token of the shard but its first is a target of exactly one
row. Documents run across rows: a document cut at a row's end continues as its own
document at the start of the next row, with positions restarting at 0 (it attends to its
own part in that row only). The shard's last ``(len - 1) mod T`` targets, too few for a
row, get a row that ends at the shard's end; its first targets, already those of the row
before, are ``-100`` (the loss's ignore index), so they are not counted twice (those tokens
are still context). A shard shorter than ``block_size + 1`` tokens cannot fill a row and is
skipped, with a warning. Rows are drawn in epochs: a fresh permutation of all rows per
epoch (keyed on the seed, the stream and the epoch), so within every epoch each target is
trained on exactly once, and the order does not depend on the world size.

With each batch ``next()`` returns the documents' boundaries over the batch's B*T tokens
(row after row; a document starts at each row start and each EOT), which the decoder hands
to ``nnfast.functional.varlen_attention``: every token attends only within its own
document, positions restart at 0 per document, and no padding is computed.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import torch

from nnfast.data import DataError, GlobalOrder

IGNORE = -100  # the decoder's default ignore_index: targets a tail row repeats


def boundaries(x: torch.Tensor, eot: int) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32 (n_docs + 1,), max_seqlen)`` of the documents in the rows of
    ``x`` (B, T): a document starts at each row start and at each EOT."""
    B, T = x.shape
    starts = x == eot
    starts[:, 0] = True
    first = torch.nonzero(starts.flatten()).flatten()
    cu = torch.cat([first, first.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def row_starts(n: int, T: int) -> tuple[np.ndarray, int]:
    """The rows tiling a shard of ``n`` tokens: their first tokens, and how many leading
    targets the last row repeats (0 when ``T`` divides ``n - 1``)."""
    full = (n - 1) // T
    rem = (n - 1) - full * T
    starts = np.arange(full, dtype=np.int64) * T
    if rem == 0:
        return starts, 0
    return np.append(starts, n - T - 1), T - rem


class DocumentBatches(GlobalOrder):
    """``D.Batches``' interface and global (world-size-independent) order over rows that
    tile the shards (see the module docstring); ``next()`` returns ``(x, y, cu_seqlens,
    max_seqlen)``, ``y`` with ``-100`` where a shard's tail row repeats targets."""

    def __init__(self, shards, block_size: int, batch_size: int, device="cpu", seed: int = 0,
                 name: str = "train split", rank: int = 0, world: int = 1,
                 grad_accum: int = 1, stream: int = 0, *, eot: int):
        T = block_size
        short = sum(len(s) <= T for s in shards)
        self.shards = [s for s in shards if len(s) > T]
        if not self.shards:
            raise DataError(
                f"the {name} has no shard of block_size + 1 = {T + 1} tokens: use a longer "
                "corpus or a smaller --block_size"
            )
        if short:
            warnings.warn(f"--pack_documents: {short} shard(s) of the {name} shorter than "
                          f"block_size + 1 = {T + 1} tokens are not used", stacklevel=2)
        rows = [row_starts(len(s), T) for s in self.shards]
        self.starts = [r[0] for r in rows]
        self.repeats = [r[1] for r in rows]
        self.counts = np.cumsum([0] + [len(r) for r in self.starts])
        self.block_size, self.eot = T, eot
        self.device = torch.device(device)
        self._perms: dict[int, np.ndarray] = {}
        self._order(seed, batch_size, rank, world, grad_accum, stream)

    def __len__(self) -> int:
        return int(self.counts[-1])

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:  # a step spans at most two epochs: keep two
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, self.stream, epoch])
            self._perms[epoch] = rng.permutation(len(self))
        return self._perms[epoch]

    def global_picks(self, step: int, n: int) -> np.ndarray:
        """Pick ``k`` of the run (``step * global batch + i``) is row ``perm_e[k mod n]`` of
        epoch ``e = k // n``: every row once per epoch, in a fresh order each epoch."""
        per = self.batch_size * self.world * self.grad_accum
        epoch, pos = np.divmod(step * per + np.arange(per, dtype=np.int64), n)
        out = np.empty(per, dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self._perm(int(e))[pos[sel]]
        return out

    def next(self):
        T = self.block_size
        picks = self.next_picks(len(self))
        shard = np.searchsorted(self.counts, picks, side="right") - 1
        xs, ys = [], []
        for s, i in zip(shard, picks):
            r = i - self.counts[s]
            start = int(self.starts[s][r])
            row = torch.from_numpy(self.shards[s][start:start + T + 1].astype(np.int64))
            y = row[1:].clone()
            if r == len(self.starts[s]) - 1 and self.repeats[s]:
                y[:self.repeats[s]] = IGNORE  # the row before already trains on these
            xs.append(row[:-1])
            ys.append(y)
        x, y = torch.stack(xs), torch.stack(ys)
        cu, max_len = boundaries(x, self.eot)  # on the host: no device sync
        dev = self.device
        return x.to(dev), y.to(dev), cu.to(dev), max_len


def batches_class(pack: bool, tokenizer, model: torch.nn.Module, batches_cls):
    """The trainer's batch source: ``batches_cls`` (``D.Batches``) unchanged, or with
    ``pack`` a ``DocumentBatches`` factory; clear errors when packing cannot work."""
    if not pack:
        return batches_cls
    eot = getattr(tokenizer, "eot", None)
    if eot is None:
        raise ValueError(
            f"--pack_documents needs EOT-separated documents; the {type(tokenizer).__name__} "
            "has no end-of-text token (use --tokenizer gpt2 or gpt2 .bin shards)"
        )
    if "cu_seqlens" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"--pack_documents: {type(model).__name__} does not take packed "
                         "documents (a decoder model does)")
    return lambda *a, **k: DocumentBatches(*a, **k, eot=eot)


def batch_kwargs(kw: dict, packed: tuple) -> dict:
    """The model's forward kwargs plus the documents' boundaries, when packing."""
    if packed:
        kw = dict(kw, cu_seqlens=packed[0], max_seqlen=packed[1])
    return kw
