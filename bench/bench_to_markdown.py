"""Turn `recu bench ... --json` output into the markdown tables of docs/performance.md.

recu bench resnet18 --json > r18.json && python bench/bench_to_markdown.py r18.json
"""

from __future__ import annotations

import json
import sys


def _ms(t: dict) -> str:
    return f"{t['median_ms']:.2f} ± {t['iqr_ms']:.2f}"


def render(report: dict) -> str:
    env = report["env"]
    layout = "NHWC" if report.get("channels_last") else "NCHW"
    lines = [
        f"`{report['model']}`, input {tuple(report['input_size'])}, {layout}; {env['cpu_model']}, "
        f"torch {env['torch']} ({env['cpu_capability']}), xnor kernels {env['xnor_isa']}, "
        f"load average at the end {[round(v, 2) for v in env['load_average'] or []]}",
        "",
        "| engine | threads | batch | binary layers fp32 ms | engine ms | speed-up "
        "| end to end fp32 ms | engine ms | speed-up | bit exact | same logits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['engine']} | {r['threads']} | {r['batch']} "
            f"| {r['float32_binary_layers_ms']:.2f} | {r['binary_layers_ms']:.2f} "
            f"| **{r['binary_layers_speedup']:.2f}x** | {_ms(r['float32_end_to_end'])} "
            f"| {_ms(r['end_to_end'])} | **{r['end_to_end_speedup']:.2f}x** "
            f"| {'yes' if r['bit_exact'] else 'NO'} | {'yes' if r['identical_outputs'] else 'no'} |"
        )
    return "\n".join(lines)


def render_layers(report: dict, threads: int, batch: int) -> str:
    """Per-layer table of one setting."""
    for s in report["settings"]:
        if s["threads"] == threads and s["batch"] == batch:
            engines = [r["engine"] for r in s["engines"]]
            head = "| layer | shape | fp32 ms | " + " | ".join(f"{e} ms (x)" for e in engines)
            lines = [head + " |", "|---|---|---:|" + "---:|" * len(engines)]
            for row in s["layers"]:
                f = row["float32"]["median_ms"]
                times = [row["engines"][e]["median_ms"] for e in engines]
                cells = [f"{t:.3f} ({f / t:.1f}x)" for t in times]
                lines.append(
                    f"| {row['name']} | {row['shape']} | {f:.3f} | " + " | ".join(cells) + " |"
                )
            return "\n".join(lines)
    return ""


def main(argv: list[str]) -> int:
    for path in argv:
        with open(path) as f:
            report = json.load(f)
        print(render(report))
        print()
        print(render_layers(report, 1, 1))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
