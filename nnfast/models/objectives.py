"""Pre-training objectives of the encoder models, on whole batches and on the batch's device.
Randomness comes from torch's global RNG on that device (or ``generator``), so the trainer's
saved RNG state makes a resumed run draw the same masks.

* ``mlm_mask``: BERT's masked LM (Devlin et al. 2019): 15% of the eligible tokens are chosen;
  of those 80% become [MASK], 10% a random token, 10% stay; only chosen ones are predicted.
* ``span_corrupt``: T5's span corruption (Raffel et al. 2020, sec. 3.1.4): ~15% of the tokens
  in spans of mean length 3; each span becomes one sentinel in the input, and the target
  lists ``sentinel_k span_k`` for every span, then EOS.
* ``transduction_task``: a generated sequence-to-sequence task for the Transformer
  (reverse or sort a random string), no download.
"""

from __future__ import annotations

import torch


def _rand(shape, device, generator=None) -> torch.Tensor:
    return torch.rand(shape, device=device, generator=generator)


def mlm_mask(ids: torch.Tensor, eligible: torch.Tensor, mask_id: int, vocab_size: int,
             prob: float = 0.15, generator: torch.Generator | None = None):
    """``(inputs, targets)``: ``targets`` holds the original id where a token was chosen and
    -100 elsewhere. ``eligible`` (bool, ids' shape) excludes padding and special tokens;
    random replacements come from ``[0, vocab_size)`` (the tokenizer's, not the specials)."""
    chosen = (_rand(ids.shape, ids.device, generator) < prob) & eligible
    targets = torch.where(chosen, ids, -100)
    r = _rand(ids.shape, ids.device, generator)
    random_ids = torch.randint(0, vocab_size, ids.shape, device=ids.device, generator=generator)
    inputs = torch.where(chosen & (r < 0.8), mask_id, ids)
    inputs = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, inputs)
    return inputs, targets


def _random_split(total: int, parts: int, rows: int, device, generator) -> torch.Tensor:
    """Per row, ``total`` split into ``parts`` positive integers uniformly over compositions:
    choose ``parts - 1`` distinct cut points among ``1 .. total - 1``. (rows, parts)."""
    if parts == 1:
        return torch.full((rows, 1), total, dtype=torch.long, device=device)
    order = _rand((rows, total - 1), device, generator).argsort(dim=1)  # random permutations
    cuts = (order[:, : parts - 1] + 1).sort(dim=1).values  # (rows, parts - 1)
    zero = torch.zeros(rows, 1, dtype=torch.long, device=device)
    end = torch.full((rows, 1), total, dtype=torch.long, device=device)
    return torch.cat((cuts, end), 1) - torch.cat((zero, cuts), 1)


def span_shape(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, spans) of a ``length``-token row, as T5's ``random_spans_noise_mask``."""
    n_noise = min(max(int(round(length * density)), 1), length - 1)
    n_spans = max(min(int(round(n_noise / mean_span)), n_noise, length - n_noise), 1)
    return n_noise, n_spans


