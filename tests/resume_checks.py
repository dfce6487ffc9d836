"""What proves that `--resume` continued a run instead of training it again.

Training is deterministic, so a resume that ignored resume.pt and retrained from the start
would give the same weights as the uninterrupted run: equal weights alone prove nothing.
A resumed process must also have started from the saved position, taken only the steps
that were left, and not repeated step 0 (calibration); `recu binarize` reports the first
two (`resumed_from`, `steps_run` in --json, and the `done:` line of train.log).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

DONE = re.compile(
    r"done: .*; this process ran (\d+) steps"
    r"(?: from epoch (\d+) step (\d+) \(global step (\d+)\))?$"
)


def saved_position(run: Path) -> dict[str, int]:
    """The position in run/resume.pt, as `resumed_from` words it (epoch counted from 1).
    Read it before resuming: the resume overwrites the file."""
    pos = torch.load(run / "resume.pt", map_location="cpu", weights_only=True)["position"]
    return {
        "epoch": pos["epoch"] + 1,
        "step_in_epoch": pos["step_in_epoch"],
        "global_step": pos["global_step"],
    }


def last_done(run: Path) -> tuple[int, dict[str, int] | None]:
    """(steps run, resumed from) of the last `done:` line of run/train.log."""
    lines = [ln for ln in (run / "train.log").read_text().splitlines() if " done: " in ln]
    assert lines, "train.log has no done line"
    m = DONE.search(lines[-1])
    assert m, lines[-1]
    start = None
    if m.group(2) is not None:
        start = {
            "epoch": int(m.group(2)),
            "step_in_epoch": int(m.group(3)),
            "global_step": int(m.group(4)),
        }
    return int(m.group(1)), start


def assert_fresh_run(run: Path, total_steps: int, result: dict[str, Any] | None = None) -> None:
    """An uninterrupted run: every step in one process, from the start."""
    assert last_done(run) == (total_steps, None)
    if result is not None:
        assert result["resumed_from"] is None and result["steps_run"] == total_steps


def assert_continued(
    run: Path, saved: dict[str, int], total_steps: int, result: dict[str, Any] | None = None
) -> None:
    """The last process in `run` resumed at `saved` (taken after at least one step), ran the
    remaining steps only, and step 0 ran once in the folder's life (the first process)."""
    assert saved["global_step"] > 0, f"the interruption came before any step: {saved}"
    left = total_steps - saved["global_step"]
    assert last_done(run) == (left, saved)
    if result is not None:
        assert result["resumed_from"] == saved and result["steps_run"] == left
    log = (run / "train.log").read_text()
    assert log.count(" step 0: ") == 1, "step 0 ran again on resume"
    resumed = f"at epoch {saved['epoch']}, step {saved['step_in_epoch']} "
    assert f"resuming {run} {resumed}(global step {saved['global_step']})" in log
