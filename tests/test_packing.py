"""Document packing: the decoder on packed documents (cu_seqlens) gives exactly the losses
and gradients of the documents run one at a time (learned positions and RoPE; sliding
windows and soft-capping too), and the trainer's ``--pack_documents`` builds rows of whole
EOT-separated documents. On the reference path (the kernels are tested in
tests/kernels/test_attention_varlen.py), plus one tiny interpreter run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nnfast.__main__ as cli
from nnfast import packing
from nnfast import train as T
from nnfast.models.decoder import Decoder, DecoderConfig
from tests.helpers import kernel_devices

EOT = 0


def _docs(lens, seed=0):
    """Documents [EOT, tokens...] of the given lengths, plus the token after the last."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.tensor([EOT]), torch.randint(1, 64, (n - 1,), generator=g)])
            for n in lens]
    return docs, torch.tensor([EOT])


def _model(**kw):
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32,
                        dropout=0.0, fused_loss=False, **kw)
    return Decoder(cfg)


ROWS = [[5, 11, 8], [1, 23], [24]]  # three rows of T = 24: docs of 1..24 tokens


def _check_packed_equals_per_document(model):
    stream, grads = [], []
    per_doc_sum, n = 0.0, 0
    for r, lens in enumerate(ROWS):
        docs, nxt = _docs(lens, seed=r)
        row = torch.cat(docs + [nxt])  # T + 1 tokens: the next row's-first token ends it
        stream.append(row)
        for i, d in enumerate(docs):  # targets: the next token, the next document's EOT
            tgt = torch.cat([d[1:], (docs[i + 1] if i + 1 < len(docs) else nxt)[:1]])
            model.zero_grad()
            loss = model(d[None], tgt[None])[1]
            (loss * len(d)).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            per_doc_sum += loss.item() * len(d)
            n += len(d)
    xy = torch.stack(stream)
    x, y = xy[:, :-1], xy[:, 1:]
    cu, max_len = packing.boundaries(x, EOT)
    assert cu.tolist() == [0, 5, 16, 24, 25, 48, 72] and max_len == 24
    model.zero_grad()
    loss = model(x, y, cu_seqlens=cu, max_seqlen=max_len)[1]
    (loss * n).backward()
    torch.testing.assert_close(loss.item(), per_doc_sum / n, rtol=1e-5, atol=1e-6)
    want = [sum(g[i] for g in grads) for i in range(len(grads[0]))]
    for (name, p), w in zip(model.named_parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6, msg=name)
    return loss


@pytest.mark.parametrize("kw", [
    dict(pos="learned"),
    dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
    dict(pos="rope", window_size=4, window_every=2, attn_softcap=5.0),  # Gemma-2-style
], ids=["gpt2", "llama-gqa", "local-softcap"])
def test_packed_loss_equals_per_document_losses(monkeypatch, kw):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    _check_packed_equals_per_document(_model(**kw))


