"""Turn `recu bench ... --peers --json` output into the peer table of docs/performance.md.

recu bench resnet18 --peers --threads 1,2 --batch 1,16 --json > r18_peers.json
python bench/peers_to_markdown.py r18_peers.json [more.json ...]

One table per file: a row per entry, per (threads, batch) its median ms and the speed-up
against OpenVINO int8 (OpenVINO int8 ms / entry ms; below 1x means slower than OpenVINO int8).
"""

from __future__ import annotations

import json
import sys


def _cell(ms: float | None, base: float | None) -> str:
    if ms is None:
        return "skipped"
    return f"{ms:.3f}" + (f" ({base / ms:.2f}x)" if base else "")


def render(report: dict) -> str:
    env, p = report["env"], report["peers"]
    load = [round(v, 2) for v in env["load_average"] or []]
    head = " | ".join(f"thr {s['threads']}, batch {s['batch']}" for s in p["settings"])
    lines = [
        f"`{report['model']}`, input {tuple(report['input_size'])}; {env['cpu_model']} "
        f"({env['cpu_count']} CPUs), torch {env['torch']} ({env['cpu_capability']}); "
        f"recu engines in {p['recu_layout']}; int8 peers calibrated on {p['calibration']}; "
        f"load average at the end {load}",
        "",
        f"| entry | key | {head} |",
        "|---|---|" + "---:|" * len(p["settings"]),
    ]
    for key in p["keys"]:
        info = p["entries"][key]
        label = info["detail"] if info["available"] else f"skipped: {info['detail']}"
        cells = " | ".join(_cell(s["ms"][key], s["ms"]["openvino_int8"]) for s in p["settings"])
        lines.append(f"| {label} | `{key}` | {cells} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as f:
            print(render(json.load(f)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
