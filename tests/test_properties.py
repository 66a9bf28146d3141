"""Property-based tests (hypothesis): attention, norms, RoPE and linear cross-entropy
against fp64 oracles written out here from the definitions, on random shapes, masks,
scales and options; many examples on the reference path, a few tiny ones on the kernel
path (Triton's interpreter on a CPU). Inputs are fp32; the bound is fp32 rounding of
these small problems, far below any real bug.

Bounded for CI: ``max_examples`` small, no deadline (a first call compiles), no example
database written to disk, and derandomized so a CI run is reproducible."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nnfast.functional as F  # noqa: E402
from nnfast.reference.rope import rotary_cos_sin  # noqa: E402
from tests.helpers import kernel_devices  # noqa: E402

KERNEL = "cpu" in kernel_devices()
PATHS = [
    pytest.param("torch", 25, id="reference"),
    pytest.param("triton", 4, id="kernel",
                 marks=pytest.mark.skipif(not KERNEL, reason="needs TRITON_INTERPRET=1")),
]
TOL = {"rtol": 1e-4, "atol": 1e-5}


@contextlib.contextmanager
def backend(path: str):
    old = os.environ.get("NNFAST_BACKEND")
    os.environ["NNFAST_BACKEND"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["NNFAST_BACKEND"]
        else:
            os.environ["NNFAST_BACKEND"] = old


def _settings(n: int):
    return settings(max_examples=n, deadline=None, database=None, derandomize=True)


def _randn(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check(got: torch.Tensor, want64: torch.Tensor, **tol) -> None:
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want64, **(tol or TOL))


def _run(path, n, body):
    """Run ``body`` (a hypothesis-decorated function of no fixtures) under ``path``."""
    with backend(path):
        _settings(n)(body)()


# ----------------------------------------------------------------------------- attention
def _attention64(q, k, v, mask, causal, scale):
    """softmax(q k^T * scale + mask) v in fp64; a row with no allowed key gives zeros."""
    q, k, v = q.double(), k.double(), v.double()
    hq, hk = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    s = q @ k.transpose(-1, -2) * scale
    allowed = torch.ones_like(s, dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        s = s + mask.double()
        allowed = allowed & (mask > float("-inf"))
    if causal:
        allowed = allowed & torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    s = s.masked_fill(~allowed, float("-inf"))
    any_key = allowed.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~any_key, 0.0), dim=-1) * any_key
    return p @ v


@st.composite
def attention_case(draw, tiny: bool):
    B = draw(st.integers(1, 2))
    Hk = draw(st.integers(1, 2))
    Hq = Hk * draw(st.integers(1, 2))
    Lq = draw(st.integers(1, 5 if tiny else 19))
    Lk = draw(st.integers(1, 5 if tiny else 19))
    D = draw(st.sampled_from([4, 8] if tiny else [1, 4, 8, 16, 40]))
    kind = draw(st.sampled_from(["none", "causal", "bool", "float"]))
    scale = draw(st.one_of(st.none(), st.floats(-2.0, 2.0)))
    seed = draw(st.integers(0, 2**16))
    mask_shape = draw(st.sampled_from([(Lq, Lk), (B, 1, Lq, Lk), (B, Hq, Lq, Lk), (1, Lk)]))
    return B, Hq, Hk, Lq, Lk, D, kind, scale, seed, mask_shape


def _attention_body(tiny):
    @given(attention_case(tiny))
    def body(case):
        B, Hq, Hk, Lq, Lk, D, kind, scale, seed, mask_shape = case
        q, k, v = _randn(seed, B, Hq, Lq, D), _randn(seed + 1, B, Hk, Lk, D), _randn(
            seed + 2, B, Hk, Lk, D)
        mask = None
        if kind == "bool":
            mask = _randn(seed + 3, *mask_shape) > 0.3  # some rows fully masked
        elif kind == "float":
            m = _randn(seed + 3, *mask_shape)
            mask = m.masked_fill(m < -0.8, float("-inf"))
        q.requires_grad_(True)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=kind == "causal", scale=scale,
            enable_gqa=Hq != Hk,
        )
        s = scale if scale is not None else D**-0.5
        q64 = q.detach().double().requires_grad_(True)
        want = _attention64(q64, k, v, mask, kind == "causal", s)
        _check(out, want.detach())
        g = _randn(seed + 4, *out.shape)
        (dq,) = torch.autograd.grad(out, q, g)
        (dq64,) = torch.autograd.grad(want, q64, g.double())
        _check(dq, dq64, rtol=1e-4, atol=1e-4)

    return body


@pytest.mark.parametrize("path, n", PATHS)
def test_attention_matches_fp64(path, n):
    _run(path, n, _attention_body(tiny=path == "triton"))


# ----------------------------------------------------------------------------- norms
def _norm64(x, w, b, eps, rms, residual):
    h = x.double() + (residual.double() if residual is not None else 0.0)
    if rms:
        y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    else:
        c = h - h.mean(-1, keepdim=True)
        y = c * torch.rsqrt(c.square().mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y, h


def _norm_body(tiny):
    @given(
        st.integers(1, 4 if tiny else 37), st.integers(1, 16 if tiny else 300),
        st.booleans(), st.booleans(), st.booleans(), st.booleans(),
        st.sampled_from([1e-6, 1e-5, 0.1]), st.integers(0, 2**16),
    )
    def body(M, n, rms, has_w, has_b, has_res, eps, seed):
        x = _randn(seed, M, n) * 3 + 1
        w = _randn(seed + 1, n) if has_w else None
        b = _randn(seed + 2, n) if has_b and not rms else None
        r = _randn(seed + 3, M, n) if has_res else None
        want, h = _norm64(x, w, b, eps, rms, r)
        if has_res and rms:
            y, s = F.add_rms_norm(x, r, (n,), w, eps)
        elif has_res:
            y, s = F.add_layer_norm(x, r, (n,), w, b, eps)
        else:
            y = F.rms_norm(x, (n,), w, eps) if rms else F.layer_norm(x, (n,), w, b, eps)
            s = None
        _check(y, want)
        if s is not None:
            _check(s, h)

    return body


@pytest.mark.parametrize("path, n", PATHS)
def test_norms_match_fp64(path, n):
    _run(path, n, _norm_body(tiny=path == "triton"))


# ----------------------------------------------------------------------------- RoPE
def _rope64(x, positions, rotary_dim, interleaved, base=10000.0):
    """Rotation of each channel pair by ``pos * base^(-2i/R)``, as complex numbers."""
    x = x.double()
    half = rotary_dim // 2
    theta = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angle = positions.double()[..., None] * theta  # (T, half) or (B, T, half)
    angle = angle[None, None] if positions.dim() == 1 else angle[:, None]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        pairs = torch.complex(rot[..., 0::2], rot[..., 1::2])
    else:
        pairs = torch.complex(rot[..., :half], rot[..., half:])
    z = pairs * torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        out = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        out = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((out, rest), dim=-1)


def _rope_body(tiny):
    @given(
        st.integers(1, 2), st.integers(1, 3), st.integers(1, 4 if tiny else 33),
        st.sampled_from([4, 8] if tiny else [2, 4, 8, 16, 40]), st.data(),
        st.booleans(), st.sampled_from(["offset", "ids", "batch_ids"]), st.integers(0, 2**16),
    )
    def body(B, H, T, D, data, interleaved, pos_kind, seed):
        rotary_dim = data.draw(st.sampled_from([r for r in range(2, D + 1, 2)]))
        table = data.draw(st.integers(T, T + 20))
        cos, sin = rotary_cos_sin(table, rotary_dim)
        q, k = _randn(seed, B, H, T, D), _randn(seed + 1, B, 1, T, D)
        g = torch.Generator().manual_seed(seed)
        kw = {"interleaved": interleaved}
        if pos_kind == "offset":
            offset = data.draw(st.integers(0, table - T))
            positions = torch.arange(T) + offset
            kw["offset"] = offset
        else:
            shape = (T,) if pos_kind == "ids" else (B, T)
            positions = torch.randint(0, table, shape, generator=g)
            kw["position_ids"] = positions
        qo, ko = F.apply_rotary(q, k, cos, sin, **kw)
        _check(qo, _rope64(q, positions, rotary_dim, interleaved), rtol=1e-4, atol=1e-5)
        _check(ko, _rope64(k, positions, rotary_dim, interleaved), rtol=1e-4, atol=1e-5)

    return body


@pytest.mark.parametrize("path, n", PATHS)
def test_rope_matches_fp64(path, n):
    _run(path, n, _rope_body(tiny=path == "triton"))


# ----------------------------------------------------------------------------- cross-entropy
def _ce64(x, w, b, t, ignore_index, reduction, smoothing):
    logits = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
    logp = torch.log_softmax(logits, dim=-1)
    keep = t != ignore_index
    nll = -logp.gather(-1, t.clamp(min=0)[:, None])[:, 0]
    loss = (1 - smoothing) * nll - smoothing * logp.mean(-1)
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum().clamp(min=1)  # nnfast: all-ignored mean is 0, not NaN


def _ce_body(tiny):
    @given(
        st.integers(1, 6 if tiny else 40), st.integers(1, 8 if tiny else 48),
        st.integers(1, 12 if tiny else 300), st.booleans(),
        st.sampled_from(["mean", "sum", "none"]), st.sampled_from([0.0, 0.1]),
        st.floats(0.0, 1.0), st.integers(0, 2**16),
    )
    def body(N, C, V, has_b, reduction, smoothing, ignore_frac, seed):
        x, w = _randn(seed, N, C), _randn(seed + 1, V, C) / C**0.5
        b = _randn(seed + 2, V) if has_b else None
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, V, (N,), generator=g)
        t = torch.where(torch.rand(N, generator=g) < ignore_frac, torch.full_like(t, -100), t)
        got = F.linear_cross_entropy(x, w, t, b, reduction=reduction, label_smoothing=smoothing)
        _check(got, _ce64(x, w, b, t, -100, reduction, smoothing))

    return body


@pytest.mark.parametrize("path, n", PATHS)
def test_cross_entropy_matches_fp64(path, n):
    _run(path, n, _ce_body(tiny=path == "triton"))
