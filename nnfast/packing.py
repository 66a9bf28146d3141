"""Document packing for the trainer (``--pack_documents``).

A corpus (or shard) is a stream of documents separated by the tokenizer's end-of-text
token (EOT). A document is taken to start at its EOT separator (``<EOT> text ...``, the
first document of a shard at token 0), so the token before an EOT predicts the EOT: the
model learns where documents end, and nothing is predicted across a document boundary.

``DocumentBatches`` draws each row of a batch from a document start, so every row begins
with a whole document; a row holds as many consecutive documents as fit and the last one
is cut at the row's end (as a document longer than ``block_size`` must be). With each batch
it returns the documents' boundaries over the batch's B*T tokens (row after row), which
the decoder hands to ``nnfast.functional.varlen_attention``: every token attends only
within its own document, positions restart at 0 per document, and no padding is computed.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from nnfast.data import DataError, GlobalOrder


def document_starts(shard: np.ndarray, eot: int) -> np.ndarray:
    """Indices where a document begins: 0 and every EOT."""
    starts = np.flatnonzero(shard == eot)
    return starts if starts.size and starts[0] == 0 else np.concatenate([[0], starts])


def boundaries(x: torch.Tensor, eot: int) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32 (n_docs + 1,), max_seqlen)`` of the documents in the rows of
    ``x`` (B, T): a document starts at each row start and at each EOT."""
    B, T = x.shape
    starts = x == eot
    starts[:, 0] = True
    first = torch.nonzero(starts.flatten()).flatten()
    cu = torch.cat([first, first.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


class DocumentBatches(GlobalOrder):
    """``D.Batches``' interface and global (world-size-independent) order, rows starting at
    document starts; ``next()`` returns ``(x, y, cu_seqlens, max_seqlen)``."""

    def __init__(self, shards, block_size: int, batch_size: int, device="cpu", seed: int = 0,
                 name: str = "train split", rank: int = 0, world: int = 1,
                 grad_accum: int = 1, stream: int = 0, *, eot: int):
        T = block_size
        self.shards = [s for s in shards if len(s) > T]
        # Valid row starts: document starts with block_size + 1 tokens after them.
        self.doc_starts = [d[d + T + 1 <= len(s)] for s in self.shards
                           for d in [document_starts(s, eot)]]
        self.counts = np.cumsum([0] + [len(d) for d in self.doc_starts])
        if self.counts[-1] == 0:
            raise DataError(
                f"the {name} has no document start with block_size + 1 = {T + 1} tokens "
                "after it: use a longer corpus or a smaller --block_size"
            )
        self.block_size, self.eot = T, eot
        self.device = torch.device(device)
        self._order(seed, batch_size, rank, world, grad_accum, stream)

    def __len__(self) -> int:
        return int(self.counts[-1])

    def next(self):
        T = self.block_size
        picks = self.next_picks(len(self))
        shard = np.searchsorted(self.counts, picks, side="right") - 1
        starts = [self.doc_starts[s][i - self.counts[s]] for s, i in zip(shard, picks)]
        rows = [self.shards[s][i:i + T + 1] for s, i in zip(shard, starts)]
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
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
