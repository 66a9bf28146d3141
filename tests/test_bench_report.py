"""scripts/bench_report.py: pytest-benchmark JSON -> markdown table with ratios, and plots."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench(name, median_s, **info):
    return {"name": name, "stats": {"median": median_s}, "extra_info": info}


def test_report_ratios_and_plots(tmp_path):
    data = {
        "benchmarks": [
            _bench(
                "a",
                2e-3,
                op="rms_norm",
                impl="nnfast",
                shape="4096x4096",
                gbps=100.0,
                frac_copy_bw=0.5,
                mfu=None,
            ),
            _bench(
                "b",
                4e-3,
                op="rms_norm",
                impl="torch",
                shape="4096x4096",
                gbps=50.0,
                peak_mem_gib=1.5,
                mem_ratio_vs_eager=1.0,
            ),
            _bench("c", 1e-3, op="rms_norm", impl="torch", shape="1x8"),
        ]
    }
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "rep"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_report.py"), str(src), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    text = (out / "report.md").read_text()
    assert "### rms_norm" in text
    # torch took 2x nnfast's time at the shared shape: nnfast is 2.00x as fast.
    torch_row = next(line for line in text.splitlines() if "| torch | 4 |" in line)
    assert torch_row.endswith("| 2.00x |"), torch_row
    assert "50% of copy" in text
    assert "peak 1.5 GiB" in torch_row  # measured values never split a comparison
    lone = next(line for line in text.splitlines() if "shape=1x8" in line)
    assert lone.endswith("|  |")  # no nnfast row to compare with
    assert (out / "rms_norm.png").read_bytes()[:4] == b"\x89PNG"
