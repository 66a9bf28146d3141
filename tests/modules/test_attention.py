"""nnfast.Attention against nn.MultiheadAttention, patch(), and the native SelfAttention /
CrossAttention / KVCache against hand-written attention. The modules run whichever path the
backend picks (the kernel through the interpreter by default on CPU, the reference with
NNFAST_TEST_INTERPRET=0). Masks keep key 0 open so that no row is fully masked, where
PyTorch gives NaN and nnfast zeros (tested on its own)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import nnfast
from nnfast.reference.rope import apply_rotary
from tests.helpers import CUDA, assert_close_lowp

DEVICE = "cuda" if CUDA else "cpu"
E, H, B, L, S = 16, 4, 2, 5, 7


# ----------------------------------------------------------------------------- MHA drop-in
def _pair(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, device=DEVICE, dtype=dtype, **kw)
    if ref.bias_k is None and ref.in_proj_bias is not None:
        with torch.no_grad():  # zero-initialized by default: make the biases matter
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    ours = nnfast.Attention(E, H, device=DEVICE, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _masks(case: dict, Lq: int, Sk: int, batched: bool = True):
    """The case's key padding mask (B, S) or (S,) and attn mask (L, S) or (B*H, L, S)."""
    g = torch.Generator().manual_seed(1)
    kpm = am = None
    kind = case.get("kpm")
    if kind:
        shape = (B, Sk) if batched else (Sk,)
        pad = torch.rand(shape, generator=g) < 0.4
        pad[..., 0] = False
        kpm = pad if kind == "bool" else torch.randn(shape, generator=g).masked_fill(pad, -math.inf)
    kind = case.get("am")
    if kind:
        shape = (Lq, Sk) if case.get("am_dim", 2) == 2 else ((B if batched else 1) * H, Lq, Sk)
        if kind == "causal":
            am = torch.ones(Lq, Sk, dtype=torch.bool).triu(1)
            if case.get("causal_mask") != "bool":
                am = nn.Transformer.generate_square_subsequent_mask(Lq)
        else:
            block = torch.rand(shape, generator=g) < 0.4
            block[..., 0] = False
            if kind == "bool":
                am = block
            else:
                am = torch.randn(shape, generator=g).masked_fill(block, -math.inf)
    return [None if m is None else m.to(DEVICE) for m in (kpm, am)]


CASES = {
    "plain": {},
    "batch_first": {"ctor": {"batch_first": True}},
    "self_attention": {"ctor": {"batch_first": True}, "self": True},
    "kdim_vdim": {"ctor": {"kdim": 12, "vdim": 10}, "kpm": "bool"},
    "kdim_vdim_batch_first": {"ctor": {"kdim": 12, "vdim": 10, "batch_first": True}, "am": "float"},
    "no_bias": {"ctor": {"bias": False}, "am": "bool"},
    "bias_kv": {"ctor": {"add_bias_kv": True}, "kpm": "bool", "am": "float"},
    "zero_attn": {"ctor": {"add_zero_attn": True}, "kpm": "float", "am": "bool", "am_dim": 3},
    "bias_kv_zero_attn": {"ctor": {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True},
                          "kpm": "bool", "am": "bool"},
    "kpm_bool": {"kpm": "bool"},
    "kpm_float": {"kpm": "float"},
    "am2_bool": {"am": "bool"},
    "am2_float": {"am": "float"},
    "am3_bool": {"am": "bool", "am_dim": 3},
    "am3_float": {"am": "float", "am_dim": 3},
    "both_bool": {"kpm": "bool", "am": "bool", "am_dim": 3, "ctor": {"batch_first": True}},
    "both_float": {"kpm": "float", "am": "float"},
    "causal_hint": {"self": True, "am": "causal", "is_causal": True},
    "causal_hint_bool_kpm": {"self": True, "am": "causal", "causal_mask": "bool", "is_causal": True,
                             "kpm": "bool"},
    "unbatched": {"batched": False, "kpm": "bool", "am": "float", "am_dim": 3},
    "unbatched_self": {"batched": False, "self": True},
}
WEIGHTS = {"none": (False, True), "avg": (True, True), "per_head": (True, False)}


