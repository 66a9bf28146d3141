"""Peak extra memory of the fused linear + cross-entropy (forward + backward) on CPU,
through Triton's interpreter and the torch profiler's allocation events, as a multiple
of the weight's bytes, beyond the inputs, the weight and the gradients.

    python scripts/ce_memory.py            # the issue's shape: N=256 C=256 V=8192
"""

from __future__ import annotations

import gc
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before nnfast's kernels import triton

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nnfast.functional as Fn  # noqa: E402
from tests.helpers import profiled_peak_bytes  # noqa: E402


def extra_vs_weight(N, C, V, x_dtype, w_dtype, reduction) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g).to(x_dtype).requires_grad_()
    w = (torch.randn(V, C, generator=g) / C**0.5).to(w_dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    go = torch.ones(N) if reduction == "none" else None

    def step():
        loss = Fn.linear_cross_entropy(x, w, t, reduction=reduction)
        gc.collect()  # the interpreter's launches leave cycles holding their arguments
        loss.backward(go)

    step()
    x.grad = w.grad = None
    gc.collect()
    peak = profiled_peak_bytes(step)
    grads = x.grad.nbytes + w.grad.nbytes
    return (peak - grads) / w.nbytes


def main() -> None:
    torch.set_num_threads(1)
    N, C, V = 256, 256, 8192
    cases = [(torch.float16, torch.float16, "mean"), (torch.float16, torch.float16, "none"),
             (torch.float16, torch.float32, "mean")]
    print(f"N={N} C={C} V={V}: peak extra memory (fwd+bwd) / weight bytes")
    for xd, wd, red in cases:
        r = extra_vs_weight(N, C, V, xd, wd, red)
        print(f"  x {str(xd)[6:]:8s} weight {str(wd)[6:]:8s} {red:5s}: {r:.2f}x")


if __name__ == "__main__":
    main()
