"""Packed variable-length attention, sliding windows, soft-capping, bottom-right causal and
the LSE output, on both paths (the Triton kernels through the interpreter, and the PyTorch
reference), against an oracle written here independently: each sequence on its own, dense,
in fp64. Outputs, lse and dq/dk/dv are checked everywhere, the gradients of a loss of both
out and lse (``(out * g).sum() + (lse * h).sum()``).

Interpreter packs are small (the interpreter's blocks are 32 x 16 / 16 x 32, so lengths up
to ~40 still give several blocks, tails and diagonals); the long mixed pack (1, 7, 113,
1023) runs on the reference path."""

import math

import pytest
import torch

import nnfast.functional as F
from tests.helpers import kernel_devices

K = pytest.importorskip("nnfast.kernels.attention")
BACKENDS = ["torch"] + (["triton"] if "cpu" in kernel_devices() else [])


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _pack(lens_q, lens_k, Hq, Hk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), Hq, D, generator=g).to(dtype)
    k = torch.randn(sum(lens_k), Hk, D, generator=g).to(dtype)
    v = torch.randn(sum(lens_k), Hk, D, generator=g).to(dtype)
    return q, k, v


def _oracle_seq(q, k, v, causal, window, softcap, scale, bottom_right, keep=None, p_drop=0.0):
    """One sequence, q (Lq, Hq, D), k/v (Lk, Hk, D) in fp64 -> (out (Lq, Hq, D), lse (Hq, Lq))."""
    Lq, Lk, g = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    d = Lk - Lq if bottom_right else 0
    rel = torch.arange(Lk)[None, :] - (torch.arange(Lq)[:, None] + d)  # key - diagonal
    left, right = window
    right = 0 if causal else right
    ok = torch.ones(Lq, Lk, dtype=torch.bool)
    if right >= 0:
        ok &= rel <= right
    if left >= 0:
        ok &= rel >= -left
    s = s.masked_fill(~ok, float("-inf"))
    m = s.detach().amax(-1, keepdim=True) if Lk else torch.zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    p = e / safe
    # Differentiable, -inf with zero gradient on rows that see no key.
    lse = torch.where(den > 0, torch.log(safe) + m, float("-inf")).squeeze(-1)
    if keep is not None:
        p = p * keep.double() / (1.0 - p_drop)
    return torch.einsum("hqk,khd->qhd", p, vv), lse


def _oracle(q, k, v, cq, ck, causal, window, softcap, scale, keep=None, p_drop=0.0):
    cq, ck = cq.tolist(), ck.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        kb = None if keep is None else keep[b, :, :cq[b + 1] - cq[b], :ck[b + 1] - ck[b]]
        o, lse = _oracle_seq(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                             causal, window, softcap, scale, True, kb, p_drop)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, 1)


def _grads(out, lse, leaves, dout, dlse):
    """d/d leaves of ``(out * dout).sum() + (lse * dlse).sum()`` (of out alone when dlse is
    None), as grad_outputs: -inf lse rows must give zero gradient, not NaN."""
    if dlse is None:
        return list(torch.autograd.grad(out, leaves, dout))
    return list(torch.autograd.grad((out, lse), leaves, (dout, dlse)))


def _dlse(lse, g, use_lse):
    return torch.randn(lse.shape, generator=g) if use_lse else None


def _check_varlen(monkeypatch, backend, lens_q, lens_k, Hq, Hk, D=16, causal=False,
                  window=(-1, -1), softcap=0.0, p_drop=0.0, tol=2e-5, use_lse=True):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    q, k, v = _pack(lens_q, lens_k, Hq, Hk, D, seed=sum(lens_q) + Hq * 10 + Hk)
    cq, ck = _cu(lens_q), _cu(lens_k)
    scale = 1.0 / math.sqrt(D)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(99)
    out, lse = F.varlen_attention(*leaves, cq, ck, max(lens_q), max(lens_k), causal=causal,
                                  window_size=window, softcap=softcap, dropout_p=p_drop,
                                  return_lse=True)
    keep = None
    if p_drop > 0.0:  # the kernels' own keep mask (the reference draws from torch's RNG)
        torch.manual_seed(99)
        keep = K.dropout_mask(K.draw_seed(), len(lens_q), Hq, max(lens_q), max(lens_k),
                              p_drop, "cpu")
    gen = torch.Generator().manual_seed(5)
    dout, dlse = torch.randn(out.shape, generator=gen), _dlse(lse, gen, use_lse)
    got = [out, *_grads(out, lse, leaves, dout, dlse)]
    wl = [t.double().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = _oracle(*wl, cq, ck, causal, window, softcap, scale, keep, p_drop)
    want = [want_out, *_grads(want_out, want_lse, wl, dout.double(),
                              None if dlse is None else dlse.double())]
    assert out.shape == q.shape and lse.shape == (Hq, q.shape[0])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)), "fully masked rows"
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin].double(), want_lse[fin], atol=tol, rtol=tol)
    big = max(1.0, *(w.abs().max().item() for w in want))
    for name, a, w in zip(["out", "dq", "dk", "dv"], got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), w, atol=tol * big, rtol=tol, msg=name)
    return got


