"""A run's ``loss.png``, drawn in a child process of the trainer (``nnfast.train.plot_metrics``
starts it): matplotlib (~25 MiB and ~0.4 s to import) then never enters the trainer's own
memory, whose peak is measured against nanoGPT's (issue 16).

``python nnfast/plot.py PNG`` reads the metrics rows as JSON on stdin. This file imports
neither torch nor the rest of nnfast, so the child stays small.
"""

from __future__ import annotations

import json
import sys


def draw(rows: list[dict], png: str) -> None:
    """Train and val loss against the step (HellaSwag accuracy on a right axis if any)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)  # an Agg canvas without touching pyplot's global backend
    ax = fig.add_subplot()
    for key, label in (("loss", "train"), ("val_loss", "val")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    hs = [(r["step"], r["hellaswag_acc_norm"]) for r in rows if "hellaswag_acc_norm" in r]
    if hs:  # accuracy on its own scale, on the right
        ax2 = ax.twinx()
        ax2.plot(*zip(*hs), color="tab:green", marker=".", label="hellaswag acc_norm")
        ax2.set_ylabel("accuracy")
        ax2.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    draw(json.load(sys.stdin), sys.argv[1])
