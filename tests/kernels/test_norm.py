"""RMSNorm / LayerNorm kernels (``nnfast.kernels.norm``) against the fp32 reference, judged
by the low-precision rule: the kernel's error may be at most 2x (3x for gradients) the
error of ``torch.nn.functional.rms_norm`` / ``layer_norm`` run in the same dtype."""

import pytest
import torch
import torch.nn.functional as TF

import nnfast.functional as F
from nnfast.reference import norm as ref
from tests.helpers import (
    assert_close_lowp,
    device_dtype_params,
    kernel_devices,
    noncontiguous,
    requires_cuda,
)

DD = device_dtype_params()


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "triton")


def _torch_lowp(x, w, b, eps, rms, r, shape):
    """PyTorch's own computation in the input's dtype: the error yardstick."""
    h = x + r if r is not None else x
    y = TF.rms_norm(h, shape, w, eps) if rms else TF.layer_norm(h, shape, w, b, eps)
    return y, (h if r is not None else None)


def _kernel(x, w, b, eps, rms, r, shape):
    if r is None:
        y = F.rms_norm(x, shape, w, eps) if rms else F.layer_norm(x, shape, w, b, eps)
        return y, None
    if rms:
        return F.add_rms_norm(x, r, shape, w, eps)
    return F.add_layer_norm(x, r, shape, w, b, eps)


def _reference(x, w, b, eps, rms, r, shape):
    n = 1
    for s in shape:
        n *= s
    return ref.layer_norm(x, n, w, b, eps, rms, r)


def _run(fn, inputs, dy, ds, eps, rms, shape):
    """Outputs and gradients of every input that requires them, for one dy (and ds)."""
    x, w, b, r = (t.detach().requires_grad_() if t is not None else None for t in inputs)
    y, s = fn(x, w, b, eps, rms, r, shape)
    loss = (y.float() * dy.float()).sum()
    if s is not None:
        loss = loss + (s.float() * ds.float()).sum()
    leaves = [t for t in (x, w, b, r) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    return [y] + ([s] if s is not None else []) + list(grads)


def _check(device, dtype, lead, n, *, rms, weight=True, bias=True, residual=False,
           param_dtype=None, layout=None, eps=1e-5, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n,)
    full = (*lead, n)

    def rand(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=g) * scale + shift).to(device)

    pdt = param_dtype or dtype
    # A non-zero mean makes LayerNorm's centering matter; weights around 1 as trained ones.
    x = rand(*full, shift=0.5).to(dtype)
    w = rand(n, scale=0.5, shift=1.0).to(pdt) if weight else None
    b = rand(n, scale=0.5).to(pdt) if bias and not rms else None
    r = rand(*full).to(dtype) if residual else None
    dy = rand(*full).to(dtype)
    ds = rand(*full).to(dtype) if residual else None
    if layout == "strided":  # row stride 2n, NaN in the gap: read through strides, no copy
        wide = torch.full((*lead, 2 * n), float("nan"), dtype=dtype, device=device)
        wide[..., :n] = x
        x = wide[..., :n]
    elif layout == "noncontiguous":  # column stride 2: the launcher copies
        x = noncontiguous(x)
        if r is not None:
            r = noncontiguous(r)

    inputs = (x, w, b, r)
    names = ["y"] + (["s"] if residual else []) + ["dx"] + (["dw"] if w is not None else [])
    names += (["db"] if b is not None else []) + (["dresidual"] if residual else [])
    out = _run(_kernel, inputs, dy, ds, eps, rms, shape)
    fp32 = [t.float() if t is not None else None for t in inputs]
    expect = _run(_reference, fp32, dy, ds, eps, rms, shape)
    lowp = _run(_torch_lowp, inputs, dy, ds, eps, rms, shape)
    for name, o, e, t in zip(names, out, expect, lowp):
        is_grad = name not in ("y", "s")
        if name in ("dw", "db"):
            assert o.dtype == pdt, f"{name} dtype {o.dtype}, expected the parameter's {pdt}"
        else:
            assert o.dtype == dtype, f"{name} dtype {o.dtype}, expected the input's {dtype}"
        # dw/db sum over rows: PyTorch's fp16 error there can be ~0; allow the usual floor
        # scaled by the reduction's magnitude (assert_close_lowp does, from the reference).
        assert_close_lowp(name, o, e, t.to(o.dtype), factor=3.0 if is_grad else 2.0)
    return out


SIZES = [1, 7, 113, 1023, 4097]


@pytest.mark.parametrize("device,dtype", DD)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
def test_norm(device, dtype, n, rms):
    _check(device, dtype, (2, 3), n, rms=rms)


@pytest.mark.parametrize("device,dtype", DD)
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("n", [7, 1023])
def test_residual(device, dtype, rms, n):
    _check(device, dtype, (5,), n, rms=rms, residual=True)


@pytest.mark.parametrize("device,dtype", DD)
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("affine", ["none", "weight_only"])
def test_without_affine(device, dtype, rms, affine):
    _check(device, dtype, (3, 2), 113, rms=rms, weight=affine != "none", bias=False,
           residual=rms)


@pytest.mark.parametrize("device,dtype", DD)
@pytest.mark.parametrize("layout", ["strided", "noncontiguous"])
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
def test_layouts(device, dtype, layout, rms):
    _check(device, dtype, (4,), 113, rms=rms, layout=layout, residual=layout == "noncontiguous")


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
def test_fp32_params_fp16_input(device, rms):
    """Autocast training: fp32 weights with fp16 activations; grads in each one's dtype."""
    _check(device, torch.float16, (6,), 1023, rms=rms, param_dtype=torch.float32, residual=True)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("n,rms", [(65536, True), (20000, False), (9000, False)])
