"""The dispatch contract: NNFAST_BACKEND, the reference on plain CPU, clear errors."""

import os
import subprocess
import sys

import pytest
import torch

import nnfast
from nnfast import _backend


def test_backend_values(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    assert nnfast.backend() == "torch"
    assert not _backend.use_triton(torch.zeros(1))
    monkeypatch.setenv("NNFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="NNFAST_BACKEND"):
        nnfast.backend()


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NNFAST_BACKEND")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120
    )


def test_cpu_without_interpreter_uses_reference():
    code = (
        "import torch, nnfast; from nnfast import _backend; import sys\n"
        "x = torch.randn(3, 8)\n"
        "assert not _backend.use_triton(x)\n"
        "y = nnfast.functional.rms_norm(x, (8,))\n"
        "assert torch.allclose(y, torch.nn.functional.rms_norm(x, (8,)), atol=1e-6)\n"
        "assert 'nnfast.kernels.norm' not in sys.modules\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr


def test_forced_triton_on_plain_cpu_raises_clearly():
    r = _run(
        "import torch, nnfast; nnfast.functional.rms_norm(torch.randn(2, 4), (4,))",
        NNFAST_BACKEND="triton",
    )
    assert r.returncode != 0
    assert "TRITON_INTERPRET" in r.stderr


@pytest.mark.skipif(not _backend.has_triton(), reason="triton not installed")
def test_interpreter_runs_the_kernel():
    code = (
        "import torch, nnfast, sys\n"
        "nnfast.functional.rms_norm(torch.randn(2, 4), (4,))\n"
        "assert 'nnfast.kernels.norm' in sys.modules\n"
    )
    r = _run(code, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr


def test_import_without_triton():
    """``import nnfast`` works where triton is missing: the reference path serves."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib.util\n"
        "orig = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'triton' else orig(n, *a)\n"
        "import torch, nnfast\n"
        "assert not nnfast._backend.has_triton()\n"
        "x = torch.randn(2, 4)\n"
        "y = nnfast.RMSNorm(4)(x)\n"
        "assert y.shape == x.shape\n"
    )
    r = _run(code, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr
