"""Issue 25's data paths on a GPU, measured in one run (parts a, b, c below).

Each part runs in its own process with a hard timeout and is printed as it finishes; all
of it goes to OUT/gpu_data.json (OUT holds JSON only; runs, the decoded-data cache and the
JPEG tree go to --work, a temp dir by default).

  a  cifar:   `recu binarize resnet20 --weights W --data CIFAR --epochs 6` (the default
              recipe, --data-path auto, a fresh decoded-data cache): the wall time of the 6
              epochs (first epoch start to last epoch line, validation included), seconds
              and val top-1 per epoch, the data path it chose and why.
  b  jpeg:    `recu binarize resnet18 --recipe paper --amp --channels-last` on a generated
              tree of 256 px JPEGs (bench/gpu_check.py's make_images, hard-linked to N
              images): end-to-end training img/s per epoch (summary.csv).
  c  loaders: img/s of each path's training loader alone, batches on the device, built by
              training/parts.build_loaders as a run builds them: CIFAR-10 train with
              `pil-main` (PIL workers as before this issue, torch.manual_seed per image),
              `pil`, `resident`; the JPEG tree with `pil` and `gpu-decode`.

    python bench/gpu_data.py OUT --cifar DIR --weights FILE              # on the GPU
    python bench/gpu_data.py OUT --cifar DIR --weights FILE --dry-run    # tiny, on the CPU
    python bench/gpu_data.py OUT --cifar DIR --device cpu --parts c      # loaders on the CPU

On the GPU machine (about 3-4 minutes of device time): unpack the data as docs/gpu.md says,
then `PYTHONPATH=$PWD python3 bench/gpu_data.py $OUT --cifar /tmp/data/cifar10 --weights
/tmp/data/weights/resnet20-12fca82f.th`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TIMEOUTS = {"a": 300, "b": 240, "c": 240}


# ---------------------------------------------------------------- helpers


def recu_env(work: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RECU_CACHE": str(work / "cache")}
    env.setdefault("OMP_NUM_THREADS", "4")
    return env


def run_logged(args: list[str], work: Path, timeout: float) -> tuple[int, list[tuple[float, str]]]:
    """Run `python -m recu_cli ARGS`; (exit code, [(seconds since start, stderr line)])."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "recu_cli", *args], stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL, text=True, env=recu_env(work), cwd=REPO,
    )  # fmt: skip
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append((time.monotonic() - start, line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = -9
    reader.join(timeout=5)
    return code, lines


def summary(run: Path) -> list[dict[str, str]]:
    path = run / "summary.csv"
    return list(csv.DictReader(path.open())) if path.is_file() else []


def data_line(lines: list[tuple[float, str]]) -> str | None:
    return next((text for _, text in lines if text.startswith("data: ")), None)


def failure(code: int, lines: list[tuple[float, str]]) -> dict[str, Any]:
    tail = [text for _, text in lines if text.strip()][-3:]
    return {"error": "timed out" if code == -9 else f"exit {code}", "stderr_tail": tail}


# ---------------------------------------------------------------- a: CIFAR-10, 6 epochs


def part_a(a: argparse.Namespace) -> dict[str, Any]:
    runs = a.runs
    args = [
        "binarize", "resnet20", "--weights", str(a.weights), "--data", str(a.cifar),
        "--epochs", "6", "-o", str(runs), "--experiment", "cifar-6ep",
    ]  # fmt: skip
    if a.dry_run:
        args = [*args[:6], "--epochs", "1", "--max-steps", "1", "-b", "16", "-o", str(runs),
                "--experiment", "cifar-dry", "-j", "0", "--no-step0-eval"]  # fmt: skip
    args += ["--device", a.device] if a.device else []
    code, lines = run_logged(args, a.work, TIMEOUTS["a"])
    if code != 0:
        return failure(code, lines)
    t_start = next((t for t, text in lines if text.startswith("step 0:")), 0.0)
    ends = [(t, text) for t, text in lines if re.match(r"epoch \d+/\d+: ", text)]
    rows = summary(runs / args[args.index("--experiment") + 1])
    config = json.loads((runs / args[args.index("--experiment") + 1] / "config.json").read_text())
    return {
        "command": "recu " + " ".join(args),
        "data_line": data_line(lines),
        "data_path": config.get("data_path"),
        "process_wall_s": lines[-1][0] if lines else None,
        "epochs_wall_s": (ends[-1][0] - t_start) if ends else None,
        "epoch_seconds": [float(r["seconds"]) for r in rows],
        "epoch_img_per_s": [float(r["img_per_s"]) for r in rows],
        "val_top1": [float(r["val_top1"]) for r in rows],
        "skipped_images": [int(r["skipped_images"]) for r in rows],
        "log_tail": [text for _, text in lines[-12:]],
    }


# ---------------------------------------------------------------- b: resnet18 on JPEGs


def jpeg_tree(root: Path, train: int, val: int, classes: int) -> Path:
    """`classes` folders of 256 px JPEGs: 10 % of them made by gpu_check.make_images, the
    rest hard links to those (decoding costs the same; making them would not)."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import make_images

    done = root / ".complete"
    if done.is_file():
        return root
    source = make_images(root.parent / f"{root.name}-made", 1, max(2, train // 10), max(1, val))
    for split, n in (("train", train), ("val", val)):
        files = sorted((source / split / "class00").glob("*.jpg"))
        for k in range(n):
            folder = root / split / f"class{k % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{k:06d}.jpg"
            if not target.exists():
                os.link(files[k % len(files)], target)
    done.write_text("ok\n")
    return root


def jpeg_sizes(a: argparse.Namespace) -> tuple[int, int]:
    return (16, 2) if a.dry_run else (a.jpeg_images, 200)


def part_b(a: argparse.Namespace) -> dict[str, Any]:
    train, val = jpeg_sizes(a)
    start = time.monotonic()
    tree = jpeg_tree(a.work / "jpeg", train, val, 2 if a.dry_run else 10)
    made_s = time.monotonic() - start
    runs = a.runs
    args = ["binarize", "resnet18", "--data", str(tree), "-o", str(runs), "--experiment",
            "jpeg-r18", "--recipe", "paper", "--no-step0-eval", "--log-interval", "0"]  # fmt: skip
    if a.dry_run:
        args += ["-b", "4", "--epochs", "1", "--max-steps", "1", "-j", "1",
                 "--data-path", "gpu-decode"]  # fmt: skip
    else:
        args += ["--amp", "--channels-last", "-b", "128", "--epochs", str(a.jpeg_epochs)]
    args += ["--device", a.device] if a.device else []
    code, lines = run_logged(args, a.work, TIMEOUTS["b"] - made_s)
    if code != 0:
        return {**failure(code, lines), "tree_seconds": made_s}
    rows = summary(runs / "jpeg-r18")
    rates = [float(r["img_per_s"]) for r in rows]
    return {
        "command": "recu " + " ".join(args),
        "images": {"train": train, "val": val},
        "tree_seconds": made_s,
        "data_line": data_line(lines),
        "epoch_img_per_s": rates,
        "best_img_per_s": max(rates) if rates else None,
        "epoch_seconds": [float(r["seconds"]) for r in rows],
        "log_tail": [text for _, text in lines[-12:]],
    }


# ---------------------------------------------------------------- c: loaders alone


class MainSeededItems:
    """training/sampling.SeededItems as main had it before this issue (torch.manual_seed
    and fork_rng per image): the `pil-main` row."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed, self.n = dataset, seed, len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int):
        import torch

        epoch, i = divmod(int(j), self.n)
        item_seed = (self.seed * 1_000_003 + epoch * 7_919 * self.n + i) % (2**63 - 1)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            try:
                return self.dataset[i]
            finally:
                random.setstate(py_state)


def loader_rate(
    model: str, data: str, path: str, device: str, seconds: float, max_batches: int,
    batch: int, workers: int | None,
) -> dict[str, Any]:  # fmt: skip
    """img/s of the training loader of `path` (batches moved to the device, synced)."""
    import torch

    from recu_cli.data import build_data
    from recu_cli.models import create_model
    from recu_cli.training import parts
    from recu_cli.training.config import TrainConfig
    from recu_cli.training.distributed import DistInfo

    dev = torch.device(device)
    _, spec = create_model(model)
    bundle = build_data(data, spec, train=True)
    cfg = TrainConfig(model=model, data=data, batch_size=batch, workers=workers,
                      data_path="pil" if path == "pil-main" else path)  # fmt: skip
    seeded = parts.SeededItems
    if path == "pil-main":
        parts.SeededItems = MainSeededItems
    lines: list[str] = []
    start = time.perf_counter()
    try:
        sampler, train, _, choice = parts.build_loaders(cfg, DistInfo(), dev, bundle, spec,
                                                        lambda m, **k: lines.append(m))  # fmt: skip
    finally:
        parts.SeededItems = seeded
    setup = time.perf_counter() - start
    sampler.set_epoch(0)
    images = 0
    it = iter(train)
    first = time.perf_counter()
    for _ in range(2):  # warm-up: workers started, cuDNN/nvJPEG initialised
        next(it)
    warm = time.perf_counter() - first
    t0 = time.perf_counter()
    for n_batches, batch_ in enumerate(it, start=1):
        images += batch_[0].to(dev, non_blocking=True).shape[0]
        if n_batches >= max_batches or time.perf_counter() - t0 > seconds:
            break
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - t0
    close = getattr(train, "close", None)
    if close is not None:
        close()
    return {
        "model": model, "path": choice.path, "row": path, "img_per_s": images / elapsed,
        "images": images, "setup_s": setup, "warmup_s": warm, "workers": cfg.workers,
        "data_line": choice.line, "notes": lines,
    }  # fmt: skip


def part_c(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seconds, max_batches = (0.5, 2) if a.dry_run else (a.loader_seconds, 10_000)
    workers = 0 if a.dry_run else a.workers
    rows = []
    jobs = []
    if a.cifar:
        jobs += [("resnet20", str(a.cifar), p) for p in ("pil-main", "pil", "resident")]
    if not a.cifar_only:
        tree = jpeg_tree(a.work / "jpeg", *jpeg_sizes(a), 2 if a.dry_run else 10)
        jobs += [("resnet18", str(tree), p) for p in ("pil", "gpu-decode")]
    for model, data, path in jobs:
        try:
            row = loader_rate(model, data, path, device, seconds, max_batches,
                              4 if a.dry_run else 128, workers)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - one path failing must not hide the others
            row = {"model": model, "row": path, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(f"  loader {model} {path}: " + (f"{row['img_per_s']:,.0f} img/s"
              if "img_per_s" in row else row["error"]), flush=True)  # fmt: skip
    return {"device": device, "rows": rows}


PARTS = {"a": part_a, "b": part_b, "c": part_c}


# ---------------------------------------------------------------- driver


def environment() -> dict[str, Any]:
    import torch
    import torchvision

    env: dict[str, Any] = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                           "cpus": os.cpu_count()}  # fmt: skip
    if torch.cuda.is_available():
        from recu_cli.fastdata.jpeg import probe_gpu_decode

        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_jpeg_decode"] = probe_gpu_decode(torch.device("cuda", 0)) or "works"
    return env


def child(a: argparse.Namespace) -> None:
    """One part, in this process: its result as OUT/part-<name>.json."""
    result = PARTS[a.child](a)
    (a.out / f"part-{a.child}.json").write_text(json.dumps(result, indent=2))


def table(report: dict[str, Any]) -> str:
    out = ["| part | result |", "|---|---|"]
    pa = report.get("a", {})
    if "epochs_wall_s" in pa:
        epochs = ", ".join(f"{s:.1f}" for s in pa["epoch_seconds"])
        path = (pa.get("data_path") or {}).get("path")
        out.append(
            f"| a: resnet20 CIFAR-10, {len(pa['epoch_seconds'])} epochs | "
            f"{pa['epochs_wall_s']:.1f} s wall (epochs {epochs} s), val top-1 "
            f"{pa['val_top1'][-1]:.2f} %, data path {path} |"
        )
    elif pa:
        out.append(f"| a | {pa.get('error')} |")
    pb = report.get("b", {})
    if pb.get("best_img_per_s"):
        epochs = ", ".join(f"{r:,.0f}" for r in pb["epoch_img_per_s"])
        out.append(
            f"| b: resnet18 224 px JPEGs end to end | {pb['best_img_per_s']:,.0f} img/s "
            f"(epochs {epochs}) |"
        )
    elif pb:
        out.append(f"| b | {pb.get('error')} |")
    for row in report.get("c", {}).get("rows", []):
        rate = f"{row['img_per_s']:,.0f} img/s" if "img_per_s" in row else row.get("error")
        out.append(f"| c: loader {row['model']} {row['row']} | {rate} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--cifar", type=Path, help="CIFAR-10 folder with train/ and val/")
    p.add_argument("--weights", type=Path, help="resnet20-12fca82f.th (part a)")
    p.add_argument("--device", default=None, help="default: cuda when present")
    p.add_argument("--parts", default="abc", help="which parts, e.g. 'ac'")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (for tests)")
    p.add_argument("--jpeg-images", type=int, default=5000, help="training JPEGs of part b")
    p.add_argument("--jpeg-epochs", type=int, default=3)
    p.add_argument("--loader-seconds", type=float, default=6.0)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: recu's)")
    p.add_argument("--cifar-only", action="store_true", help="part c: CIFAR loaders only")
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch: runs, decoded-data cache, JPEG tree (default: a temp dir)",
    )
    p.add_argument("--runs", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=sorted(PARTS), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.dry_run:
        a.device = "cpu"
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.work is None:  # OUT keeps the JSON only (a GPU machine's OUT travels back)
        a.work = Path(tempfile.mkdtemp(prefix="recu-gpu-data-"))
        sys.argv += ["--work", str(a.work)]
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.runs is None:  # this invocation's run folders (the JPEG tree and cache are reused)
        a.runs = a.work / f"runs-{os.getpid()}"
        sys.argv += ["--runs", str(a.runs)]
    if a.child:
        child(a)
        return
    report: dict[str, Any] = {"environment": environment()}
    print(json.dumps(report["environment"]), flush=True)
    for name in a.parts:
        if name == "a" and (a.cifar is None or a.weights is None):
            report[name] = {"error": "part a needs --cifar and --weights"}
            continue
        start = time.monotonic()
        argv = [sys.executable, __file__, *sys.argv[1:], "--child", name]
        try:
            proc = subprocess.run(argv, timeout=TIMEOUTS[name] + 30, capture_output=True,
                                  text=True, env=recu_env(a.work), cwd=REPO)  # fmt: skip
            sys.stdout.write(proc.stdout)
            path = a.out / f"part-{name}.json"
            if proc.returncode == 0 and path.is_file():
                report[name] = json.loads(path.read_text())
            else:
                report[name] = {"error": f"exit {proc.returncode}",
                                "stderr_tail": proc.stderr.strip().splitlines()[-5:]}  # fmt: skip
        except subprocess.TimeoutExpired:
            report[name] = {"error": f"timed out after {TIMEOUTS[name] + 30} s"}
        report[name]["part_seconds"] = time.monotonic() - start
        print(f"part {name} ({report[name]['part_seconds']:.0f} s): "
              f"{json.dumps(report[name])[:1500]}", flush=True)  # fmt: skip
        (a.out / "gpu_data.json").write_text(json.dumps(report, indent=2))
    print("\n" + table(report))
    print(f"\nwritten: {a.out / 'gpu_data.json'}")
    if any("error" in report.get(n, {}) for n in a.parts):
        sys.exit(1)


if __name__ == "__main__":
    main()
