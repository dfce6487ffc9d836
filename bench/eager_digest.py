"""Digests of short fixed-seed CPU `recu binarize` runs: eager CPU training must stay bit
for bit what it was when a change touches the training step (issue 24: compile and CUDA
graphs are new paths; the eager CPU path does not move).

Each run: resnet20 with its CIFAR-10 weights on a few linked CIFAR-10 images, 6 steps,
no workers, both recipes (finetune with both stages and the switch), and finetune under
bf16 autocast. Prints one line per run: the SHA-256 (16 hex digits) of the final model
state and of the optimizer state in resume.pt, and the summary's losses.

    python bench/eager_digest.py [--data ../shared/data] [--keep DIR]

Compare the lines before and after a change, run with the same thread count (2 here).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "paper": ["--recipe", "paper", "--epochs", "2"],
    "finetune": ["--recipe", "finetune", "--stage1-epochs", "1", "--epochs", "2"],
    "finetune-amp": ["--recipe", "finetune", "--stage1-epochs", "1", "--epochs", "2", "--amp"],
}


def link_images(src: Path, dst: Path, per_class: dict[str, int]) -> Path:
    for split, n in per_class.items():
        for cls_dir in sorted((src / split).iterdir()):
            d = dst / split / cls_dir.name
            d.mkdir(parents=True, exist_ok=True)
            for img in sorted(cls_dir.iterdir())[:n]:
                (d / img.name).symlink_to(img)
    return dst


def tensors_digest(obj) -> str:
    """SHA-256 over every tensor (and number) of a nested state, in key order."""
    h = hashlib.sha256()

    def walk(x, path: str) -> None:
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k], f"{path}.{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}.{i}")
        elif isinstance(x, torch.Tensor):
            h.update(path.encode())
            h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{path}={x!r}".encode())

    walk(obj, "")
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("RECU_SHARED_DATA", REPO.parent / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=default_data)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    ap.add_argument("--runs", nargs="*", default=list(RUNS))
    a = ap.parse_args()
    root = Path(a.keep or tempfile.mkdtemp(prefix="recu-digest-"))
    data = root / "data"
    if not data.exists():
        link_images(a.data / "cifar10", data, {"train": 4, "val": 2})
    weights = a.data / "weights" / "resnet20-12fca82f.th"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    for name in a.runs:
        args = [
            sys.executable, "-m", "recu_cli", "binarize", "resnet20", "--weights", str(weights),
            "--data", str(data), "-o", str(root), "--experiment", name, "-b", "8",
            "--max-steps", "6", "-j", "0", "--seed", "5", "--log-interval", "0", "--quiet",
            "--device", "cpu", *RUNS[name],
        ]  # fmt: skip
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        saved = torch.load(root / name / "resume.pt", map_location="cpu", weights_only=True)
        rows = list(csv.DictReader((root / name / "summary.csv").open()))
        losses = " ".join(f"{r['train_loss']}/{r['val_loss']}" for r in rows)
        print(
            f"{name:13s} model {tensors_digest(saved['model'])}  optimizer "
            f"{tensors_digest(saved['optimizer'])}  losses {losses}"
        )


if __name__ == "__main__":
    main()