def _inputs(ref: nn.MultiheadAttention, case: dict, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    batched = case.get("batched", True)
    Sk = L if case.get("self") else S

    def make(n, d):
        shape = ((B, n, d) if ref.batch_first else (n, B, d)) if batched else (n, d)
        return torch.randn(shape, generator=g).to(DEVICE, dtype)

    q = make(L, E)
    if case.get("self"):
        return q, q, q
    return q, make(Sk, ref.kdim), make(Sk, ref.vdim)


def _run(mod, inputs, kpm, am, case, need_weights, average, grad_out):
    """Forward + backward with fresh leaf copies; returns (out, weights, input grads)."""
    if case.get("self"):  # one tensor passed three times, as self-attention callers do
        x = inputs[0].detach().clone().requires_grad_()
        q = k = v = x
        leaves = (x,)
    else:
        leaves = tuple(t.detach().clone().requires_grad_() for t in inputs)
        q, k, v = leaves
    am = None if am is None else am.detach().clone().requires_grad_(am.is_floating_point())
    out, w = mod(q, k, v, key_padding_mask=kpm, need_weights=need_weights, attn_mask=am,
                 average_attn_weights=average, is_causal=case.get("is_causal", False))
    out.backward(grad_out)
    grads = [t.grad for t in leaves] + ([am.grad] if am is not None and am.requires_grad else [])
    return out, w, grads


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_multihead_attention(name, weights):
    case = CASES[name]
    need_weights, average = WEIGHTS[weights]
    ref, ours = _pair(**case.get("ctor", {}))
    inputs = _inputs(ref, case)
    batched = case.get("batched", True)
    kpm, am = _masks(case, L, L if case.get("self") else S, batched)
    with torch.no_grad():
        expected = ref(*inputs, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights,
                       is_causal=case.get("is_causal", False))[0]
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out_r, w_r, g_r = _run(ref, inputs, kpm, am, case, need_weights, average, grad_out)
    out_n, w_n, g_n = _run(ours, inputs, kpm, am, case, need_weights, average, grad_out)
    assert_close_lowp("output", out_n, out_r, out_r)
    if need_weights:
        assert_close_lowp("weights", w_n, w_r, w_r)
    else:
        assert w_n is None
    for i, (a, b) in enumerate(zip(g_n, g_r)):
        if b is None:  # the causal hint drops a float attn_mask: no gradient in either
            assert a is None
            continue
        assert_close_lowp(f"input grad {i}", a, b, b)
    params_r = dict(ref.named_parameters())
    for pname, p in ours.named_parameters():
        assert_close_lowp(f"{pname}.grad", p.grad, params_r[pname].grad, params_r[pname].grad)


def test_attention_fp16_within_torch_error():
    case = CASES["both_bool"]
    ref32, _ = _pair(**case["ctor"])
    ref16, ours = _pair(torch.float16, **case["ctor"])
    inputs = _inputs(ref32, case)
    kpm, am = _masks(case, L, S)
    g = torch.randn(B, L, E, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out32, _, gr32 = _run(ref32, inputs, kpm, am, case, False, True, g)
    in16 = [t.half() for t in inputs]
    out16, _, gr16 = _run(ref16, in16, kpm, am, case, False, True, g.half())
    out, _, gr = _run(ours, in16, kpm, am, case, False, True, g.half())
    assert out.dtype == torch.float16
    assert_close_lowp("output", out, out32, out16)
    for i in range(3):
        assert_close_lowp(f"input grad {i}", gr[i], gr32[i], gr16[i], factor=3.0)


def test_attention_init_and_state_dict_match_torch():
    for kw in ({}, {"kdim": 12, "vdim": 10, "add_bias_kv": True}, {"bias": False}):
        torch.manual_seed(5)
        ref = nn.MultiheadAttention(E, H, **kw)
        torch.manual_seed(5)
        ours = nnfast.Attention(E, H, **kw)
        sd_r, sd_n = ref.state_dict(), ours.state_dict()
        assert list(sd_r) == list(sd_n)
        for key in sd_r:
            assert torch.equal(sd_r[key], sd_n[key]), key
        ref.load_state_dict(sd_n)  # and back


def test_attention_fully_masked_rows_are_zero():
    """Where PyTorch gives NaN, nnfast attends to nothing: the output is out_proj's bias."""
    ref, ours = _pair(batch_first=True)
    x = torch.randn(B, L, E, device=DEVICE)
    kpm = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    kpm[0] = True
    for need_weights in (False, True):
        out, w = ours(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        assert not out.isnan().any()
        torch.testing.assert_close(out[0], ours.out_proj.bias.detach().expand(L, E))
        torch.testing.assert_close(out[1], ref(x, x, x, key_padding_mask=kpm)[0][1])
        if need_weights:
            assert (w[0] == 0).all()


def test_attention_dropout_only_in_training():
    _, ours = _pair(dropout=0.5, batch_first=True)
    x = torch.randn(B, L, E, device=DEVICE)
    ours.eval()
    a = ours(x, x, x, need_weights=False)[0]
    assert torch.equal(a, ours(x, x, x, need_weights=False)[0])
    ours.train()
    assert not torch.allclose(a, ours(x, x, x, need_weights=False)[0])


def test_attention_bad_input():
    _, ours = _pair()
    q, k = torch.randn(L, B, E, device=DEVICE), torch.randn(S, B, E, device=DEVICE)
    with pytest.raises(ValueError, match="attn_mask"):
        ours(q, k, k, attn_mask=torch.zeros(L, L, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(q, k, k, key_padding_mask=torch.zeros(B, L, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="attn_mask"):
        ours(q, k, k, attn_mask=torch.zeros(L, S, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="embed_dim"):
        ours(q[..., :8], k, k)
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(q, q, q, is_causal=True)
    with pytest.raises(ValueError, match="divisible"):
        nnfast.Attention(10, 4)


# ----------------------------------------------------------------------------- patch
def _encoder(norm_first: bool):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.1, batch_first=True,
                                       norm_first=norm_first)
    return nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(E)).to(DEVICE).eval()


# The "before" run must take PyTorch's own inference fast path, nested tensors included
# (enable_nested_tensor's default), to prove patch() bypasses it; torch warns about that
# prototype path and, with norm_first, that it cannot use it. Expected here, not our code's.
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True, but self.use_nested_tensor")
@pytest.mark.parametrize("norm_first", [False, True])
def test_patch_transformer_encoder(norm_first, monkeypatch):
    model = _encoder(norm_first)
    x = torch.randn(B, 6, E, device=DEVICE)
    kpm = torch.zeros(B, 6, dtype=torch.bool, device=DEVICE)
    kpm[1, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6, device=DEVICE)
    def run():
        with torch.no_grad():  # no grad + eval: PyTorch's fused fast paths would apply
            return [model(x), model(x, src_key_padding_mask=kpm),
                    model(x, mask=causal, is_causal=True)]

    before = run()
    assert patch_returns_same(model)
    assert all(type(layer.self_attn) is nnfast.Attention for layer in model.layers)
    assert all(type(m) is nnfast.LayerNorm for m in (model.norm, model.layers[0].norm1))
    calls = []
    sdpa = nnfast.functional.scaled_dot_product_attention
    monkeypatch.setattr(nnfast.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    after = run()
    assert len(calls) == 6, "the fused PyTorch fast path bypassed nnfast"
    real = ~kpm  # PyTorch's nested-tensor path zeroes padded positions: compare real ones
    assert_close_lowp("no mask", after[0], before[0], before[0])
    assert_close_lowp("padding", after[1][real], before[1][real], before[1][real])
    assert_close_lowp("causal", after[2], before[2], before[2])


def patch_returns_same(model):
    return nnfast.patch(model) is model


def test_patch_transformer_keeps_training_grads():
    torch.manual_seed(0)
    model = nn.Transformer(E, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                           dropout=0.0, batch_first=True).to(DEVICE)
    src, tgt = torch.randn(B, 7, E, device=DEVICE), torch.randn(B, 5, E, device=DEVICE)
    mask = nn.Transformer.generate_square_subsequent_mask(5, device=DEVICE)
    before = model(src, tgt, tgt_mask=mask, tgt_is_causal=True)
    before.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    nnfast.patch(model)
    assert type(model.decoder.layers[0].multihead_attn) is nnfast.Attention
    after = model(src, tgt, tgt_mask=mask, tgt_is_causal=True)
    after.sum().backward()
    assert_close_lowp("output", after, before, before)
    for n, p in model.named_parameters():
        assert_close_lowp(n, p.grad, grads[n], grads[n])


def test_patch_rms_norm_shared_and_root():
    rms = nn.RMSNorm(E, eps=1e-6, device=DEVICE)
    with torch.no_grad():
        rms.weight.normal_()
    model = nn.Sequential(nn.Linear(E, E), rms, rms).to(DEVICE)
    x = torch.randn(3, E, device=DEVICE)
    expected = model(x)
    nnfast.patch(model)
    assert type(model[1]) is nnfast.RMSNorm and model[1] is model[2]
    assert_close_lowp("output", model(x), expected, expected)
    ln = nn.LayerNorm(E, bias=False)
    assert type(nnfast.patch(ln)) is nnfast.LayerNorm and nnfast.patch(ln).bias is None


# ----------------------------------------------------------------------------- SelfAttention
def _naive(m, x, mask=None, offset=0):
    """Hand-written attention with m's weights: all keys materialized, k/v repeated for GQA."""
    Bx, T, _ = x.shape
    Hq, Hk, D = m.n_heads, m.n_kv_heads, m.head_dim
    q, k, v = nn.functional.linear(x, m.qkv.weight, m.qkv.bias).split([Hq * D, Hk * D, Hk * D], -1)
    q = q.view(Bx, T, Hq, D).transpose(1, 2)
    k = k.view(Bx, T, Hk, D).transpose(1, 2)
    v = v.view(Bx, T, Hk, D).transpose(1, 2)
    if m.rotary is not None:
        q, k = apply_rotary(q, k, m.rotary.cos, m.rotary.sin, None, offset, m.rotary.interleaved)
    k, v = k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1)
    s = q @ k.transpose(-1, -2) * (m.scale if m.scale is not None else D ** -0.5)
    if m.causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(Bx, T, Hq * D)
    return m.proj(y)


SA_CASES = {
    "mha": {"n_kv_heads": None},
    "gqa_rope": {"n_kv_heads": 2, "rope": True},
    "mqa_bias_interleaved": {"n_kv_heads": 1, "rope": True, "rope_interleaved": True, "bias": True},
    "partial_rotary": {"n_kv_heads": 2, "rope": True, "rotary_dim": 4},
    "bidirectional_padding": {"causal": False, "mask": "padding"},
    "causal_padding": {"mask": "padding", "n_kv_heads": 2},
    "t5_bias": {"causal": True, "mask": "bias", "scale": 1.0},
    "bidirectional_bias": {"causal": False, "mask": "bias", "scale": 1.0},
}


def _sa_mask(kind, T):
    if kind == "padding":  # batch 1 padded after 4 tokens: (B, 1, 1, T)
        keep = torch.ones(B, 1, 1, T, dtype=torch.bool)
        keep[1, ..., 4:] = False
        return keep.to(DEVICE)
    if kind == "bias":  # a learned per-head bias: (1, H, T, T) with its gradient
        g = torch.Generator().manual_seed(4)
        return torch.randn(1, H, T, T, generator=g).to(DEVICE).requires_grad_()
    return None


@pytest.mark.parametrize("name", list(SA_CASES))
def test_self_attention_matches_hand_written(name):
    kw = dict(SA_CASES[name])
    kind = kw.pop("mask", None)
    torch.manual_seed(0)
    m = nnfast.SelfAttention(E, H, max_seq_len=32, device=DEVICE, **kw)
    T = 7
    x = torch.randn(B, T, E, device=DEVICE, requires_grad=True)
    mask = _sa_mask(kind, T)
    g = torch.randn(B, T, E, device=DEVICE)
    out = m(x, attn_mask=mask)
    wrt = [x, *m.parameters()] + ([mask] if kind == "bias" else [])
    grads = torch.autograd.grad(out, wrt, g)
    ref = _naive(m, x, mask)
    grads_ref = torch.autograd.grad(ref, wrt, g)
    real = (slice(None),) if kind != "padding" else (0,)  # batch 1's padded queries see no key
    assert_close_lowp("output", out[real], ref[real], ref[real])
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert_close_lowp(f"grad {i}", a, b, b)


@pytest.mark.parametrize("n_kv_heads,mask", [(4, False), (2, True), (1, False)])
def test_kv_cache_generation_equals_full_pass(n_kv_heads, mask):
    torch.manual_seed(0)
    m = nnfast.SelfAttention(E, H, n_kv_heads, rope=True, max_seq_len=32, device=DEVICE).eval()
    T = 7
    x = torch.randn(B, T, E, device=DEVICE)
    keep = _sa_mask("padding", T) if mask else None
    full = m(x, attn_mask=keep)
    cache = nnfast.KVCache(B, 10, n_kv_heads, E // H, torch.float32, DEVICE)
    for chunks in ([1, 1, 3, 2], [3, 4]):  # T == 1 and T > 1, at pos 0 and pos > 0
        cache.reset()
        outs, start = [], 0
        for n in chunks:
            sub = None if keep is None else keep[..., : start + n]
            outs.append(m(x[:, start:start + n], attn_mask=sub, cache=cache))
            start += n
        assert cache.pos == T
        got = torch.cat(outs, dim=1)
        assert_close_lowp(f"chunks {chunks}", got[:1], full[:1], full[:1])
        if not mask:
            assert_close_lowp(f"chunks {chunks}", got, full, full)


def test_kv_cache_overflow_and_shape_errors():
    m = nnfast.SelfAttention(E, H, device=DEVICE).eval()
    cache = nnfast.KVCache(1, 4, H, E // H, device=DEVICE)
    m(torch.randn(1, 3, E, device=DEVICE), cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        m(torch.randn(1, 2, E, device=DEVICE), cache=cache)
    assert cache.pos == 3
    with pytest.raises(ValueError, match="do not fit"):
        m(torch.randn(2, 1, E, device=DEVICE), cache=cache)
    with pytest.raises(ValueError, match="n_kv_heads"):
        nnfast.SelfAttention(E, H, 3)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 3, E + 1, device=DEVICE))


def test_self_attention_dropout_only_in_training():
    m = nnfast.SelfAttention(E, H, dropout=0.5, device=DEVICE).eval()
    x = torch.randn(B, 5, E, device=DEVICE)
    a = m(x)
    assert torch.equal(a, m(x))
    assert not torch.allclose(a, m.train()(x))


def test_cross_attention_matches_hand_written():
    torch.manual_seed(0)
    m = nnfast.CrossAttention(E, H, kv_dim=12, bias=True, device=DEVICE)
    x, mem = torch.randn(B, 5, E, device=DEVICE), torch.randn(B, S, 12, device=DEVICE)
    keep = torch.ones(B, 1, 1, S, dtype=torch.bool, device=DEVICE)
    keep[0, ..., 3:] = False
    out = m(x, mem, attn_mask=keep)
    k, v = nn.functional.linear(mem, m.kv.weight, m.kv.bias).split(E, -1)
    k = k.view(B, S, H, E // H).transpose(1, 2)
    v = v.view(B, S, H, E // H).transpose(1, 2)
    q = m.q(x).view(B, 5, H, E // H).transpose(1, 2)
    s = (q @ k.transpose(-1, -2) / math.sqrt(E // H)).masked_fill(~keep, -math.inf)
    ref = m.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(B, 5, E))
    assert_close_lowp("output", out, ref, ref)
    assert_close_lowp("memory_kv", m(x, memory_kv=m.project_memory(mem), attn_mask=keep), ref, ref)
    with pytest.raises(ValueError, match="exactly one"):
        m(x)
