"""Try a stage-2 lever without training stage 1 again: fork a run at its stage switch.

Stage 1 of a two-stage run reads none of the stage-2 levers (--stage2-lr-scale,
--tau-update, --tau-max, --stage2-short-cycles, --switch-moments, --binarize-ramp,
--stage2-feature-kd-scale), so a
copy of a run folder whose resume.pt holds the end of stage 1, with such a lever changed
in its config.json and continued with `recu binarize --resume`, trains what a fresh run
with that flag trains, for half the time. `recu binarize --resume` itself refuses the
change (a resumed run continues exactly): this is for experiments, and the copy says so
in its train.log. Check the equivalence once per setup: a fork with the source's own
values repeats the source run's stage 2 to the digit (results.md, the ninth round).

    python bench/fork_stage2.py output/full/resnet20-finetune-s42 output/fork/tau-step-s42 \
        tau_update='"step"'          # then: recu binarize --resume output/fork/tau-step-s42

Every lever not named keeps the source's value: fork from a run of the setting you compare
with, or name its stage-2 levers too (the ninth round's first tau forks came from a
`--stage2-lr-scale 0.5` run and measured tau on top of it).

The source must be copied while its resume.pt is still the one written at the switch (the
run writes it at each epoch's end and again every --checkpoint-interval): between the end
of its last stage-1 epoch and the next interval. The script refuses any other point.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from recu_cli.training.run_folder import read_position

# levers that only stage 2 reads: a fork may change these and nothing else
STAGE2_ONLY = {
    "stage2_lr_scale",
    "stage2_short_cycles",
    "switch_moments",
    "binarize_ramp",
    "tau_update",
    "tau_max",
    "stage2_feature_kd_scale",
}


def check_at_switch(run: Path) -> None:
    """Refuse a run whose resume.pt does not stand exactly at its switch (epoch
    `stage1_epochs`, its first step; not a point saved inside stage 2)."""
    cfg = json.loads((run / "config.json").read_text())["train"]
    pos = read_position(run)
    switch = cfg["stage1_epochs"]
    if not switch or (pos.epoch, pos.step_in_epoch) != (switch, 0):
        raise SystemExit(
            f"{run}/resume.pt stands {pos.epoch} epochs and {pos.step_in_epoch} steps "
            f"in, not at the switch after a stage 1 of {switch} epochs: copy the run there"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="run folder whose resume.pt ends stage 1")
    ap.add_argument("fork", type=Path, help="new run folder")
    ap.add_argument("changes", nargs="+", help="KEY=JSON, e.g. tau_update='\"step\"'")
    args = ap.parse_args()
    check_at_switch(args.source)
    changes = {}
    for item in args.changes:
        key, value = item.split("=", 1)
        if key not in STAGE2_ONLY:
            raise SystemExit(f"{key} is read in stage 1 too; a fork may change {STAGE2_ONLY}")
        changes[key] = json.loads(value)
    shutil.copytree(args.source, args.fork, ignore=shutil.ignore_patterns(".lock", "*.tmp"))
    config = json.loads((args.fork / "config.json").read_text())
    config["train"].update(changes)
    config["train"]["output"] = str(args.fork.parent.resolve())
    config["train"]["experiment"] = args.fork.name
    (args.fork / "config.json").write_text(json.dumps(config, indent=2))
    with open(args.fork / "train.log", "a") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"{stamp} forked from {args.source} at the stage switch (bench/fork_stage2.py): "
                  f"{json.dumps(changes)}\n")  # fmt: skip
    print(f"recu binarize --resume {args.fork}")


if __name__ == "__main__":
    main()