def test_long_rows(device, n, rms):
    """Rows over the register tile take the chunked path (65536 is the limit; 9000 is
    chunked in the backward only)."""
    _check(device, torch.float32, (3,), n, rms=rms, residual=True)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [768, 4096, 8192, 20000])
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
def test_cuda_realistic(dtype, n, rms):
    _check("cuda", dtype, (4, 257), n, rms=rms, residual=True, param_dtype=torch.float32)


@pytest.mark.parametrize("device", kernel_devices())
def test_deterministic_and_expanded_grad(device):
    """Two backwards give bitwise-equal grads; y.sum() feeds a stride-0 dy."""
    x = torch.randn(37, 113, device=device, requires_grad=True)
    w = torch.randn(113, device=device, requires_grad=True)
    b = torch.randn(113, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        y = F.layer_norm(x, (113,), w, b)
        grads.append(torch.autograd.grad(y.sum(), (x, w, b)))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)
    xr = x.detach().requires_grad_()
    wr = w.detach().requires_grad_()
    br = b.detach().requires_grad_()
    expect = torch.autograd.grad(TF.layer_norm(xr, (113,), wr, br).sum(), (xr, wr, br))
    for g, e in zip(grads[0], expect):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", kernel_devices())
def test_default_eps_matches_torch(device):
    """eps=None is fp32's machine eps for fp16 input too, as in torch.nn.functional.rms_norm."""
    x = torch.full((2, 8), 1e-2, dtype=torch.float16, device=device)
    torch.testing.assert_close(F.rms_norm(x, (8,)), TF.rms_norm(x, (8,)))


@pytest.mark.parametrize("device", kernel_devices())
def test_multi_dim_normalized_shape(device):
    x = torch.randn(3, 4, 5, device=device)
    w = torch.randn(4, 5, device=device).t().contiguous().t()  # non-contiguous weight
    b = torch.randn(4, 5, device=device)
    torch.testing.assert_close(F.layer_norm(x, (4, 5), w, b), TF.layer_norm(x, (4, 5), w, b))
    torch.testing.assert_close(F.rms_norm(x, (4, 5), w), TF.rms_norm(x, (4, 5), w))


@pytest.mark.parametrize("device", kernel_devices())
def test_empty_batch(device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    y = F.rms_norm(x, (16,), w)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16, device=device))


@pytest.mark.parametrize("device", kernel_devices())
def test_compile_fullgraph(device):
    """The custom ops' fake impls and autograd let dynamo trace without graph breaks.
    (Calls the kernel entry directly: this tests the op, not functional's dispatch.)"""
    from nnfast.kernels import norm as kernel

    def block(x, r, w, b):
        h, s = kernel.layer_norm(x, 32, w, None, 1e-6, True, r)
        return kernel.layer_norm(h, 32, w, b, 1e-5, False, None)[0] + s

    x, r = torch.randn(2, 5, 32, device=device), torch.randn(2, 5, 32, device=device)
    w = torch.randn(32, device=device, requires_grad=True)
    b = torch.randn(32, device=device, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, r, w, b)
    torch.testing.assert_close(out, block(x, r, w, b))
    gw, gb = torch.autograd.grad(out.square().sum(), (w, b))
    ew, eb = torch.autograd.grad(block(x, r, w, b).square().sum(), (w, b))
    torch.testing.assert_close(gw, ew)
    torch.testing.assert_close(gb, eb)


# ----------------------------------------------------------------------------- bad input
def _x(dtype=torch.float16, n=8):
    return torch.randn(2, n).to(dtype)


@pytest.mark.parametrize("fn", ["rms", "layer"])
@pytest.mark.parametrize(
    "case,err,match",
    [
        ("mixed_dtype", TypeError, "weight"),
        ("mixed_device", ValueError, "weight"),
        ("weight_shape", ValueError, "weight"),
        ("int_input", TypeError, "input"),
        ("too_long", ValueError, "normalized size"),
        ("shape_mismatch", ValueError, "normalized_shape"),
        ("residual_dtype", TypeError, "residual"),
        ("residual_shape", ValueError, "residual"),
    ],
)
def test_bad_input(fn, case, err, match):
    x, n = _x(), 8
    w = torch.ones(n, dtype=torch.float16)
    r = None
    shape = (n,)
    if case == "mixed_dtype":
        w = w.to(torch.bfloat16)
    elif case == "mixed_device":
        w = torch.ones(n, dtype=torch.float16, device="meta")
    elif case == "weight_shape":
        w = torch.ones(n + 1, dtype=torch.float16)
    elif case == "int_input":
        x = torch.ones(2, n, dtype=torch.int32)
    elif case == "too_long":
        x, w, shape = _x(n=65537), None, (65537,)
    elif case == "shape_mismatch":
        shape = (n + 1,)
    elif case == "residual_dtype":
        r = x.float()
    elif case == "residual_shape":
        r = _x(n=n)[:1]
    with pytest.raises(err, match=match):
        if r is not None:
            (F.add_rms_norm if fn == "rms" else F.add_layer_norm)(x, r, shape, w)
        elif fn == "rms":
            F.rms_norm(x, shape, w)
        else:
            F.layer_norm(x, shape, w)
