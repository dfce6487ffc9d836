"""bench/gpu_check.sh: the parts that run without a GPU (syntax, refusal, generated data)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0


def test_script_refuses_in_one_line_without_a_gpu(tmp_path) -> None:
    """With no nvidia-smi on PATH (as on any machine without NVIDIA's driver), exit 2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    bash = shutil.which("bash")
    proc = subprocess.run(
        [bash, str(BENCH / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir)},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA GPU" in lines[0]
    assert not (tmp_path / "out").exists()


def test_generated_images_are_an_image_folder(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = module.make_images(tmp_path / "data", classes=2, train_per_class=3, val_per_class=1)
    train = sorted((root / "train").glob("*/*.jpg"))
    assert len(train) == 6 and len(list((root / "val").glob("*/*.jpg"))) == 2
    with Image.open(train[0]) as img:
        assert img.size == (256, 256) and img.mode == "RGB"
    first = train[0].read_bytes()
    module.make_images(root, classes=2, train_per_class=3, val_per_class=1)  # reused as is
    assert train[0].read_bytes() == first


def test_dry_run_exercises_the_step_equal_and_profile_parts_on_the_cpu(tmp_path) -> None:
    """`gpu_check.py --dry-run`: the GPU check's own code on the CPU at tiny sizes (the
    compiled steps traced by dynamo, the CUDA graph replaced by a rerun): every entry of
    the step table timed, the targets evaluated, graph and compiled losses equal, the
    profiler tables written, each part timed and recorded in gpu_check.json."""
    import json
    import os
    import sys

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), str(out), "--parts", "step,equal,profile",
         "--dry-run", "--cases", "resnet20"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert set(report["parts"]) == {"step", "equal", "profile"}
    assert all(p["status"] == "ok" and p["wall_s"] > 0 for p in report["parts"].values())
    rows = report["step"]
    assert {(r["layer"], r["mode"]) for r in rows} == {
        (layer, mode)
        for layer in ("float", "recu paper", "recu finetune")
        for mode in ("eager", "compiled")
    } | {("recu finetune", "compiled+average")}
    assert all(r["ms"] > 0 and r["loss_finite"] for r in rows)
    compiled = [r for r in rows if r["mode"].startswith("compiled")]
    assert all(r["path"] == "compiled + replayed step (CPU)" for r in compiled)
    assert any("recu finetune compiled <= 1.5x float eager" in t for t in report["targets"])
    assert any("compiled+average <= 1.1x compiled: " in t for t in report["targets"])
    assert report["equal"]["graph_equals_compiled"]
    # stage 2 moves the latent weights of every path alike (the first GPU run's compiled
    # step did not move them at all)
    moved = report["equal"]["stage2_weight_movement"]
    assert moved["eager"] > 0 and report["equal"]["trains_like_eager"]
    assert moved["graph"] == pytest.approx(moved["eager"], rel=0.05)
    for label in ("compiled", "graph"):  # the run's own check, and what stage 2's would say
        lines = report["equal"][f"{label}_log"]
        assert any(line.startswith("compiled step checked against the eager") for line in lines)
        assert any(line.startswith("stage-2 check (ok): latent-weight") for line in lines)
    for mode in ("compiled", "eager"):
        table = (out / f"profile_finetune_resnet20_{mode}.txt").read_text()
        assert "Name" in table and "aten::" in table
    assert "## step: ok, wall" in proc.stdout and "| resnet20 | recu finetune |" in proc.stdout
