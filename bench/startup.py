"""Start-up time of the CLI next to `import torch`, in one run (issue 10).

Targets on the project's 2-core machine, idle: `recu --version`, `recu --help` and
`recu binarize --help` in 0.3 s; `recu info FILE` in 1.0 s (torch alone takes about 1 s
to import there). On a loaded machine every number grows, so read them against the
`import torch` row of the same run. Run from the repo root:

    python bench/startup.py [--repeat 7] [--module]

The CLI runs as the console script `recu` when it is on PATH (what users run), else (or
with --module) as `python -m recu_cli`; the first line says which. `info` reads a small
packed file written on the fly by this recu (so it carries the module records that let
`info` run without torch): a CIFAR ResNet-20 converted with recu's own API, in a temp dir.
Besides the median wall time it prints the median CPU time (user + sys), steadier when
other work shares the machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_packed(folder: Path) -> Path:
    """A packed ResNet-20 (random init: `info` costs the same as for trained weights)."""
    from recu_cli.bnn import convert_model
    from recu_cli.convert_config import ConvertConfig
    from recu_cli.models import create_model
    from recu_cli.pack import save
    from recu_cli.stats import model_stats

    net, spec = create_model("resnet20")
    config = ConvertConfig()
    net, _ = convert_model(net, config)
    path = folder / "resnet20.safetensors"
    save(path, net, spec, config, stats=model_stats(net))
    return path


def median_wall(cmd: list[str], repeat: int) -> tuple[float, float]:
    """Median wall time and median CPU time (user + sys) of `repeat` fresh processes,
    after one untimed warm-up run (which fills the OS file cache, as on any second start).
    CPU time is the steadier number on a shared machine; wall time is what users feel."""
    times, cpus = [], []
    for i in range(repeat + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i:
            times.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(times), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per command")
    parser.add_argument("--module", action="store_true", help="run `python -m recu_cli`")
    args = parser.parse_args()
    script = None if args.module else shutil.which("recu")
    recu = [script] if script else [sys.executable, "-m", "recu_cli"]
    print(f"CLI as: {' '.join(recu)}; load average {os.getloadavg()[0]:.2f}; "
          f"median of {args.repeat} runs")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        packed = make_packed(Path(tmp))
        rows = [
            ("python -c 'import torch'", [sys.executable, "-c", "import torch"], None),
            ("recu --version", [*recu, "--version"], 0.3),
            ("recu --help", [*recu, "--help"], 0.3),
            ("recu binarize --help", [*recu, "binarize", "--help"], 0.3),
            ("recu info FILE", [*recu, "info", str(packed)], 1.0),
        ]
        results = [(label, *median_wall(cmd, args.repeat), target) for label, cmd, target in rows]
    torch_s = results[0][1]
    print(f"{'command':<28}{'median s':>10}{'cpu s':>8}{'x torch':>9}{'target s':>10}  result")
    for label, seconds, cpu, target in results:
        verdict = "-" if target is None else ("pass" if seconds <= target else "FAIL")
        goal = "-" if target is None else f"{target:.1f}"
        print(
            f"{label:<28}{seconds:>10.3f}{cpu:>8.3f}{seconds / torch_s:>9.2f}{goal:>10}  {verdict}"
        )


if __name__ == "__main__":
    main()
