"""`recu bench --peers`: what an x86 user would deploy instead of recu's BNN, timed side by side.

Same process, same input tensor, same timing method as `recu bench` (runtime.benchmark.measure:
median and IQR of blocked_autorange replicates at a fixed thread count). Peers run the float
original model (PyTorch, ONNX Runtime and OpenVINO, fp32 and int8); recu's engines run the BNN.
A peer whose package is missing is reported as skipped with the install hint, never an error.

Public: KEYS, INSTALL_HINT, run_peers(models, ...) -> dict (the --json report's peer part).
"""

from __future__ import annotations

import copy
import importlib
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from recu_cli.peers.families import (
    Context,
    Entry,
    onnxruntime_family,
    openvino_family,
    recu_family,
    torch_family,
)
from recu_cli.peers.source import Models

INSTALL_HINT = 'pip install -e ".[peers]"'
BASELINE = "openvino_int8"  # what recu's entries are compared with
RECU_KEYS = ("recu_xnor", "recu_int8")
CALIB_IMAGES = 16


@dataclass(frozen=True)
class Family:
    """A peer family: its keys, the Python modules each key needs, and its builder."""

    name: str
    needs: dict[str, tuple[str, ...]]
    build: Callable[[Context, set[str]], dict[str, Entry]]


# The registry, in table order. Add a peer by adding a family (families.py) here.
FAMILIES = (
    Family("pytorch", {"torch_fp32": (), "torch_fp32_nhwc": ()}, torch_family),
    Family(
        "onnxruntime",
        {"ort_fp32": ("onnx", "onnxruntime"), "ort_int8": ("onnx", "onnxruntime")},
        onnxruntime_family,
    ),
    Family(
        "openvino",
        {"openvino_fp32": ("onnx", "openvino"), "openvino_int8": ("onnx", "openvino", "nncf")},
        openvino_family,
    ),
    Family("recu", {"recu_xnor": (), "recu_int8": ()}, recu_family),
)
KEYS = tuple(k for f in FAMILIES for k in f.needs)


def _importable(module: str) -> bool:
    """Imports (quietly: nncf pulls in torch.utils.cpp_extension and its CUDA warning)."""
    from recu_cli.peers.families import silenced
    from recu_cli.runtime.ext import quiet_cpp_extension_log

    try:
        with quiet_cpp_extension_log(), silenced():
            importlib.import_module(module)
    except Exception:  # noqa: BLE001 - ImportError, or a broken install: missing either way
        return False
    return True


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _rel_diff(out: object, ref: torch.Tensor) -> float:
    o = torch.as_tensor(out).float().reshape(ref.shape)
    return float((o - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _build(ctx: Context, engine_status: dict[str, tuple[bool, str]]) -> tuple[dict, dict]:
    """(key -> Entry, key -> skip reason) over the registry."""
    entries: dict[str, Entry] = {}
    skipped: dict[str, str] = {}
    for fam in FAMILIES:
        keys = set()
        for key, mods in fam.needs.items():
            missing = [m for m in mods if not _importable(m)]
            if missing:
                skipped[key] = f"{', '.join(missing)} not installed; {INSTALL_HINT}"
            elif key in RECU_KEYS and key[5:] not in ctx.engines:
                ok, why = engine_status.get(key[5:], (False, "not chosen with --engine"))
                skipped[key] = why if not ok else "not chosen with --engine"
            else:
                keys.add(key)
        if not keys:
            continue
        try:
            entries.update(fam.build(ctx, keys))
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
            for key in keys:
                skipped[key] = f"{fam.name} failed: {_one_line(e)}"
    return entries, skipped


@torch.no_grad()
def run_peers(
    models: Models,
    engines: list[str],
    engine_status: dict[str, tuple[bool, str]],
    threads: list[int],
    batches: list[int],
    *,
    data: str | None = None,
    min_time: float = 0.2,
    min_runs: int = 10,
    seed: int = 0,
    channels_last: bool = False,
    runtime_options: dict | None = None,
    rounds: int = 3,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    """Time every available entry at every (threads, batch); the report (see docs/performance.md).

    Each setting's "ms" and "iqr_ms" hold every key of KEYS (None when skipped);
    "speedup_vs_openvino_int8" is OpenVINO int8 ms / recu ms for recu's entries.
    channels_last and runtime_options (more keyword arguments) go to runtime.to_runtime for
    recu's entries; the peers' layouts are fixed by their keys. rounds: each entry is
    timed once per round, round after round over all entries, and keeps its best median.
    """
    from recu_cli.data import spread_inputs
    from recu_cli.runtime.benchmark import measure

    input_size = tuple(models.spec.input_size)
    calib, calib_note = spread_inputs(data, models.spec, CALIB_IMAGES, seed)
    float_model = copy.deepcopy(models.float_model).cpu().eval()
    deploy = copy.deepcopy(models.deploy).cpu().eval()
    deploy_ref = deploy.to(memory_format=torch.channels_last) if channels_last else deploy
    settings = []
    with tempfile.TemporaryDirectory(prefix="recu-peers-") as tmp:
        ctx = Context(
            float_model, deploy, input_size, calib, Path(tmp), engines, channels_last,
            dict(runtime_options or {}),
        )  # fmt: skip
        entries, skipped = _build(ctx, engine_status)
        for th in threads:
            for b in batches:
                x = torch.randn(b, *input_size, generator=torch.Generator().manual_seed(seed))
                refs = {"float": float_model(x), "deploy": deploy_ref(x)}
                ms: dict[str, float | None] = dict.fromkeys(KEYS)
                iqr: dict[str, float | None] = dict.fromkeys(KEYS)
                diff: dict[str, float | None] = dict.fromkeys(KEYS)
                calls = {}
                for key in KEYS:
                    if key not in entries:
                        continue
                    entry = entries[key]
                    try:
                        calls[key] = entry.make(th, b, x)
                        diff[key] = _rel_diff(calls[key](), refs[entry.reference])
                    except Exception as e:  # noqa: BLE001 - reported, the others still run
                        skipped[key] = f"failed at threads={th} batch={b}: {_one_line(e)}"
                        del entries[key]
                        calls.pop(key, None)
                # rounds over all entries, each entry's best round: on a shared machine a
                # slow spell then hits one round of one entry, not an entry's only number
                for _ in range(rounds):
                    for key, call in calls.items():
                        t = measure(call, th, min_time, min_runs)
                        if ms[key] is None or t.median_ms < ms[key]:
                            ms[key], iqr[key] = t.median_ms, t.iqr_ms
                        if on_step:
                            on_step(f"threads={th} batch={b}: {key} {t.median_ms:.3f} ms")
                base = ms.get(BASELINE)
                speedup = {
                    k: (base / ms[k] if base and ms[k] and math.isfinite(base) else None)
                    for k in RECU_KEYS
                }
                settings.append({
                    "threads": th, "batch": b, "ms": ms, "iqr_ms": iqr,
                    "speedup_vs_openvino_int8": speedup, "max_rel_diff": diff,
                })  # fmt: skip
    labels = {k: e.label for k, e in entries.items()}
    return {
        "keys": list(KEYS),
        "entries": {
            k: {
                "available": k in labels,
                "detail": labels.get(k, skipped.get(k, "")),
                "reference": "deploy" if k in RECU_KEYS else "float",
            }
            for k in KEYS
        },
        "skipped": {k: skipped[k] for k in KEYS if k in skipped},
        "recu_layout": "NHWC" if channels_last else "NCHW",
        "calibration": calib_note,
        "rounds": rounds,
        "float_weights": models.weights_note,
        "settings": settings,
    }
