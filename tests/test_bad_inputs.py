"""Bad and edge-case inputs (issue 12, library half): every case behaves the same on the
reference path and on the kernel path (interpreted on a CPU) — a TypeError/ValueError
naming the argument, or PyTorch's result (zeros for no keys, NaN where PyTorch propagates
NaN, finite where a mask removes a NaN key)."""

from __future__ import annotations

import pytest
import torch

import nnfast
import nnfast.functional as F
from nnfast.modules.attention import CrossAttention
from nnfast.reference.rope import rotary_cos_sin
from tests.helpers import kernel_devices

PATHS = [
    pytest.param("torch", id="reference"),
    pytest.param(
        "triton",
        id="kernel",
        marks=pytest.mark.skipif("cpu" not in kernel_devices(), reason="needs TRITON_INTERPRET=1"),
    ),
]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", request.param)
    return request.param


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, grad=False):
    return torch.randn(*shape, generator=_gen(seed)).requires_grad_(grad)


# ----------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("bad", [10, 11, -1, -3])
def test_ce_target_out_of_range(path, bad):
    x, w = _randn(4, 8), _randn(10, 8, seed=1)
    target = torch.tensor([0, 1, bad, 2])
    with pytest.raises(ValueError, match=rf"target holds {bad}, outside the 10 classes"):
        F.linear_cross_entropy(x, w, target)


def test_ce_ignore_index_is_not_out_of_range(path):
    x, w = _randn(4, 8), _randn(10, 8, seed=1)
    got = F.linear_cross_entropy(x, w, torch.tensor([0, -100, 9, -100]))
    want = torch.nn.functional.cross_entropy(x @ w.T, torch.tensor([0, -100, 9, -100]))
    torch.testing.assert_close(got, want)
    got = F.linear_cross_entropy(x, w, torch.tensor([0, 12, 9, 12]), ignore_index=12)
    assert torch.isfinite(got)


def test_ce_ignore_index_must_be_an_integer(path):
    x, w = _randn(4, 8), _randn(10, 8, seed=1)
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        F.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3]), ignore_index=1.5)


# ----------------------------------------------------------------------------- RoPE
def _qk():
    return _randn(2, 2, 4, 8), _randn(2, 2, 4, 8, seed=1)


@pytest.mark.parametrize("ids", [[0, 1, -1, 2], [0, 1, 6, 2], [[0, 1, 2, 3], [0, 1, 2, 7]]])
def test_rope_position_ids_outside_the_table(path, ids):
    q, k = _qk()
    cos, sin = rotary_cos_sin(6, 8)
    with pytest.raises(ValueError, match=r"position_ids must be in \[0, 6\)"):
        F.apply_rotary(q, k, cos, sin, position_ids=torch.tensor(ids))


def test_rope_position_ids_at_the_table_edge_are_fine(path):
    q, k = _qk()
    cos, sin = rotary_cos_sin(6, 8)
    qo, ko = F.apply_rotary(q, k, cos, sin, position_ids=torch.tensor([5, 0, 5, 1]))
    assert torch.isfinite(qo).all() and torch.isfinite(ko).all()


@pytest.mark.parametrize("offset", [0.5, 1.0, "1", True, None])
def test_rope_offset_must_be_an_integer(path, offset):
    q, k = _qk()
    cos, sin = rotary_cos_sin(6, 8)
    with pytest.raises(TypeError, match="offset must be an integer"):
        F.apply_rotary(q, k, cos, sin, offset=offset)


def test_rope_integer_like_offsets(path):
    q, k = _qk()
    cos, sin = rotary_cos_sin(6, 8)
    want = F.apply_rotary(q, k, cos, sin, offset=2)
    for offset in (torch.tensor(2), __import__("numpy").int64(2)):
        got = F.apply_rotary(q, k, cos, sin, offset=offset)
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- attention
def _qkv(Lq=4, Lk=4, grad=False):
    return (_randn(1, 2, Lq, 8, seed=0, grad=grad), _randn(1, 2, Lk, 8, seed=1),
            _randn(1, 2, Lk, 8, seed=2))


