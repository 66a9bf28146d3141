"""``nnfast.RMSNorm`` / ``nnfast.LayerNorm`` are drop-ins for torch's: the same parameters,
torch's state dicts load, the same outputs and gradients, on both paths."""

import pytest
import torch

import nnfast
from tests.helpers import kernel_devices

BACKENDS = ["torch"] + (["triton"] if kernel_devices() else [])


def _pair(kind, **kw):
    shape = (4, 6)
    if kind == "rms":
        return torch.nn.RMSNorm(shape, **kw), nnfast.RMSNorm(shape, **kw)
    return torch.nn.LayerNorm(shape, **kw), nnfast.LayerNorm(shape, **kw)


CASES = [
    ("rms", {}),
    ("rms", {"eps": 1e-6}),
    ("rms", {"elementwise_affine": False}),
    ("layer", {}),
    ("layer", {"bias": False}),
    ("layer", {"elementwise_affine": False, "eps": 1e-3}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,kw", CASES)
def test_drop_in(monkeypatch, backend, kind, kw):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    theirs, ours = _pair(kind, **kw)
    assert [n for n, _ in theirs.named_parameters()] == [n for n, _ in ours.named_parameters()]
    assert ours.extra_repr() == theirs.extra_repr()
    with torch.no_grad():  # trained-looking parameters, then torch's state dict into ours
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 6) + 0.3
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = theirs(xa), ours(xb)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    for (name, pa), pb in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_forward_residual(monkeypatch, backend, kind):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    _, norm = _pair(kind)
    x, r = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    y, s = norm.forward_residual(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, norm(x + r))


def test_reset_and_dtype():
    norm = nnfast.LayerNorm(8, dtype=torch.float16)
    assert norm.weight.dtype == torch.float16 and norm.normalized_shape == (8,)
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.fill_(2.0)
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(8, dtype=torch.float16))
    assert torch.equal(norm.bias, torch.zeros(8, dtype=torch.float16))
    assert nnfast.RMSNorm(8, elementwise_affine=False).weight is None
