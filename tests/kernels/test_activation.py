"""Fused (gated) activation kernel vs its reference, and the reference vs torch.nn.functional.

The oracle: ``nnfast.reference.activation.act_mul`` on fp32 copies of the inputs. The
low-precision bar: PyTorch's own error computing ``F.silu(g) * u`` (etc.) in the input dtype.
"""

import pytest
import torch
import torch.nn.functional as F

import nnfast
from nnfast.reference import activation as ref
from tests.helpers import assert_close_lowp, device_dtype_params, kernel_devices, requires_cuda

kernel_params = device_dtype_params()
if kernel_devices():
    from nnfast.kernels import activation as kern

# (activation, gated): every combination the kernel's constexpr flags produce.
CASES = [(a, g) for a in ("silu", "gelu", "gelu_tanh") for g in (True, False)]
CASE_IDS = [f"{a}-{'gated' if g else 'plain'}" for a, g in CASES]
SHAPES = [(1,), (7,), (113,), (4097,), (2, 3, 7), (5, 113), (2, 1, 1023)]


def torch_act_mul(x, up, activation):
    """The same computation in PyTorch's own ops, in the inputs' dtype (its error is the bar)."""
    if activation == "silu":
        y = F.silu(x)
    else:
        y = F.gelu(x, approximate="tanh" if activation == "gelu_tanh" else "none")
    return y if up is None else y * up


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def _run(fn, x, up, activation, dy):
    """Output and gradients (dx, dup) of ``fn`` on fresh leaves with the same ``dy``."""
    x, up = _leaves(x, up)
    y = fn(x, up, activation)
    inputs = [t for t in (x, up) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy)
    return y.detach(), grads


def check_against_reference(x, up, activation, dy=None):
    """Kernel vs the fp32 reference, outputs and every gradient, by the 2x/3x rule."""
    if dy is None:
        dy = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    y, grads = _run(kern.act_mul, x, up, activation, dy)
    up32 = up.float() if up is not None else None
    y_ref, grads_ref = _run(ref.act_mul, x.float(), up32, activation, dy.float())
    y_pt, grads_pt = _run(torch_act_mul, x, up, activation, dy)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close_lowp("y", y, y_ref, y_pt)
    for name, g, g_ref, g_pt in zip(("dgate", "dup"), grads, grads_ref, grads_pt):
        assert g.dtype == x.dtype
        assert_close_lowp(name, g, g_ref, g_pt, factor=3.0)