def span_corrupt(ids: torch.Tensor, sentinel_ids: torch.Tensor, eos_id: int,
                 density: float = 0.15, mean_span: float = 3.0,
                 generator: torch.Generator | None = None):
    """``(inputs, targets)`` for rows ``ids`` (B, L), all rows of one length so every row
    gets the same number of noise tokens and spans and the outputs need no padding.

    inputs:  ``keep_0 <s0> keep_1 <s1> ... keep_{k-1} <s_{k-1}> [keep_k] EOS``
    targets: ``<s0> span_0 <s1> span_1 ... <s_{k-1}> span_{k-1} EOS``
    Every row starts with kept tokens (T5 alternates kept/noise segments from a kept one).
    """
    B, L = ids.shape
    if L < 2:
        raise ValueError(f"span corruption needs rows of >= 2 tokens, got {L}")
    n_noise, n_spans = span_shape(L, density, mean_span)
    if len(sentinel_ids) < n_spans:
        raise ValueError(f"{n_spans} spans need as many sentinels, have {len(sentinel_ids)}")
    dev = ids.device
    noise_len = _random_split(n_noise, n_spans, B, dev, generator)  # (B, k)
    keep_len = _random_split(L - n_noise, n_spans, B, dev, generator)  # (B, k)
    seg_len = torch.stack((keep_len, noise_len), dim=2).flatten(1)  # (B, 2k): keep, noise, ...
    seg_end = seg_len.cumsum(1)  # (B, 2k)
    pos = torch.arange(L, device=dev).expand(B, L).contiguous()
    seg = torch.searchsorted(seg_end, pos, right=True)  # (B, L) segment index of each token
    noise = seg % 2 == 1
    span = seg // 2  # (B, L) span / kept-segment number
    first = torch.ones_like(noise)
    first[:, 1:] = seg[:, 1:] != seg[:, :-1]  # first token of its segment
    sentinel_ids = sentinel_ids.to(dev)
    eos = torch.full((B, 1), eos_id, dtype=ids.dtype, device=dev)
    # Input: kept tokens, and each span's first token becomes its sentinel (the rest dropped).
    keep_in = ~noise | first
    values = torch.where(noise, sentinel_ids[span].to(ids.dtype), ids)
    inputs = values[keep_in].view(B, L - n_noise + n_spans)
    # Target: span tokens, and the first token of kept segment j (j < k) becomes sentinel j,
    # announcing span j that follows that segment.
    keep_out = noise | (first & ~noise & (span < n_spans))
    values = torch.where(noise, ids, sentinel_ids[span.clamp(max=n_spans - 1)].to(ids.dtype))
    targets = values[keep_out].view(B, n_noise + n_spans)
    return torch.cat((inputs, eos), 1), torch.cat((targets, eos), 1)


def span_uncorrupt(inputs: list[int], targets: list[int], sentinels: set[int],
                   eos_id: int) -> list[int]:
    """The original row from one ``span_corrupt`` pair (each sentinel replaced by its span)."""
    spans, cur = {}, None
    for t in targets:
        if t == eos_id:
            break
        if t in sentinels:
            cur = t
            spans[cur] = []
        elif cur is not None:
            spans[cur].append(t)
    out = []
    for t in inputs:
        if t == eos_id:
            break
        out.extend(spans.get(t, []) if t in sentinels else [t])
    return out


def transduction_task(batch_size: int, n_symbols: int, min_len: int, max_len: int,
                      pad_id: int, bos_id: int, eos_id: int, task: str = "reverse",
                      device=None, generator: torch.Generator | None = None) -> dict:
    """A batch of ``task`` ("reverse" or "sort") on random strings over ids ``0..n_symbols-1``
    of random lengths in ``[min_len, max_len]``, padded. Returns the Transformer's forward
    arguments: ``src`` (B, max_len + 1) = string, EOS, padding; ``tgt_in`` = BOS + answer
    (+ padding); ``targets`` = answer, EOS, then -100."""
    if task not in ("reverse", "sort"):
        raise ValueError(f"task must be 'reverse' or 'sort', got {task!r}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    B, S = batch_size, max_len + 1
    lengths = torch.randint(min_len, max_len + 1, (B, 1), device=device, generator=generator)
    sym = torch.randint(0, n_symbols, (B, max_len), device=device, generator=generator)
    pos = torch.arange(max_len, device=device).expand(B, max_len)
    real = pos < lengths  # (B, max_len)
    if task == "sort":
        # Padding sorts last: give it a key above every symbol.
        ans = torch.where(real, sym, n_symbols).sort(dim=1).values
    else:
        # Reverse the first `length` symbols: position p takes symbol length - 1 - p.
        idx = (lengths - 1 - pos).clamp(min=0)
        ans = sym.gather(1, idx)
    pad = torch.full((B, 1), pad_id, dtype=torch.long, device=device)
    src = torch.cat((torch.where(real, sym, pad_id), pad), 1)  # (B, S)
    src.scatter_(1, lengths, eos_id)
    out = torch.cat((torch.where(real, ans, pad_id), pad), 1)  # (B, S): answer, then EOS
    out.scatter_(1, lengths, eos_id)
    targets = torch.where(torch.arange(S, device=device) <= lengths, out, -100)
    bos = torch.full((B, 1), bos_id, dtype=torch.long, device=device)
    tgt_in = torch.cat((bos, out[:, :-1]), 1)
    return {"src": src, "tgt_in": tgt_in, "targets": targets}
