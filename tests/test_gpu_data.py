"""bench/gpu_data.py --dry-run: every part of the GPU data benchmark, tiny, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, RESNET20_WEIGHTS, link_tree, require_shared


def test_dry_run_runs_every_part_and_writes_its_numbers(tmp_path: Path) -> None:
    require_shared(RESNET20_WEIGHTS)
    cifar = link_tree(tmp_path / "cifar", {"train": 2, "val": 1})
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_data.py"), str(out), "--cifar", str(cifar),
         "--weights", str(RESNET20_WEIGHTS), "--dry-run", "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_data.json").read_text())
    a, b, c = report["a"], report["b"], report["c"]
    assert a["data_path"]["path"] == "resident" and a["data_line"].startswith("data: resident:")
    assert len(a["epoch_seconds"]) == 1 and a["epochs_wall_s"] > 0 and 0 <= a["val_top1"][0] <= 100
    assert b["data_line"].startswith("data: gpu-decode:") and "decode with PIL" in b["data_line"]
    assert b["best_img_per_s"] > 0 and b["images"] == {"train": 16, "val": 2}
    rows = {(r["model"], r["row"]): r for r in c["rows"]}
    assert set(rows) == {("resnet20", "pil-main"), ("resnet20", "pil"), ("resnet20", "resident"),
                         ("resnet18", "pil"), ("resnet18", "gpu-decode")}  # fmt: skip
    assert all(r["img_per_s"] > 0 and r["images"] > 0 for r in rows.values()), rows
    assert rows[("resnet18", "gpu-decode")]["path"] == "gpu-decode"
    assert rows[("resnet20", "resident")]["path"] == "resident"
    assert "| c: loader resnet20 resident |" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_data.json", "part-a.json", "part-b.json", "part-c.json",
    ]  # fmt: skip