def _math_sdpa(q, k, v, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("scale", [0.0, -1.0, -0.3])
def test_attention_causal_nonpositive_scale(path, scale):
    q, k, v = _qkv()
    got = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    torch.testing.assert_close(got, _math_sdpa(q, k, v, is_causal=True, scale=scale))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_nan_query_row_gives_nan_like_pytorch(path, causal):
    q, k, v = _qkv()
    q = q.detach().clone()
    q[0, 0, 1] = float("nan")
    q.requires_grad_(True)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out.sum().backward()
    row_nan = out.isnan().all(-1)  # (1, 2, 4)
    want = torch.zeros_like(row_nan)
    want[0, 0, 1] = True
    assert torch.equal(row_nan, want), row_nan
    assert torch.equal(q.grad.isnan().all(-1), want)  # consistent with the output
    assert torch.isfinite(q.grad[~want]).all()
    ok = ~want
    torch.testing.assert_close(out[ok], _math_sdpa(q.detach(), k, v, is_causal=causal)[ok])


def _nonfinite_scores(case):
    """(q, k, v) where one head's scores are NaN or +-inf: PyTorch's fused CPU kernel skips
    NaN scores in a short row's max (4 keys: all in its scalar tail) and gives zeros where
    every score is -inf or skipped, where the math gives NaN (or zeros of its own)."""
    q, k, v = (t.detach().clone() for t in _qkv())
    if case == "nan_key":
        k[0, 1, 2] = float("nan")
    elif case == "nan_keys":
        k[0, 1] = float("nan")
    elif case == "inf_keys":
        k[0, 1] = float("inf")
    else:  # query 2 of head 1 scores -inf against every key
        q[0, 1, 2] = float("-inf")
        k[0, 1] = k[0, 1].abs() + 0.1
    return q, k, v


def _out_and_grads(q, k, v, causal):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=causal)
    return [out, *torch.autograd.grad(out.sum(), leaves)]


# The interpreter's numpy on the inf scores (inf - inf in its matmul) warns; the kernel on a
# GPU does not.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["nan_key", "nan_keys", "inf_keys", "neg_inf_scores"])
def test_attention_nonfinite_scores_same_on_both_paths(monkeypatch, case, causal):
    """The output is the math's, NaN where it is NaN; the reference and kernel paths give
    the same output and gradients (NaN in the same places)."""
    from nnfast.reference.attention import _explicit

    q, k, v = _nonfinite_scores(case)
    want = _explicit(q, k, v, None, 0.0, causal, 8 ** -0.5, None)
    assert not torch.isfinite(want[0, 1]).all() or case == "neg_inf_scores"
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    ref = _out_and_grads(q, k, v, causal)
    torch.testing.assert_close(ref[0], want, equal_nan=True)
    if "cpu" not in kernel_devices():
        pytest.skip("the kernel path needs TRITON_INTERPRET=1")
    monkeypatch.setenv("NNFAST_BACKEND", "triton")
    for got, r in zip(_out_and_grads(q, k, v, causal), ref):
        torch.testing.assert_close(got, r, equal_nan=True)


def test_attention_zero_lse_rows_and_strided_inputs_stay_exact(path):
    """A row whose log-sum-exp is exactly 0 (a zero query's first causal row) and q, k, v
    whose last dim is not contiguous (copied first: PyTorch's fused CPU kernel misreads it)
    give the math."""
    q, k, v = _qkv()
    q = q.clone()
    q[0, 0] = 0.0
    want = _math_sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True), want)
    qt, kt, vt = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
    assert qt.stride(-1) != 1
    torch.testing.assert_close(F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), want)


@pytest.mark.parametrize("mask_kind", ["bool", "causal"])
def test_attention_nan_in_masked_out_key_stays_finite(path, mask_kind):
    q, k, v = _qkv()
    k = k.clone()
    k[0, 1, 3] = float("nan")  # key 3 of head 1
    kw = {"is_causal": True}
    if mask_kind == "bool":
        mask = torch.ones(4, 4, dtype=torch.bool)
        mask[:, 3] = False
        kw = {"attn_mask": mask}
    out = F.scaled_dot_product_attention(q, k, v, **kw)
    sees = torch.ones(1, 2, 4, dtype=torch.bool) if mask_kind == "bool" else None
    if mask_kind == "causal":  # query 3 of head 1 does attend to the NaN key
        sees = torch.ones(1, 2, 4, dtype=torch.bool)
        sees[0, 1, 3] = False
    assert torch.isfinite(out[sees]).all()
    k0 = k.clone()
    k0[0, 1, 3] = 0.0
    torch.testing.assert_close(out[sees], F.scaled_dot_product_attention(q, k0, v, **kw)[sees])


