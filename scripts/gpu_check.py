"""The staged GPU check: a report from any time budget, every stage appended as it ends.

    python scripts/gpu_check.py OUT_DIR [--budget-s 780] [--dry-run]

Stages, each cut at its cap or at what is left of the budget, whichever comes first:

1. check  (<= 3 min): every kernel fwd+bwd at headline shapes, fp16/bf16/fp32, vs the
   reference (scripts/kernel_check.py).
2. bench  (<= 5 min): headline benchmarks side by side: attention fwd and fwd+bwd vs SDPA
   (default, flash and cuDNN backends) at D 64/128, N 1k-8k, causal and not; norms, RoPE,
   SwiGLU, linear CE vs Liger-Kernel and torch.compile, in GB/s and the fraction of the
   copy bandwidth measured in the same run. One pytest run per group, in order, each with
   its own JSON, so a group cut short loses only itself.
3. train  (<= 4 min): GPT-2 124M training step: tokens/s, MFU, peak memory, nnfast vs the
   same model in plain PyTorch (SDPA), eager and torch.compile.
4. tests: the full test suite on CUDA with whatever time is left.

OUT_DIR gets report.md (rewritten after every stage), run.log (every command's output)
and bench.json (all benchmark rows): three files, within what a device call brings back.

``--dry-run`` runs the same stages at tiny sizes on the CPU: stage 1 through Triton's
interpreter; stages 2-3 their CPU benchmark cases (nnfast's reference path there: the
interpreter is far too slow for timing shapes); stage 4 one small test file. CI runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_report import load, markdown  # noqa: E402

CAPS = {"check": 180, "bench": 300, "train": 240}
# Stage 2 groups: (name, share weight, pytest args). Attention leaves out the (B, H, N, N)
# reference; N 1024/4096/8192.
BENCH_GROUPS = [
    ("attention", 3, ["benchmarks/test_attention.py", "-k",
                   "cuda and (nnfast or sdpa) and (1024 or 4096 or 8192)"]),
    ("norm", 1, ["benchmarks/test_norm.py", "-k", "cuda and 4096x4096"]),
    ("rope", 1, ["benchmarks/test_rope.py", "-k", "cuda"]),
    ("activation", 1, ["benchmarks/test_activation.py", "-k", "cuda"]),
    ("cross_entropy", 1.5, ["benchmarks/test_cross_entropy.py", "-k", "cuda"]),
]
TRAIN_IMPLS = ["torch", "nnfast", "torch-compile", "nnfast-compile"]


class Check:
    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out, self.dry = out, dry
        self.deadline = time.monotonic() + budget_s
        self.report = out / "report.md"
        self.log = out / "run.log"
        self.sections: list[str] = []
        self.bench_rows: list[dict] = []
        self.py = sys.executable
        self.problems: list[str] = []  # commands that failed (not cut) and broken stages

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sh(self, args: list[str], timeout: float, env: dict | None = None) -> tuple[str, str]:
        """Run a command (its output to run.log and returned); ('rc N' | 'cut', output)."""
        if timeout < 5:
            return "skipped (no time left)", ""
        full_env = {**os.environ, **(env or {})}
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(args)}  (timeout {timeout:.0f}s)\n")
        try:
            p = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True,
                               timeout=timeout)
            status, text = f"rc {p.returncode}", p.stdout + p.stderr
            if p.returncode != 0:
                self.problems.append(f"{' '.join(args[:4])}...: {status}")
        except subprocess.TimeoutExpired as e:
            status = f"cut at {timeout:.0f}s"
            text = "".join(b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
                           for b in (e.stdout, e.stderr))
        with open(self.log, "a") as log:
            log.write(text)
        return status, text

    def add(self, title: str, body: str, t0: float) -> None:
        self.sections.append(f"## {title} ({time.monotonic() - t0:.0f} s)\n\n{body.strip()}\n")
        self.report.write_text("\n".join(self.sections))

    def stage_budget(self, name: str) -> float:
        cap = CAPS[name] if not self.dry else CAPS[name] / 3
        return min(cap, self.left())

    # ------------------------------------------------------------------ stages
    def check(self) -> None:
        t0 = time.monotonic()
        args = [self.py, "scripts/kernel_check.py"] + (["--tiny"] if self.dry else [])
        env = {"TRITON_INTERPRET": "1"} if self.dry else {}
        status, text = self.sh(args, self.stage_budget("check"), env)
        table = "\n".join(line for line in text.splitlines() if line.startswith("|"))
        self.add(f"1. Kernels vs reference: {status}", table or "no output (see run.log)", t0)

    def _pytest_bench(self, name: str, args: list[str], timeout: float, env: dict) -> str:
        path = self.out / f".bench-{name}.json"
        path.unlink(missing_ok=True)
        status, _ = self.sh([self.py, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider",
                             "--benchmark-only", f"--benchmark-json={path}"], timeout, env)
        if path.exists():
            rows = load(path)
            self.bench_rows += rows
            path.unlink()
            (self.out / "bench.json").write_text(json.dumps(self.bench_rows, indent=1))
            return f"{status}, {len(rows)} cases"
        return f"{status}, no results"

    def bench(self) -> None:
        t0 = time.monotonic()
        end = time.monotonic() + self.stage_budget("bench")
        env = {"NNFAST_BENCH_REPS": "5"}
        groups = BENCH_GROUPS
        if self.dry:
            groups = [(n, w, [a[0], "-k", "cpu"]) for n, w, a in BENCH_GROUPS]
            env["NNFAST_BENCH_COPY_BYTES"] = str(8 << 20)
        before = len(self.bench_rows)
        done = []
        for i, (name, weight, args) in enumerate(groups):
            # Each group gets its weighted share of what is left (later groups keep theirs).
            share = (end - time.monotonic()) * weight / sum(g[1] for g in groups[i:])
            done.append(f"{name}: {self._pytest_bench(name, args, share, env)}")
        body = "; ".join(done) + "\n" + markdown(self.bench_rows[before:])
        self.add("2. Benchmarks", body, t0)

    def train(self) -> None:
        t0 = time.monotonic()
        end = time.monotonic() + self.stage_budget("train")
        before = len(self.bench_rows)
        env = {"NNFAST_BENCH_REPS": "5"}
        if self.dry:
            cases = [("cpu", "test_train_step_cpu and gpt2")]
        else:
            cases = [(i, f"test_train_step_cuda[gpt2-gpt2-124m-{i}]") for i in TRAIN_IMPLS]
        done = []
        for i, (name, expr) in enumerate(cases):
            share = (end - time.monotonic()) / (len(cases) - i)
            sel = (["benchmarks/test_train_step.py", "-k", expr] if self.dry
                   else [f"benchmarks/test_train_step.py::{expr}"])
            res = self._pytest_bench(f"train-{name}", sel, share, env)
            done.append(f"{name}: {res}")
        self.add("3. GPT-2 124M training step", "; ".join(done) + "\n" +
                 markdown(self.bench_rows[before:]), t0)

    def tests(self) -> None:
        t0 = time.monotonic()
        target = ["tests/test_backend.py"] if self.dry else ["tests"]
        status, text = self.sh([self.py, "-m", "pytest", *target, "-q", "-rfE",
                                "-p", "no:cacheprovider"], self.left() - 5)
        summary = [line for line in text.splitlines()
                   if line.startswith(("FAILED", "ERROR")) or " passed" in line
                   or " failed" in line]
        self.add(f"4. Test suite: {status}", "```\n" + "\n".join(summary[-40:]) + "\n```", t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for all stages (default 780 on a GPU, 180 dry)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--header", type=Path, help="markdown to put first (device, versions)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (180 if args.dry_run else 780)
    run = Check(args.out, budget, args.dry_run)
    if args.header and args.header.exists():
        run.sections.append(args.header.read_text())
    dry = " (dry run: CPU, tiny sizes)" if args.dry_run else ""
    run.sections.append(f"Budget {budget:.0f} s{dry}.\n")
    for stage in (run.check, run.bench, run.train, run.tests):
        try:
            stage()
        except Exception as e:  # a broken stage is reported; the next one still runs
            run.add(f"{stage.__name__}: the stage itself failed", repr(e), time.monotonic())
            run.problems.append(f"stage {stage.__name__}: {e!r}")
    print(f"report: {run.report}")
    for p in run.problems:
        print(f"problem: {p}")
    # The dry run (CI) fails on any failed command: a script bug must not cost GPU time.
    # On a GPU the report is the product: failures are in it, the exit code stays 0.
    sys.exit(1 if run.problems and args.dry_run else 0)


if __name__ == "__main__":
    main()
