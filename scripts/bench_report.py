"""Turn a pytest-benchmark JSON file into a markdown table and PNG plots.

    python scripts/bench_report.py bench.json --out benchmarks/results/h100-2026-11-23

Benchmarks put their parameters into ``extra_info`` (``op``, ``impl``, ``pass``, shape
fields, ...) and their throughput (``gbps``, ``frac_copy_bw``, ``tflops``, ``tokens_per_s``,
``peak_mem_gb``). Rows that share every parameter but ``impl`` form one comparison; each
row's ``vs nnfast`` column is nnfast's speed over that row's (above 1: nnfast is faster).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

MEASURED = {
    "gbps",
    "frac_copy_bw",
    "tflops",
    "tokens_per_s",
    "mfu",
    "peak_mem_gb",
    "peak_mem_mb",
    "cuda_event_ms",
    "device",
    "ms",
    "extra_mem_vs_weight",
    "speed_vs_eager",
}


def load(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    rows = []
    for b in data["benchmarks"]:
        info = dict(b.get("extra_info", {}))
        ms = info.get("cuda_event_ms", b["stats"]["median"] * 1e3)
        # None marks "not applicable here" (e.g. MFU on a CPU): drop it from the table.
        rows.append(
            {"name": b["name"], "ms": ms, **{k: v for k, v in info.items() if v is not None}}
        )
    return rows


def measured(key: str) -> bool:
    """A result rather than a parameter: never part of what makes two rows one comparison."""
    return (
        key in MEASURED
        or key.startswith(("peak", "eager_", "max_"))
        or "ratio" in key
        or key.endswith(("_ms", "_gib", "_gb", "_mb"))
    )


def group_key(row: dict) -> tuple:
    return tuple(
        sorted((k, str(v)) for k, v in row.items() if not measured(k) and k not in ("impl", "name"))
    )


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[group_key(r)].append(r)
    by_op: dict[str, list[tuple]] = defaultdict(list)
    for key, members in groups.items():
        by_op[str(members[0].get("op", members[0]["name"].split("[")[0]))].append((key, members))
    out = []
    for op in sorted(by_op):
        out.append(f"\n### {op}\n")
        out.append("| case | impl | ms | throughput | vs nnfast |")
        out.append("|---|---|---|---|---|")
        for key, members in sorted(by_op[op]):
            ref = next((m for m in members if str(m.get("impl", "")).startswith("nnfast")), None)
            case = ", ".join(f"{k}={v}" for k, v in key if k != "op")
            for m in sorted(members, key=lambda m: m["ms"]):
                tp = [
                    f"{m[k]:.3g} {u}"
                    for k, u in (
                        ("tflops", "TFLOP/s"),
                        ("gbps", "GB/s"),
                        ("tokens_per_s", "tok/s"),
                        ("mfu", "MFU"),
                    )
                    if k in m
                ]
                if "frac_copy_bw" in m:
                    tp.append(f"{100 * m['frac_copy_bw']:.0f}% of copy")
                for k in sorted(m):
                    if k.startswith("peak_mem_") and isinstance(m[k], (int, float)):
                        tp.append(
                            f"peak {m[k]:.3g} {k.rsplit('_', 1)[1].upper().replace('GIB', 'GiB')}"
                        )
                    elif ("ratio" in k or k.startswith("max_")) and isinstance(m[k], (int, float)):
                        tp.append(f"{k} {m[k]:.3g}")
                ratio = f"{m['ms'] / ref['ms']:.2f}x" if ref is not None and m is not ref else ""
                out.append(
                    f"| {case} | {m.get('impl', m['name'])} | {m['ms']:.4g} | "
                    f"{'; '.join(tp)} | {ratio} |"
                )
    return "\n".join(out) + "\n"


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_op[str(r.get("op", r["name"].split("[")[0]))].append(r)
    written = []
    for op, members in by_op.items():
        metric = next(
            (k for k in ("tflops", "gbps", "tokens_per_s") if any(k in m for m in members)), None
        )
        if metric is None:
            continue
        cases = sorted(
            {", ".join(f"{k}={v}" for k, v in group_key(m) if k != "op") for m in members}
        )
        impls = sorted({str(m.get("impl", "?")) for m in members})
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            ys = []
            for c in cases:
                hit = [
                    m.get(metric, 0)
                    for m in members
                    if str(m.get("impl", "?")) == impl
                    and ", ".join(f"{k}={v}" for k, v in group_key(m) if k != "op") == c
                ]
                ys.append(hit[0] if hit else 0)
            ax.bar([x + i * width for x in range(len(cases))], ys, width, label=impl)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=6)
        ax.set_ylabel(metric)
        ax.set_title(op)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{op.replace('/', '_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="folder for report.md and PNGs")
    ap.add_argument("--header", type=Path, help="markdown to put first (device, versions)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = load(args.json)
    text = args.header.read_text() if args.header else ""
    text += "\n## Benchmarks\n" + markdown(rows)
    for p in plots(rows, args.out):
        text += f"\n![{p.stem}]({p.name})\n"
    (args.out / "report.md").write_text(text)
    print(f"wrote {args.out / 'report.md'} ({len(rows)} benchmarks)")


if __name__ == "__main__":
    main()
