"""Val top-1 per epoch of run folders, one line each, as a PNG (docs/results.md's curves).

    python bench/curves.py docs/figures/switch.png RUN_FOLDER... [--label NAME ...] \
        [--values "NAME=52.0,62.9,..." --stage1 3]

Reads each run's summary.csv; stage-2 epochs are drawn solid, stage-1 epochs dashed.
`--values` adds a curve from numbers (a run whose folder is gone, as results.md lists it),
its first `--stage1` epochs being stage 1.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("runs", type=Path, nargs="*")
    ap.add_argument("--label", nargs="*", default=None, help="one per run (default: names)")
    ap.add_argument("--title", default="val top-1 per epoch")
    ap.add_argument("--values", nargs="*", default=[], help="NAME=v1,v2,... per curve")
    ap.add_argument("--stage1", type=int, default=0, help="stage-1 epochs of --values")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = args.label or [run.name for run in args.runs]
    curves = []  # (label, val top-1 per epoch, index of the first stage-2 epoch)
    for run, label in zip(args.runs, labels, strict=True):
        rows = list(csv.DictReader((run / "summary.csv").open()))
        first2 = next((i for i, r in enumerate(rows) if r["stage"] == "2"), 0)
        curves.append((label, [float(r["val_top1"]) for r in rows], first2))
    for item in args.values:
        label, numbers = item.split("=", 1)
        curves.append((label, [float(v) for v in numbers.split(",")], args.stage1))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, top1, first2 in curves:
        epochs = list(range(1, len(top1) + 1))
        line = ax.plot(epochs, top1, marker="o", label=label)[0]
        if first2:  # stage 1 dashed underneath, up to the switch
            head = slice(0, first2 + 1)
            ax.plot(epochs[head], top1[head], "--", marker="o", color=line.get_color())
            line.set_data(epochs[first2:], top1[first2:])
    ax.set_xlabel("epoch (dashed: stage 1, real weights)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
