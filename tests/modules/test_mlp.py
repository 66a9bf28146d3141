"""nnfast's MLP modules vs the same MLPs built from torch.nn modules with the same weights:
outputs, the input's gradient and every parameter's gradient."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnfast
from tests.helpers import assert_close_lowp, kernel_devices

# Every path the modules can take here: the kernels (interpreted on CPU) and the reference.
DEVICES = kernel_devices() or ["cpu"]
BACKENDS = ["auto", "torch"]


class UnfusedGatedMLP(nn.Module):
    """Llama's MLP as Hugging Face writes it: three Linears, separate gate and up GEMMs."""

    def __init__(self, dim, hidden_dim, bias, act):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)  # down
        self.act = act

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


def _unfused_from(m: nnfast.GatedMLP, act) -> UnfusedGatedMLP:
    """w1/w3 are the first/second half of gate_up's rows (the documented split)."""
    H = m.hidden_dim
    u = UnfusedGatedMLP(m.dim, H, m.gate_up.bias is not None, act).to(m.gate_up.weight.device)
    with torch.no_grad():
        u.w1.weight.copy_(m.gate_up.weight[:H])
        u.w3.weight.copy_(m.gate_up.weight[H:])
        u.w2.weight.copy_(m.down.weight)
        if m.gate_up.bias is not None:
            u.w1.bias.copy_(m.gate_up.bias[:H])
            u.w3.bias.copy_(m.gate_up.bias[H:])
            u.w2.bias.copy_(m.down.bias)
    return u


def _close(name, a, b):
    """fp32 on both sides; the GEMMs differ in blocking only, so the floor carries the check."""
    assert_close_lowp(name, a, b, b)


def _compare(ours, theirs, x, grad_pairs):
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya, yb = ours(xa), theirs(xb)
    _close("output", ya, yb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    _close("dx", xa.grad, xb.grad)
    for name, ga, gb in grad_pairs():
        _close(name, ga, gb)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "activation,act",
    [
        ("silu", F.silu),
        ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")),
        ("gelu", F.gelu),
    ],
    ids=["silu", "gelu_tanh", "gelu"],
)
def test_gated_mlp_matches_unfused(monkeypatch, device, backend, bias, activation, act):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    torch.manual_seed(0)
    if activation == "silu":
        m = nnfast.SwiGLU(24, 40, bias=bias, device=device)
        assert m.activation == "silu"
    else:
        m = nnfast.GatedMLP(24, 40, bias=bias, activation=activation, device=device)
    u = _unfused_from(m, act)
    H = m.hidden_dim

    def grads():
        yield "d_gate_weight", m.gate_up.weight.grad[:H], u.w1.weight.grad
        yield "d_up_weight", m.gate_up.weight.grad[H:], u.w3.weight.grad
        yield "d_down_weight", m.down.weight.grad, u.w2.weight.grad
        if bias:
            yield "d_gate_bias", m.gate_up.bias.grad[:H], u.w1.bias.grad
            yield "d_up_bias", m.gate_up.bias.grad[H:], u.w3.bias.grad
            yield "d_down_bias", m.down.bias.grad, u.w2.bias.grad

    _compare(m, u, torch.randn(3, 7, 24, device=device), grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_mlp_matches_torch_sequential(monkeypatch, device, backend, activation):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    torch.manual_seed(0)
    m = nnfast.MLP(24, 96, activation=activation, device=device)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    seq = nn.Sequential(nn.Linear(24, 96), nn.GELU(approximate=approximate), nn.Linear(96, 24))
    names = {"0": m.fc, "2": m.proj}
    seq.to(device).load_state_dict(
        {f"{i}.{p}": getattr(lin, p) for i, lin in names.items() for p in ("weight", "bias")}
    )

    def grads():
        yield "d_fc_weight", m.fc.weight.grad, seq[0].weight.grad
        yield "d_fc_bias", m.fc.bias.grad, seq[0].bias.grad
        yield "d_proj_weight", m.proj.weight.grad, seq[2].weight.grad
        yield "d_proj_bias", m.proj.bias.grad, seq[2].bias.grad

    _compare(m, seq, torch.randn(2, 5, 24, device=device), grads)


def test_parameter_names_and_shapes():
    m = nnfast.SwiGLU(16, 48)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "gate_up.weight": (96, 16),
        "down.weight": (16, 48),
    }
    m = nnfast.MLP(16, 64)
    assert set(m.state_dict()) == {"fc.weight", "fc.bias", "proj.weight", "proj.bias"}


def test_dropout_in_eval_is_identity_and_in_train_drops():
    torch.manual_seed(0)
    m = nnfast.SwiGLU(16, 32, dropout=0.5)
    x = torch.randn(4, 16)
    m.eval()
    ref = nnfast.SwiGLU(16, 32)
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), ref(x))
    m.train()
    assert (m(x) == 0).float().mean() > 0.3  # p=0.5 zeroes about half of 64 outputs


def test_compile_fullgraph_matches_eager():
    """torch.compile sees the custom ops without a graph break (fullgraph=True) and agrees."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = nnfast.SwiGLU(16, 32, bias=True)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    y.sum().backward()
    gx, gw = x.grad.clone(), m.gate_up.weight.grad.clone()
    x.grad = None
    m.zero_grad()
    y_eager = m(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, m.gate_up.weight.grad)
