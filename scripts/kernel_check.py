"""Stage 1 of the GPU check: every kernel, forward and backward, at a few headline shapes in
fp16/bf16/fp32 against the fp32 reference, by the tests' rule (error at most 2x PyTorch's
own in that dtype for outputs, 3x for gradients, plus a floor of 1e-3 of the magnitude;
1e-4 for fp32, whose headline-size sums round more than the tests' small ones). Prints a markdown
table; exit code 1 if any case fails or crashes.

    python scripts/kernel_check.py            # CUDA, headline shapes
    python scripts/kernel_check.py --tiny     # tiny shapes (CPU: through the interpreter)

On CPU set TRITON_INTERPRET=1 before running (scripts/gpu_check.py --dry-run does), and
bf16 is left out there (bf16 tl.dot is wrong in the interpreter).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nnfast.functional as Fn  # noqa: E402
from tests.helpers import max_err  # noqa: E402


def _const(t: torch.Tensor):
    """A factory of a float32 input that is never cast or differentiated (RoPE tables)."""
    def make(dt, dev):
        return t.to(dev)

    make.const = True
    return make


def _bthd(make):
    """A (B, T, H, D) factory's tensors as (B, H, T, D) views (strided like most models')."""
    return lambda dt, dev: make(dt, dev).transpose(1, 2)


def _cases(tiny: bool):
    """(name, shape text, fn(*tensors), tensor factories(dtype, device)) per kernel."""
    N, C = (37, 80) if tiny else (4096, 4096)
    B, T, H, D = (1, 33, 2, 64) if tiny else (2, 2048, 16, 128)
    Nce, Cce, V = (19, 32, 999) if tiny else (4096, 768, 50257)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return lambda dt, dev: (scale * torch.randn(*shape, generator=g)).to(dev, dt)

    def target(n, v):
        return lambda dt, dev: torch.randint(0, v, (n,), generator=g).to(dev)

    half = D // 2
    ang = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(half) / half)
    cos, sin = _const(ang.cos()), _const(ang.sin())  # fp32 tables, not differentiated
    yield "rms_norm", f"{N}x{C}", lambda x, w: Fn.rms_norm(x, (C,), w), [rnd(N, C), rnd(C)]
    yield ("layer_norm", f"{N}x{C}", lambda x, w, b: Fn.layer_norm(x, (C,), w, b),
           [rnd(N, C), rnd(C), rnd(C)])
    yield ("add_rms_norm", f"{N}x{C}", lambda x, r, w: Fn.add_rms_norm(x, r, (C,), w)[0],
           [rnd(N, C), rnd(N, C), rnd(C)])
    yield ("apply_rotary", f"B{B} T{T} H{H} D{D}",
           lambda q, k, c, s: torch.cat(Fn.apply_rotary(q, k, c, s), -1),
           [rnd(B, H, T, D), rnd(B, H, T, D), cos, sin])
    yield "silu_mul", f"{N}x{C}", Fn.silu_mul, [rnd(N, C), rnd(N, C)]
    for causal in (False, True):
        for d in ((64,) if tiny else (64, 128)):
            h = H if tiny else 2048 // d
            yield (f"attention{' causal' if causal else ''}", f"B{B} H{h} N{T} D{d}",
                   lambda q, k, v, c=causal: Fn.scaled_dot_product_attention(q, k, v, is_causal=c),
                   [rnd(B, h, T, d)] * 3)
    # The Hopper forward (TMA descriptors) beyond contiguous MHA: GQA on a (B, T, H, D)
    # buffer seen as (B, H, T, D), and a varlen pack (descriptors over the whole pack).
    hq, hk = (4, 2) if tiny else (16, 4)
    yield ("attention gqa bthd causal", f"B{B} Hq{hq} Hk{hk} N{T} D{D}",
           lambda q, k, v: Fn.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                          enable_gqa=True),
           [_bthd(rnd(B, T, h, D)) for h in (hq, hk, hk)])
    lens = [7, 19, 7] if tiny else [300, 1500, 2048, 248]
    cu = _const(torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32))
    yield ("varlen_attention causal", f"{len(lens)} seqs {sum(lens)} rows H{H} D{D}",
           lambda q, k, v, cq, ck: Fn.varlen_attention(q, k, v, cq, ck, max(lens), max(lens),
                                                       causal=True),
           [rnd(sum(lens), H, D)] * 3 + [cu, cu])
    yield ("linear_cross_entropy", f"N{Nce} C{Cce} V{V}",
           lambda x, w, t: Fn.linear_cross_entropy(x, w, t, label_smoothing=0.1),
           [rnd(Nce, Cce), rnd(V, Cce, scale=Cce**-0.5), target(Nce, V)])
    yield ("cross_entropy", f"N{Nce} V{V}", lambda z, t: Fn.cross_entropy(z, t),
           [rnd(Nce, V, scale=3.0), target(Nce, V)])
    yield ("token_merge", f"B{B} T{T} C{Cce} k2", lambda x, w: Fn.token_merge(x, w, k=2),
           [rnd(B, T, Cce), rnd(Cce, Cce, 2, scale=(2 * Cce) ** -0.5)])


def _run(fn, tensors, cast, grad_seed=1):
    leaves = [t.detach().clone().requires_grad_(c) for t, c in zip(tensors, cast)]
    out = fn(*leaves)
    diff = [t for t in leaves if t.requires_grad]
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    grads = torch.autograd.grad(out, diff, go.to(out.device, out.dtype))
    return [out.detach(), *grads]


def check(tiny: bool, device: str, dtypes) -> bool:
    ok_all = True
    print("| kernel | shape | dtype | worst err / bound (out, grads) | result | s |")
    print("|---|---|---|---|---|---|")
    for name, shape, fn, makers in _cases(tiny):
        base = [m(torch.float32, "cpu") for m in makers]
        cast = [b.is_floating_point() and not getattr(m, "const", False)
                for b, m in zip(base, makers)]
        for dtype in dtypes:
            t0 = time.perf_counter()
            try:
                x = [b.to(device, dtype) if c else b.to(device) for b, c in zip(base, cast)]
                x32 = [b.float() if c else b for b, c in zip(x, cast)]
                got = _run(fn, x, cast)
                os.environ["NNFAST_BACKEND"] = "torch"
                try:
                    want = _run(fn, x32, cast)
                    lowp = _run(fn, x, cast)
                finally:
                    os.environ.pop("NNFAST_BACKEND")
                ratios = []
                for i, (o, r, p) in enumerate(zip(got, want, lowp)):
                    floor = (1e-4 if dtype == torch.float32 else 1e-3) * max(
                        r.abs().max().item(), 1.0)
                    bound = (2.0 if i == 0 else 3.0) * max_err(p, r) + floor
                    bad = torch.isnan(o).any().item() or o.dtype != p.dtype
                    ratios.append(float("inf") if bad else max_err(o, r) / bound)
                ok = max(ratios) <= 1.0
                text = f"{ratios[0]:.2f}, {max(ratios[1:], default=0):.2f}"
            except Exception as e:  # a crash is a failed case, reported, not the end
                ok, text = False, f"{type(e).__name__}: {str(e)[:80]}"
            ok_all &= ok
            dt = str(dtype).removeprefix("torch.")
            print(f"| {name} | {shape} | {dt} | {text} | {'ok' if ok else 'FAIL'} |"
                  f" {time.perf_counter() - t0:.1f} |", flush=True)
    return ok_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the dry run)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    if device == "cpu":
        dtypes.remove(torch.bfloat16)
    sys.exit(0 if check(args.tiny, device, dtypes) else 1)


if __name__ == "__main__":
    main()
