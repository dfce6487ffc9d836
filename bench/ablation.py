"""The paper's ResNet-20 ablation at CPU scale: ReCU vs tau = 1 vs no standardization vs
plain sign (and ReCU with a narrower tau range), fine-tuned from the pretrained weights on
real CIFAR-10 images.

Every variant runs the same command (same seed, data, epochs, recipe) with one switch
changed, through the real CLI. The training subset is a class-balanced selection of
../shared/data/cifar10/train linked (not copied) into a temporary folder; validation is
the full val/ split. Results: a markdown table on stdout, JSON and PNG figures in --out.

    python bench/ablation.py --per-class 1000 --epochs 4 --parallel 2 --out docs/ablation
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
VARIANTS = {
    "recu": [],
    "tau1": ["--tau-min", "1", "--tau-max", "1"],
    "no-std": ["--no-standardize"],
    "plain-sign": ["--plain-sign"],
    "recu-tau95": ["--tau-min", "0.95", "--tau-max", "0.99"],
}
SEEDS = {
    "recu": (42, 43),
    "tau1": (42,),
    "no-std": (42,),
    "plain-sign": (42, 43),
    "recu-tau95": (42,),
}


def make_subset(per_class: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="recu-cifar-subset-"))
    for split, n in (("train", per_class), ("val", None)):
        for cls_dir in sorted((SHARED / "cifar10" / split).iterdir()):
            dst = root / split / cls_dir.name
            dst.mkdir(parents=True)
            for img in sorted(cls_dir.iterdir())[:n]:
                (dst / img.name).symlink_to(img)
    return root


def command(data: Path, runs: Path, variant: str, seed: int, args) -> list[str]:
    return [
        sys.executable, "-m", "recu_cli", "binarize", "resnet20",
        "--weights", str(SHARED / "weights" / "resnet20-12fca82f.th"), "--data", str(data),
        "--epochs", str(args.epochs), "-b", "128", "-j", "1", "--seed", str(seed),
        "-o", str(runs), "--experiment", f"{variant}-s{seed}", "--quiet", "--recipe", "paper",
        *VARIANTS[variant],
        *args.extra,
    ]  # fmt: skip


def run_one(cmd: list[str], run_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rows = list(csv.DictReader((run_dir / "summary.csv").open()))
    return {"wall_s": wall, "rows": [{k: float(v) for k, v in r.items()} for r in rows]}


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, res in sorted(results.items()):
        rows = res["rows"]
        ep = [r["epoch"] for r in rows]
        style = "-" if name.endswith("s42") else "--"
        axes[0].plot(ep, [r["val_top1"] for r in rows], style, marker="o", label=name)
        axes[1].plot(ep, [100 * r["flip_rate_tail"] for r in rows], style, marker="o", label=name)
        axes[2].plot(ep, [100 * r["flip_rate_core"] for r in rows], style, marker="o", label=name)
    titles = ("val top-1 (%)", "sign flips of tail (dead) weights per epoch (%)",
              "sign flips of core weights per epoch (%)")  # fmt: skip
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=1000, help="training images per class")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (1 thread each)")
    ap.add_argument("--runs", type=Path, default=Path("output/ablation"))
    ap.add_argument("--out", type=Path, default=Path("docs/ablation"))
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("extra", nargs="*", help="extra recu binarize flags for every run")
    args = ap.parse_args()
    data = make_subset(args.per_class)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for variant, seeds in SEEDS.items():
        if args.only and variant not in args.only:
            continue
        for seed in seeds:
            name = f"{variant}-s{seed}"
            jobs.append((name, command(data, args.runs, variant, seed, args), args.runs / name))
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {name: pool.submit(run_one, cmd, rd) for name, cmd, rd in jobs}
        results = {name: f.result() for name, f in futures.items()}
    payload = {
        "commands": {name: " ".join(cmd) for name, cmd, _ in jobs},
        "per_class": args.per_class,
        "epochs": args.epochs,
        "results": results,
    }
    (args.out / "ablation.json").write_text(json.dumps(payload, indent=2))
    plot(results, args.out)
    print("| run | " + " | ".join(f"ep{e + 1} top-1" for e in range(args.epochs))
          + " | dead share | tail flips | core flips | wall (s) |")  # fmt: skip
    print("|---" * (args.epochs + 5) + "|")
    for name, res in results.items():
        rows = res["rows"]
        last = rows[-1]
        tops = " | ".join(f"{r['val_top1']:.2f}" for r in rows)
        print(
            f"| {name} | {tops} | {100 * last['dead_share']:.1f}% | "
            f"{100 * sum(r['flip_rate_tail'] for r in rows) / len(rows):.2f}% | "
            f"{100 * sum(r['flip_rate_core'] for r in rows) / len(rows):.2f}% | "
            f"{res['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
