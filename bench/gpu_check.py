"""The GPU path of `recu binarize`, checked in a few minutes on whatever GPUs are present.

Run through bench/gpu_check.sh (it checks for a GPU first). Parts:
  1. step:   img/s of one training step (AMP bf16 and fp16, channels-last, Adam) of timm
             resnet18 at 224 px, float model against the ReCU model (paper and finetune
             layers), on tensors already on the GPU; and the dtype BatchNorm sees.
  2. run:    `recu binarize resnet18 --amp` end to end on generated 224 px JPEGs, bf16 and
             fp16, one process; then under torchrun over all GPUs (img/s from summary.csv).
  3. resume: a --deterministic run interrupted by SIGINT and resumed equals the
             uninterrupted one to the bit (README's claim for GPUs).
Prints a markdown table and writes OUT/gpu_check.json.

    python bench/gpu_check.py OUT [--steps 30] [--batch 128]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from recu_cli.bnn import convert_model
from recu_cli.convert_config import ConvertConfig
from recu_cli.models import create_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LAYERS = {
    "float": None,
    "recu paper": ConvertConfig(tau=0.85),
    "recu finetune": ConvertConfig(activation="prelu", act_threshold="learned", tau=0.85),
}


def make_images(root: Path, classes: int, train_per_class: int, val_per_class: int) -> Path:
    """ImageFolder train/ and val/ of random 256 px JPEGs (the 224 px crop comes from timm's
    transforms, as with real data). Returns root; reuses a complete earlier one."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file():
        return root
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):  # smooth noise: JPEGs of ~10 kB, decoded like photos
                small = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8)
                image = Image.fromarray(small.numpy()).resize((256, 256), Image.BILINEAR)
                image.save(folder / f"{i:04d}.jpg", quality=90)
    done.write_text("ok\n")
    return root


def step_throughput(layer: str, dtype: str, batch: int, steps: int) -> dict[str, object]:
    """img/s of forward + backward + Adam under autocast, timed with CUDA syncs at the ends."""
    torch.manual_seed(0)
    model, _ = create_model("resnet18")
    if LAYERS[layer] is not None:
        model, _ = convert_model(model, LAYERS[layer])
    model = model.cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16")
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    bn_dtype: list[torch.dtype] = []
    hook = model.layer1[0].bn1.register_forward_hook(lambda m, i, o: bn_dtype.append(o.dtype))

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=DTYPES[dtype]):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    for _ in range(5):
        step()
    hook.remove()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "layer": layer,
        "dtype": dtype,
        "img_per_s": batch * steps / seconds,
        "bn_dtype": str(bn_dtype[0]).replace("torch.", ""),
        "loss_finite": bool(torch.isfinite(loss)),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def recu(args: list[str], nproc: int = 0, **kw) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "recu_cli"]
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                    str(nproc), "-m", "recu_cli"]  # fmt: skip
    return subprocess.run([*launcher, *args], capture_output=True, text=True, **kw)


def binarize_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["binarize", "resnet18", "--data", str(data), "-o", str(out), "--experiment", name,
            "--recipe", "paper", "--amp", "--channels-last", "--quiet", *extra]  # fmt: skip


def run_throughput(data: Path, out: Path, dtype: str, nproc: int, batch: int, steps: int):
    name = f"torchrun-{dtype}-{nproc}gpu" if nproc else f"run-{dtype}-1gpu"
    proc = recu(
        binarize_args(data, out, name, "--amp-dtype", dtype, "-b", str(batch), "--epochs", "1",
                      "--max-steps", str(steps), "--log-interval", "10"),
        nproc=nproc, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        return {"run": name, "error": proc.stderr.strip().splitlines()[-1:]}
    row = list(csv.DictReader((out / name / "summary.csv").open()))[-1]
    return {"run": name, "img_per_s": float(row["img_per_s"]), "train_loss": row["train_loss"]}


def deterministic_resume(data: Path, out: Path) -> dict[str, object]:
    """Straight vs SIGINT-interrupted-and-resumed, both --deterministic: equal weights?"""
    common = ("-b", "32", "--epochs", "1", "--log-interval", "1", "--deterministic")
    straight = recu(binarize_args(data, out, "det-straight", *common), timeout=900)
    if straight.returncode != 0:
        return {"error": straight.stderr.strip().splitlines()[-1:]}
    args = binarize_args(data, out, "det-broken", *common)
    args.remove("--quiet")  # the log lines tell when to interrupt
    proc = subprocess.Popen([sys.executable, "-m", "recu_cli", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    for line in proc.stderr:
        if re.search(r"epoch 1 step 5/", line):
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=600)
    resumed = recu(["binarize", "--resume", str(out / "det-broken"), "--quiet"], timeout=900)
    if resumed.returncode != 0:
        return {"error": resumed.stderr.strip().splitlines()[-1:]}
    a, b = (
        torch.load(out / n / "resume.pt", map_location="cpu", weights_only=True)["model"]
        for n in ("det-straight", "det-broken")
    )
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    return {"interrupted_at_exit": proc.returncode, "bit_identical": not differing,
            "differing_tensors": differing[:5]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    from recu_cli.devices import default_amp_dtype

    n_gpu = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    report: dict[str, object] = {
        "torch": torch.__version__,
        "gpus": n_gpu,
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "amp_dtype_auto": default_amp_dtype(torch.device("cuda", 0)),
    }
    print(json.dumps(report))
    steps = [
        step_throughput(layer, dtype, a.batch, a.steps) for dtype in DTYPES for layer in LAYERS
    ]
    report["step"] = steps
    print("\n| layer | amp | img/s | vs float | BN dtype | loss finite | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for s in steps:
        base = next(t for t in steps if t["layer"] == "float" and t["dtype"] == s["dtype"])
        print(f"| {s['layer']} | {s['dtype']} | {s['img_per_s']:.0f} | "
              f"{s['img_per_s'] / base['img_per_s']:.2f}x | {s['bn_dtype']} | "
              f"{s['loss_finite']} | {s['peak_mem_gib']:.1f} |")  # fmt: skip
    data = make_images(a.out / "data", classes=10, train_per_class=256, val_per_class=10)
    runs = [run_throughput(data, a.out, dt, 0, a.batch, a.steps) for dt in DTYPES]
    runs.append(run_throughput(data, a.out, report["amp_dtype_auto"], n_gpu, a.batch, a.steps))
    report["runs"] = runs
    print("\n| recu binarize run | img/s |")
    print("|---|---|")
    for r in runs:
        print(f"| {r['run']} | {r.get('img_per_s', r.get('error'))} |")
    report["deterministic_resume"] = deterministic_resume(data, a.out)
    print(f"\ndeterministic resume: {report['deterministic_resume']}")
    (a.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {a.out / 'gpu_check.json'}")
    half = {name: str(dt).replace("torch.", "") for name, dt in DTYPES.items()}
    failed = [s for s in steps if not s["loss_finite"] or s["bn_dtype"] != half[s["dtype"]]]
    failed += [r for r in runs if "error" in r]
    if failed or not report["deterministic_resume"].get("bit_identical"):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    main()