@pytest.mark.skipif("cpu" not in kernel_devices(), reason="needs the Triton interpreter")
def test_packed_kernel_path_matches_reference(monkeypatch):
    """The same packed batch through the varlen kernel (fp32, interpreter) and the reference."""
    model = _model(pos="rope", window_size=6)
    docs, nxt = _docs([3, 9, 4])
    xy = torch.cat(docs + [nxt])[None]
    x, y = xy[:, :-1], xy[:, 1:]
    cu, m = packing.boundaries(x, EOT)
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    want = model(x, y, cu_seqlens=cu, max_seqlen=m)[1]
    monkeypatch.setenv("NNFAST_BACKEND", "triton")
    got = model(x, y, cu_seqlens=cu, max_seqlen=m)[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_window_model_is_config_and_differs_from_global(monkeypatch):
    """window_size changes what a token sees (so the config takes effect), and a window
    wider than the sequence is exactly global attention."""
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    x = torch.randint(0, 64, (2, 20))
    base = _model()(x)[0]
    assert not torch.allclose(_model(window_size=4)(x)[0], base)
    torch.testing.assert_close(_model(window_size=32)(x)[0], base)
    with pytest.raises(ValueError, match="window_size"):
        DecoderConfig(window_size=0)
    with pytest.raises(ValueError, match="attn_softcap"):
        DecoderConfig(attn_softcap=-1.0)


def _id_shard(lens, first=1):
    """Documents [EOT, ids...] with every non-EOT token unique (ids from ``first`` up), so a
    target identifies its corpus position."""
    docs, nxt = [], first
    for n in lens:
        docs.append(np.r_[EOT, np.arange(nxt, nxt + n - 1)])
        nxt += n - 1
    return np.concatenate(docs).astype(np.int64)


def _epoch_targets(b, n_steps):
    """Every (input, target) pair and document the batches give in ``n_steps``, with checks
    that hold for every row: y is x shifted, cu_seqlens cut at row starts and EOTs."""
    pairs, T = [], b.block_size
    for _ in range(n_steps):
        x, y, cu, m = b.next()
        assert torch.equal(x[:, 1:][y[:, :-1] != packing.IGNORE],
                           y[:, :-1][y[:, :-1] != packing.IGNORE])
        starts = set(cu[:-1].tolist())
        want = {r * T for r in range(x.shape[0])} | set(torch.nonzero(x.flatten() == EOT)
                                                       .flatten().tolist())
        assert starts == want and cu[-1] == x.numel()
        assert m == int((cu[1:] - cu[:-1]).max()) <= T
        keep = y != packing.IGNORE
        pairs += list(zip(x[keep].tolist(), y[keep].tolist()))
    return pairs


@pytest.mark.parametrize("T", [16, 7])
def test_document_batches_train_on_every_target_once_per_epoch(T):
    """The packing policy: rows tile each shard, a document cut at a row's end continues at
    the next row's start, the shard's tail row ignores the targets it repeats, and each
    epoch is a permutation of the rows. So in every epoch each corpus target (every token
    but a shard's first) comes exactly once, with its true predecessor as its input. A
    shard too short for one row is skipped with a warning."""
    a = _id_shard([3, 30, 7, 12, 40, 5, 9, 20])  # 126 tokens, documents longer than T too
    c = _id_shard([9, 25, 4], first=int(a.max()) + 1)
    short = np.r_[EOT, 900, 901].astype(np.int64)
    with pytest.warns(UserWarning, match="1 shard"):
        b = packing.DocumentBatches([a, short, c], T, 1, seed=3, eot=EOT)
    n_rows = sum(-(-(len(s) - 1) // T) for s in (a, c))  # ceil((len - 1) / T) per shard
    assert len(b) == n_rows
    want = sorted(zip(np.r_[a[:-1], c[:-1]].tolist(), np.r_[a[1:], c[1:]].tolist()))
    for _ in range(2):  # batch 1: n_rows steps are one epoch
        assert sorted(_epoch_targets(b, n_rows)) == want


def test_document_batches_epochs_are_permutations_across_steps():
    """With a global batch that does not divide the rows, a step straddles two epochs: the
    picks, not the steps, make the epochs (and the world size does not change them)."""
    shard = _id_shard([3, 30, 7, 12, 40, 5, 9, 20])
    b = packing.DocumentBatches([shard], 16, 3, seed=1, eot=EOT)
    n = len(b)
    assert n % 3
    flat = np.concatenate([b.global_picks(s, n) for s in range(-(-3 * n // 3))])
    for e in range(3):
        assert sorted(flat[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(flat[:n], flat[n:2 * n])  # a fresh order each epoch
    ranks = [packing.DocumentBatches([shard], 16, 1, seed=1, eot=EOT, rank=r, world=3)
             for r in range(3)]
    one = b.next()[0]
    assert torch.equal(torch.cat([r.next()[0] for r in ranks]), one)


def test_document_batches_loss_equals_per_document_losses(monkeypatch):
    """A batch of DocumentBatches rows (documents continued across rows, a tail row with
    ignored targets): the packed loss is the mean of the per-document losses, each piece
    run on its own with positions from 0."""
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    model = _model(pos="rope")
    ids = _id_shard([3, 30, 7, 12, 5, 9])  # 66 tokens: rows at 0, 24 and a tail at 41
    shard = np.where(ids == EOT, EOT, ids % 63 + 1)  # into the vocabulary
    b = packing.DocumentBatches([shard], 24, 3, seed=0, eot=EOT)
    x, y, cu, m = b.next()
    assert len(b) == 3 and (y == packing.IGNORE).sum() == 7  # all rows, the tail's repeats
    xf, yf, total, n = x.flatten(), y.flatten(), 0.0, 0
    with torch.no_grad():
        packed = model(x, y, cu_seqlens=cu, max_seqlen=m)[1]
        for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
            k = int((yf[lo:hi] != packing.IGNORE).sum())
            if k:
                total += model(xf[None, lo:hi], yf[None, lo:hi])[1].item() * k
                n += k
    torch.testing.assert_close(packed.item(), total / n, rtol=1e-5, atol=1e-6)


def _write_bin_corpus(folder):
    """A .bin shard (nanoGPT's raw uint16) of GPT-2-token documents separated by EOT."""
    rng = np.random.default_rng(0)
    eot = 50256
    docs = [np.r_[eot, rng.integers(100, 140, rng.integers(3, 30))] for _ in range(300)]
    np.concatenate(docs).astype(np.uint16).tofile(folder / "train.bin")
    return folder


def _args(data, out, **extra):
    fields = dict(model="gpt2", preset="debug", data=data, out=out, n_layer=1, n_embd=32,
                  n_head=2, block_size=32, batch_size=4, max_steps=4, warmup_steps=1,
                  eval_interval=1000, eval_steps=1, log_interval=1, sample_tokens=0,
                  seed=0, device="cpu", **extra)
    return [x for k, v in fields.items() for x in (f"--{k}", str(v))]


def test_trainer_pack_documents(tmp_path, monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    data = _write_bin_corpus(tmp_path)
    cfg, overrides, resume, given = cli.parse_args(
        _args(data, tmp_path / "run", pack_documents=True))
    assert cfg.pack_documents
    res = T.train(cfg, overrides, resume, given, show_progress=False)
    assert len(res["losses"]) == 4 and all(np.isfinite(res["losses"]))


def test_trainer_pack_documents_needs_eot(tmp_path, monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    (tmp_path / "c.txt").write_text("some text without documents " * 50)
    cfg, overrides, resume, given = cli.parse_args(
        _args(tmp_path / "c.txt", tmp_path / "run", pack_documents=True))
    with pytest.raises(ValueError, match="pack_documents"):
        T.train(cfg, overrides, resume, given, show_progress=False)


def test_windowed_kv_cache_matches_full_forward(monkeypatch):
    """Token-by-token decoding through KV caches (bottom-right causal + window) gives the
    full forward's hidden states."""
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    model = _model(pos="rope", window_size=3, attn_softcap=4.0).eval()
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = model.hidden_states(x)
        caches = model.make_caches(2, 9)
        steps = [model.hidden_states(x[:, :4], caches)]
        steps += [model.hidden_states(x[:, t:t + 1], caches) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_mha_window_softcap_fast_and_weights_paths_agree(monkeypatch):
    import nnfast

    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    torch.manual_seed(0)
    mha = nnfast.Attention(32, 4, batch_first=True, window_size=(2, 1), softcap=3.0).eval()
    x = torch.randn(2, 11, 32)
    fast = mha(x, x, x, need_weights=False)[0]
    slow, w = mha(x, x, x, need_weights=True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    i, j = torch.arange(11)[:, None], torch.arange(11)[None, :]
    assert (w[:, (j < i - 2) | (j > i + 1)] == 0).all()  # outside the window: no weight
    plain = nnfast.Attention(32, 4, batch_first=True).eval()
    plain.load_state_dict(mha.state_dict())
    assert not torch.allclose(plain(x, x, x, need_weights=False)[0], fast)