def test_attention_no_keys_gives_zeros(path):
    q, k, v = _qkv(Lk=0, grad=True)
    with pytest.warns(RuntimeWarning) if path == "triton" else _no_warning():
        out = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_modules_with_empty_memory(path, need_weights):
    x = _randn(2, 3, 16, grad=True)
    mha = nnfast.Attention(16, 2, batch_first=True)
    torch_mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    torch_mha.load_state_dict(mha.state_dict())
    empty = torch.zeros(2, 0, 16)
    y, w = mha(x, empty, empty, need_weights=need_weights)
    y_ref, w_ref = torch_mha(x, empty, empty, need_weights=need_weights)
    torch.testing.assert_close(y, y_ref)
    if need_weights:
        assert w.shape == w_ref.shape == (2, 3, 0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    cross = CrossAttention(16, 2, bias=True)
    y = cross(x, torch.zeros(2, 0, 16))
    assert y.shape == (2, 3, 16)
    torch.testing.assert_close(y, cross.proj.bias.expand(2, 3, 16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"attn_mask": [[True] * 4] * 4}, "attn_mask must be a tensor or None, got list"),
        ({"scale": "0.5"}, "scale must be a number"),
        ({"dropout_p": None}, "dropout_p must be a number"),
        ({"dropout_p": "0.1"}, "dropout_p must be a number"),
    ],
)
def test_attention_argument_types(path, kwargs, match):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=match):
        F.scaled_dot_product_attention(q, k, v, **kwargs)


# ----------------------------------------------------------------------------- token merge
def test_token_merge_zero_input_channels(path):
    x, w, b = torch.zeros(2, 6, 0), torch.zeros(5, 0, 2), _randn(5)
    y = F.token_merge(x, w, b)
    assert y.shape == (2, 3, 5)
    torch.testing.assert_close(y, b.expand(2, 3, 5))
    torch.testing.assert_close(F.token_merge(x, w), torch.zeros(2, 3, 5))


@pytest.mark.parametrize("causal", [False, True])
def test_token_merge_and_expand_no_tokens(path, causal):
    w, b = _randn(5, 3, 2, grad=True), _randn(5, grad=True)
    x = torch.zeros(2, 0, 3, requires_grad=True)
    y = F.token_merge(x, w, b, causal=causal)
    assert y.shape == (2, 0, 5)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    y = F.token_expand(torch.zeros(2, 0, 3), _randn(3, 5, 2), b)
    assert y.shape == (2, 0, 5)
    y = F.token_expand(torch.zeros(2, 4, 0), torch.zeros(0, 5, 2), b, length=7)
    assert y.shape == (2, 7, 5)
    torch.testing.assert_close(y, b.detach().expand(2, 7, 5))


# ----------------------------------------------------------------------------- norms, MLP
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_norms_of_size_zero(path, op):
    x = torch.zeros(3, 0, requires_grad=True)
    y = getattr(F, op)(x, (0,))
    assert y.shape == (3, 0)
    y.sum().backward()
    assert x.grad.shape == (3, 0)
    y = getattr(F, op)(torch.zeros(0, 8), (8,), torch.ones(8))
    assert y.shape == (0, 8)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_of_a_0d_tensor(path, approximate):
    x = torch.tensor(0.7, requires_grad=True)
    y = F.gelu(x, approximate=approximate)
    assert y.shape == ()
    torch.testing.assert_close(y, torch.nn.functional.gelu(x, approximate=approximate))
    y.backward()
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.gelu(x_ref, approximate=approximate).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_gated_activations_need_up(path):
    g = _randn(3, 4)
    with pytest.raises(TypeError, match="up must be a tensor"):
        F.silu_mul(g, None)
    with pytest.raises(TypeError, match="up must be a tensor"):
        F.gelu_mul(g, None)
