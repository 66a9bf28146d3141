"""Test setup. Without a GPU the Triton kernels run through Triton's interpreter, which
must be switched on before any kernel is decorated: hence here, before test modules load.
Set NNFAST_TEST_INTERPRET=0 to test only the reference path on a CPU machine."""

import os

import torch

if not torch.cuda.is_available() and os.environ.get("NNFAST_TEST_INTERPRET", "1") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests judge numerics, not speed: make CPU matmuls deterministic and fp32-exact.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