# Lengths 0 and 1, tails, several blocks; q and k lengths differ for bottom-right alignment.
LQ, LK = [1, 7, 0, 40, 23], [1, 7, 5, 40, 30]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq,hk", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa2", "gqa4"])
def test_varlen_gqa_causal(monkeypatch, backend, hq, hk):
    _check_varlen(monkeypatch, backend, LQ, LK, hq, hk, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [
    dict(window=(2, 1)),  # narrower than a block
    dict(causal=True, window=(100, -1)),  # wider than every sequence
    dict(window=(-1, 3)),  # one-sided: right only
    dict(window=(9, -1)),  # one-sided: left only, not causal
    dict(causal=True, softcap=1.5),
    dict(window=(5, 5), softcap=2.0, D=40),
], ids=["small", "wide", "right", "left", "softcap", "both-D40"])
def test_varlen_windows_softcap(monkeypatch, backend, kw):
    _check_varlen(monkeypatch, backend, LQ, LK, 4, 2, **kw)


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_varlen_dropout_matches_oracle_with_kernel_mask(monkeypatch, backend):
    _check_varlen(monkeypatch, backend, LQ, LK, 2, 1, causal=True, p_drop=0.25)


def test_varlen_reference_long_mixed_pack(monkeypatch):
    """Lengths 1, 7, 113, 1023 in one pack, causal + window + softcap, GQA 2."""
    lens = [1, 7, 113, 1023]
    _check_varlen(monkeypatch, "torch", lens, lens, 2, 1, causal=True, window=(300, -1),
                  softcap=5.0, tol=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_fp16(monkeypatch, backend):
    """Low precision: within the error of the fp32 reference + fp16 rounding."""
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    q, k, v = _pack(LQ, LK, 4, 2, 32)
    cq, ck = _cu(LQ), _cu(LK)
    want = F.varlen_attention(q, k, v, cq, ck, 40, 40, causal=True)
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    got = F.varlen_attention(q.half(), k.half(), v.half(), cq, ck, 40, 40, causal=True)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=3e-3, rtol=3e-3)


# The forward's TMA path (CUDA sm_90+ only) forced through the interpreter: its descriptors
# bound the whole pack, so a sequence's edge blocks read the next sequence's rows.
NEEDS_INTERPRETER = pytest.mark.skipif("triton" not in BACKENDS,
                                       reason="needs the Triton interpreter")


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window=(5, 5), softcap=2.0, D=40)],
                         ids=["causal", "both-D40"])
@NEEDS_INTERPRETER
def test_varlen_tma_path(monkeypatch, kw):
    monkeypatch.setattr(K, "_tma_ok", lambda *ts: True)
    _check_varlen(monkeypatch, "triton", LQ, LK, 4, 2, **kw)


# The interpreter's numpy on sequence 3's NaN scores: the row max, and the max subtracted.
@pytest.mark.filterwarnings("ignore:All-NaN slice")
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("backend,tma", [(b, False) for b in BACKENDS] + [
    pytest.param("triton", True, id="triton-tma", marks=NEEDS_INTERPRETER)])
def test_varlen_never_reads_padding_or_other_sequences(monkeypatch, backend, tma):
    """q/k/v live in NaN-filled buffers (head dim padded to 24): the slack is never read; NaN
    in one sequence's keys/values never reaches the other sequences."""
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    monkeypatch.setattr(K, "_tma_ok", lambda *ts: tma)
    q, k, v = _pack(LQ, LK, 2, 2, 16)
    cq, ck = _cu(LQ), _cu(LK)
    bufs = [torch.full((t.shape[0], 2, 24), float("nan")) for t in (q, k, v)]
    for buf, t in zip(bufs, (q, k, v)):
        buf[..., :16] = t
    views = [b[..., :16].requires_grad_() for b in (b.clone() for b in bufs)]
    out = F.varlen_attention(*views, cq, ck, 40, 40, causal=True)
    want = F.varlen_attention(q, k, v, cq, ck, 40, 40, causal=True)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in views)
    k2, v2 = k.clone(), v.clone()
    k2[ck[3]:ck[4]] = float("nan")  # sequence 3
    v2[ck[3]:ck[4]] = float("nan")
    out = F.varlen_attention(q, k2, v2, cq, ck, 40, 40, causal=True)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[cq[3]:cq[4]] = False
    torch.testing.assert_close(out[others], want[others])


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_fully_masked_rows_are_zero(monkeypatch, backend):
    """Causal with Lq > Lk: the first Lq - Lk rows see no key (zeros, lse -inf, zero grads);
    a sequence with no keys at all likewise."""
    got = _check_varlen(monkeypatch, backend, [9, 4], [3, 0], 2, 1, causal=True)
    assert (got[0][:6] == 0).all() and (got[0][9:] == 0).all()
    assert (got[1][:6] == 0).all() and (got[1][9:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_loss_of_out_alone(monkeypatch, backend):
    """return_lse=True with a loss that ignores lse: the plain gradients."""
    _check_varlen(monkeypatch, backend, LQ, LK, 4, 2, causal=True, use_lse=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_loss_of_lse_alone(monkeypatch, backend):
    """A loss of lse alone (out's gradient is None, not zeros): d lse / d s = p."""
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    q, k, v = _pack(LQ, LK, 4, 2, 16)
    cq, ck = _cu(LQ), _cu(LK)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _, lse = F.varlen_attention(*leaves, cq, ck, 40, 40, causal=True, window_size=(6, -1),
                                return_lse=True)
    dlse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(lse, leaves, dlse, allow_unused=True)
    wl = [t.double().requires_grad_() for t in (q, k, v)]
    want_lse = _oracle(*wl, cq, ck, True, (6, -1), 0.0, 0.25)[1]
    want = torch.autograd.grad(want_lse, wl, dlse.double(), allow_unused=True)
    # lse does not depend on v: no gradient, on both paths, as in the fp64 oracle.
    assert want[2] is None and got[2] is None
    for name, a, w in zip(["dq", "dk"], got, want):
        torch.testing.assert_close(a.double(), w, atol=2e-5 * w.abs().max().item(),
                                   rtol=2e-5, msg=name)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("api", ["dense", "varlen"])
def test_unused_lse_costs_nothing_in_the_backward(monkeypatch, api):
    """Without return_lse, or with a loss that ignores lse, the backward gets no lse
    gradient (None, not a zero tensor to subtract): it does exactly the work it did
    before lse had a gradient."""
    monkeypatch.setenv("NNFAST_BACKEND", "triton")
    seen = []
    real = K._bwd

    def spy(*a):
        seen.append(a[-1])  # grad_lse
        return real(*a)

    monkeypatch.setattr(K, "_bwd", spy)
    if api == "dense":
        q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
        fn = lambda **kw: F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    else:
        q, k, v = (t.requires_grad_() for t in _pack([3, 9], [3, 9], 2, 1, 16))
        fn = lambda **kw: F.varlen_attention(q, k, v, _cu([3, 9]), _cu([3, 9]), 9, 9,
                                             causal=True, **kw)
    fn().sum().backward()
    fn(return_lse=True)[0].sum().backward()
    out, lse = fn(return_lse=True)
    (out.sum() + lse.sum()).backward()
    assert seen[0] is None and seen[1] is None and isinstance(seen[2], torch.Tensor)


def _bad(q, k, cq, ck, mq=40, mk=40):
    return lambda: F.varlen_attention(q, k, k, cq, ck, mq, mk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_bad_cu_seqlens(monkeypatch, backend):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    q, k, _ = _pack(LQ, LK, 2, 2, 16)
    cq, ck = _cu(LQ), _cu(LK)
    cases = [
        (_bad(q, k, torch.tensor([0, 5, 3, 71], dtype=torch.int32), ck), "cu_seqlens_q"),
        (_bad(q, k, cq, ck + 1), "cu_seqlens_k must start at 0"),
        (_bad(q, k, cq, torch.tensor([0, 1, 8, 13, 53, 80], dtype=torch.int32)),
         r"cu_seqlens_k\[-1\]"),
        (_bad(q, k, cq.long(), ck), "cu_seqlens_q must be a 1-D int32"),
        (_bad(q, k, cq.float(), ck), "cu_seqlens_q must be a 1-D int32"),
        (_bad(q, k, cq, ck, mq=39), "max_seqlen_q"),
        (_bad(q, k, cq, ck, mk=30), "max_seqlen_k"),
        (_bad(q, k, cq[:-1], ck), r"cu_seqlens_q\[-1\]"),
        (_bad(q, k, torch.tensor([0, 71], dtype=torch.int32), ck, mq=71),
         "same number of sequences"),
        (_bad(q[None], k, cq, ck), "q must be 3-D"),
        (lambda: F.varlen_attention(q, k, k, cq, ck, 40, 40, window_size=(-2, 0)),
         "window_size"),
        (lambda: F.varlen_attention(q, k, k, cq, ck, 40, 40, softcap=-1.0), "softcap"),
        (lambda: F.varlen_attention(q, k[:, :1].expand(-1, 3, -1), k[:, :1].expand(-1, 3, -1),
                                    cq, ck, 40, 40), "multiple of k/v heads"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    # A passed check is remembered per tensor, but an in-place change is checked again.
    cu = _cu(LQ)
    F.varlen_attention(q, q, q, cu, cu, 40, 40)
    cu[2] = 100
    with pytest.raises(ValueError, match="non-decreasing"):
        F.varlen_attention(q, q, q, cu, cu, 40, 40)


# ----------------------------------------------------------------------------- dense extras
def _check_dense(monkeypatch, backend, B, Hq, Hk, Lq, Lk, D, causal=False, window=None,
                 softcap=None, align="top_left", tol=2e-5):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    g = torch.Generator().manual_seed(Lq * 7 + Lk)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k, v = (torch.randn(B, Hk, Lk, D, generator=g) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = F.scaled_dot_product_attention(
        *leaves, is_causal=causal, enable_gqa=True, window_size=window, softcap=softcap,
        causal_alignment=align, return_lse=True)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    got = [out, *_grads(out, lse, leaves, dout, dlse)]
    wl = [t.double().requires_grad_() for t in (q, k, v)]
    outs, lses = [], []
    for b in range(B):  # the oracle takes (L, H, D)
        o, ls = _oracle_seq(*(t[b].transpose(0, 1) for t in wl), causal,
                            window or (-1, -1), softcap or 0.0, D**-0.5,
                            align == "bottom_right")
        outs.append(o.transpose(0, 1))
        lses.append(ls)
    want_out, want_lse = torch.stack(outs), torch.stack(lses)
    want = [want_out, *_grads(want_out, want_lse, wl, dout.double(), dlse.double())]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin].double(), want_lse[fin], atol=tol, rtol=tol)
    big = max(1.0, *(w.abs().max().item() for w in want))
    for name, a, w in zip(["out", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(a.double(), w, atol=tol * big, rtol=tol, msg=name)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [
    dict(causal=True, align="bottom_right"),  # Lq < Lk: the KV-cache case
    dict(causal=True, window=(3, -1)),  # Mistral-style, narrower than a block
    dict(window=(100, 100)),  # wider than the sequence: plain full attention
    dict(window=(-1, 2), softcap=3.0, align="bottom_right"),  # one-sided + softcap
    dict(causal=True, softcap=1.0),
], ids=["bottom-right", "sliding", "wide", "right-softcap", "causal-softcap"])
def test_dense_extras(monkeypatch, backend, kw):
    _check_dense(monkeypatch, backend, 2, 4, 2, 37, 53, 16, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_bottom_right_fully_masked_rows(monkeypatch, backend):
    """Lq > Lk bottom-right causal: the first Lq - Lk query rows see no key -> zeros."""
    got = _check_dense(monkeypatch, backend, 1, 2, 2, 40, 20, 16, causal=True,
                       align="bottom_right")
    assert (got[0][:, :, :20] == 0).all() and (got[1][:, :, :20] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_defaults_keep_pytorch_results(monkeypatch, backend):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    q, k, v = (torch.randn(1, 2, 19, 16) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = F.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=None,
                                         softcap=None)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_bad_extras(monkeypatch, backend):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    q = torch.randn(1, 2, 8, 16)
    for kw, match in [(dict(window_size=(1,)), "window_size"),
                      (dict(window_size=(1.5, 0)), "window_size"),
                      (dict(softcap=float("inf")), "softcap"),
                      (dict(causal_alignment="bottom"), "causal_alignment")]:
        with pytest.raises(ValueError, match=match):
            F.scaled_dot_product_attention(q, q, q, **kw)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
def test_varlen_kernel_traces_with_torch_compile():
    """The varlen custom op (its schema and fake impl) traces with no graph break."""
    q, k, v = _pack([3, 9], [3, 9], 2, 1, 16)
    cu = _cu([3, 9])
    want = K.varlen_attention(q, k, v, cu, cu, 9, 9, 0.0, True, 0.25, window=(4, -1))
    torch._dynamo.reset()
    fn = torch.compile(K.varlen_attention, backend="eager", fullgraph=True)
    assert torch.equal(fn(q, k, v, cu, cu, 9, 9, 0.0, True, 0.25, window=(4, -1)), want)
