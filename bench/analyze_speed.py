"""How long `recu analyze` (and `recu info`) take on a packed timm resnet50.

Target (issue 4): `recu analyze FILE` answers in under 5 s, end to end. Run from the repo
root with the venv active:

    python bench/analyze_speed.py [--repeat 3] [--keep DIR]

It writes a packed resnet50 (1000 classes, random init, tau 0.85; the statistics cost the
same as for trained weights) unless DIR already holds one, then times, best of --repeat:
the CLI start-up alone (`import recu_cli.cli`), `recu analyze`, `recu analyze --json`,
`recu analyze --plot`, `recu info`, each as a fresh process, and the in-process analysis
without the imports.
"""

from __future__ import annotations

import argparse
import io
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _wall(cmd: list[str], repeat: int) -> tuple[float, float]:
    """Best wall time and best CPU time (user + sys) of `repeat` fresh processes.

    CPU time is the steadier number on a shared machine; wall time is what users feel.
    """
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        best = min(best, time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        best_cpu = min(best_cpu, cpu)
    return best, best_cpu


def _packed_resnet50(folder: Path) -> Path:
    path = folder / "resnet50-packed.safetensors"
    if path.exists():
        return path
    import torch

    from recu_cli.bnn import convert_model
    from recu_cli.convert_config import ConvertConfig
    from recu_cli.models import create_model
    from recu_cli.pack import save
    from recu_cli.stats import model_stats

    torch.manual_seed(0)
    config = ConvertConfig(tau=0.85)
    model, spec = create_model("resnet50", num_classes=1000)
    model, _ = convert_model(model, config)
    save(path, model, spec, config, stats=model_stats(model))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="folder to keep the packed file in")
    args = ap.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="recu-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = _packed_resnet50(folder)
    py = [sys.executable]
    recu = [*py, "-m", "recu_cli"]
    rows = [
        (
            "start-up only (import recu_cli.cli)",
            _wall([*py, "-c", "import recu_cli.cli"], args.repeat),
        ),
        ("recu analyze FILE", _wall([*recu, "analyze", str(path)], args.repeat)),
        ("recu analyze FILE --json", _wall([*recu, "analyze", str(path), "--json"], args.repeat)),
        (
            "recu analyze FILE --plot out.png",
            _wall([*recu, "analyze", str(path), "--plot", str(folder / "r50.png")], args.repeat),
        ),
        ("recu info FILE", _wall([*recu, "info", str(path)], args.repeat)),
    ]
    from rich.console import Console

    from recu_cli.report.analysis import analyze, render_analysis

    best, best_cpu = float("inf"), float("inf")
    for _ in range(args.repeat):
        t, c = time.perf_counter(), time.process_time()
        render_analysis(Console(file=io.StringIO(), width=120), analyze(path))
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    rows.append(("in-process analyze + render (no imports)", (best, best_cpu)))
    print(f"packed resnet50: {path} ({path.stat().st_size:,} bytes), best of {args.repeat}")
    print(f"{'':45s} {'wall':>8s} {'cpu':>8s}")
    for name, (wall, cpu) in rows:
        print(f"{name:45s} {wall:7.2f}s {cpu:7.2f}s")


if __name__ == "__main__":
    main()