def _inputs(shape, dtype, device, gated, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Scale 3 reaches the tails where silu/gelu bend (and tanh saturates).
    x = (3 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    up = torch.randn(shape, generator=gen).to(device=device, dtype=dtype) if gated else None
    return x, up


@pytest.mark.parametrize("device,dtype", kernel_params)
@pytest.mark.parametrize("activation,gated", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(device, dtype, activation, gated, shape):
    x, up = _inputs(shape, dtype, device, gated)
    check_against_reference(x, up, activation)


@pytest.mark.parametrize("device,dtype", kernel_params)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_halves_of_one_gemm_output(device, dtype, activation):
    """gate/up as the two halves of one (..., 2H) tensor: strided views, no copy, and the
    gradient lands in the fused tensor's two halves."""
    H = 113
    h = (2 * torch.randn(2, 5, 2 * H)).to(device=device, dtype=dtype)
    gate, up = h.split(H, dim=-1)
    assert not gate.is_contiguous() and not up.is_contiguous()
    check_against_reference(gate, up, activation)
    # The launcher's (M, N) view of a half is the half itself (same memory, row stride 2H).
    rows = kern._rows(gate)
    assert rows.data_ptr() == gate.data_ptr() and rows.stride() == (2 * H, 1)
    # Through autograd: d(h) is cat(dgate, dup).
    hk = h.detach().clone().requires_grad_(True)
    hr = h.detach().float().requires_grad_(True)
    dy = torch.randn(2, 5, H, device=device, dtype=dtype)
    kern.act_mul(*hk.split(H, dim=-1), activation).backward(dy)
    ref.act_mul(*hr.split(H, dim=-1), activation).backward(dy.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    atol = tol * hr.grad.abs().max().item()
    torch.testing.assert_close(hk.grad.float(), hr.grad, atol=atol, rtol=0)


@pytest.mark.parametrize("device,dtype", kernel_params)
@pytest.mark.parametrize("activation,gated", CASES, ids=CASE_IDS)
def test_transposed_and_strided_inputs(device, dtype, activation, gated):
    # Transposed: column stride != 1, handled by strides.
    x, up = _inputs((37, 19), dtype, device, gated, seed=1)
    xt = x.t().contiguous().t()
    upt = up.t().contiguous().t() if up is not None else None
    assert not xt.is_contiguous()
    check_against_reference(xt, upt, activation)
    # Leading dims that cannot merge into one row stride (the launcher copies them).
    x3, up3 = _inputs((4, 3, 9), dtype, device, gated, seed=2)
    xp = x3.permute(1, 0, 2)
    upp = up3.permute(1, 0, 2) if up3 is not None else None
    check_against_reference(xp, upp, activation)
    # An expanded upstream gradient (stride 0), as sum() produces.
    dy = torch.randn(9, device=device, dtype=dtype).expand(3, 4, 9)
    check_against_reference(xp, upp, activation, dy=dy)


@pytest.mark.parametrize("device,dtype", kernel_params)
def test_nan_in_stride_gaps_is_never_read(device, dtype):
    """Column-strided inputs whose gaps hold NaN: a kernel reading past its elements shows it."""
    x, up = _inputs((3, 113), dtype, device, True, seed=3)
    wide_x = torch.full((3, 226), float("nan"), dtype=dtype, device=device)
    wide_u = torch.full((3, 226), float("nan"), dtype=dtype, device=device)
    wide_x[:, ::2], wide_u[:, ::2] = x, up
    for activation in ("silu", "gelu"):
        check_against_reference(wide_x[:, ::2], wide_u[:, ::2], activation)


@pytest.mark.parametrize("device,dtype", kernel_params)
def test_empty_input(device, dtype):
    x = torch.empty(0, 8, device=device, dtype=dtype, requires_grad=True)
    y = kern.act_mul(x, x, "silu")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8)


@pytest.mark.skipif(not kernel_devices(), reason="Triton kernels cannot run here")
def test_functional_dispatch_matches_reference(monkeypatch):
    """The public functions route to the kernel (or, with NNFAST_BACKEND=torch, the reference)."""
    device = kernel_devices()[-1]
    g, u = _inputs((4, 33), torch.float32, device, True, seed=4)
    fns = {
        "silu": lambda: nnfast.functional.silu_mul(g, u),
        "gelu_tanh": lambda: nnfast.functional.gelu_mul(g, u),
        "gelu": lambda: nnfast.functional.gelu_mul(g, u, approximate="none"),
    }
    for backend in ("auto", "torch"):
        monkeypatch.setenv("NNFAST_BACKEND", backend)
        for activation, fn in fns.items():
            torch.testing.assert_close(fn(), ref.act_mul(g, u, activation))
        for approximate in ("none", "tanh"):
            y = nnfast.functional.gelu(g, approximate=approximate)
            torch.testing.assert_close(y, F.gelu(g, approximate=approximate))


@pytest.mark.skipif(not kernel_devices(), reason="Triton kernels cannot run here")
def test_compile_fullgraph():
    """The custom ops and their fake impls: no graph break, same values and gradients."""
    device = kernel_devices()[-1]
    h = torch.randn(3, 2 * 17, device=device)

    def f(h):
        gate, up = h.split(17, dim=-1)
        return kern.act_mul(kern.act_mul(gate, up, "silu"), None, "gelu_tanh")

    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        hh = h.clone().requires_grad_(True)
        y = fn(hh)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), hh.grad))
    torch.testing.assert_close(results[0], results[1])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_size_cuda(dtype):
    h = torch.randn(4, 256, 2 * 11008, device="cuda", dtype=dtype)
    gate, up = h.split(11008, dim=-1)
    check_against_reference(gate, up, "silu")


# ----------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("activation,gated", CASES, ids=CASE_IDS)
def test_reference_matches_torch_functional(activation, gated):
    x, up = _inputs((6, 129), torch.float64, "cpu", gated, seed=5)
    dy = torch.randn(6, 129, dtype=torch.float64)
    # Reference in fp32 vs F.* in fp64: the reference's formulas are the same functions.
    y, grads = _run(ref.act_mul, x.float(), up.float() if gated else None, activation, dy.float())
    y64, grads64 = _run(torch_act_mul, x, up, activation, dy)
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g, g64.float(), rtol=1e-5, atol=1e-5)


def test_reference_output_dtype_is_input_dtype():
    x = torch.randn(3, 5, dtype=torch.float16)
    assert ref.act_mul(x, x, "silu").dtype == torch.float16


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    g = torch.randn(4, 8)
    with pytest.raises(ValueError, match="up"):
        nnfast.functional.silu_mul(g, torch.randn(4, 9))
    with pytest.raises(TypeError, match="gate"):
        nnfast.functional.silu_mul(torch.ones(4, 8, dtype=torch.int32), g)
    with pytest.raises(TypeError, match="up"):
        nnfast.functional.silu_mul(g, torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="input"):
        nnfast.functional.gelu(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="up"):
        nnfast.functional.gelu_mul(g, g.half())
    with pytest.raises(ValueError, match="up"):
        nnfast.functional.silu_mul(g, torch.randn(4, 8, device="meta"))
    with pytest.raises(ValueError, match="approximate"):
        nnfast.functional.gelu(g, approximate="fast")
    with pytest.raises(ValueError, match="activation"):
        ref.act_mul(g, None, "relu")
    with pytest.raises(ValueError, match="activation"):
        nnfast.GatedMLP(8, 16, activation="relu")
    with pytest.raises(ValueError, match="activation"):
        nnfast.MLP(8, 16, activation="silu")


@pytest.mark.skipif(not kernel_devices(), reason="Triton kernels cannot run here")
def test_kernel_entry_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        kern.act_mul(torch.randn(2, 3, device=kernel_devices()[-1]), None, "relu")
