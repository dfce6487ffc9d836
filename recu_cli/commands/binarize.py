"""`recu binarize`: convert a pretrained model and fine-tune it under the tau schedule."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from recu_cli.app import app, console, print_json
from recu_cli.binarize.tau import TAU_MAX, TAU_MIN
from recu_cli.commands.options import Json, Quiet, setting_parameters, with_settings
from recu_cli.errors import RecuError
from recu_cli.recipes import LEVERS, RECIPE_HELP, describe
from recu_cli.setting import by_param
from recu_cli.training.config import RUN, TrainConfig

ADVICE = (
    RECIPE_HELP + " Both use ReCU's weight path (standardization, clamp, tau "
    f"{TAU_MIN} -> {TAU_MAX} over the binary-weight stage) and Adam with cosine. From "
    "scratch, use the paper's schedule: --recipe paper --opt sgd --lr 0.1 --weight-decay "
    "5e-4 --warmup-epochs 5 --epochs 600 --teacher none. Measurements: docs/results.md."
)


@app.command(epilog=ADVICE)
@with_settings(
    setting_parameters(
        TrainConfig,
        skip=("convert.tau",),  # a run's tau starts at --tau-min
        levers=LEVERS,
        describe=describe,
    ),
    last=("config", "resume", "json_out", "quiet"),
)
def binarize(
    ctx: typer.Context,
    *,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Settings from a file (.json, or .yaml with PyYAML), e.g. a run's "
            "config.json; flags given here override it.",
            rich_help_panel=RUN,
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume", help="Continue the run in this folder exactly.", rich_help_panel=RUN
        ),
    ] = None,
    json_out: Json = False,
    quiet: Quiet = False,
    **settings: Any,
) -> None:
    """Fine-tune MODEL as a ReCU binary network; writes a run folder with packed checkpoints."""
    given = given_params(ctx)
    quiet = quiet or json_out
    from recu_cli.runtime.allocator import keep_freed_memory

    keep_freed_memory()  # a CPU training step allocates dozens of activation-sized tensors
    if resume is not None:
        if settings.get("model") is not None or settings.get("data") is not None:
            raise RecuError(
                "--resume continues a run with its saved settings; drop MODEL and --data"
            )
        trainer = _resumed(resume, given, quiet)
    else:
        from recu_cli.training.settings import build_config
        from recu_cli.training.trainer import Trainer

        trainer = Trainer(build_config(ctx.params, set(given), config), quiet=quiet)
    if trainer.is_main and not json_out:
        console.print(trainer.headline())
    result = trainer.fit()
    if not trainer.is_main:
        return
    if json_out:
        print_json({**result, "config": trainer.cfg.to_dict()})
        return
    final = result["final"] or {}
    skipped = result.get("skipped_images") or 0
    if result.get("step0"):
        from recu_cli.step0 import describe_step0

        console.print(f"before training: {describe_step0(result['step0'])}")
    console.print(
        f"done: {result['epochs']} epochs, "
        f"last val top-1 {final.get('val_top1', float('nan')):.2f}%, "
        f"best {result['best_top1']:.2f}%, dead weights {100 * final.get('dead_share', 0):.1f}%; "
        + (f"{skipped} unreadable training images skipped (see train.log); " if skipped else "")
        + (
            f"packed checkpoints in {result['run_dir']} (inspect: recu analyze {result['last']})"
            if result["last"]
            else f"stopped in stage 1 (real weights): no packed checkpoint in {result['run_dir']}"
        )
    )


def given_params(ctx: typer.Context) -> dict[str, Any]:
    """The parameters typed on the command line (or set in the environment), by name."""
    return {
        name: value
        for name, value in ctx.params.items()
        if (src := ctx.get_parameter_source(name)) is not None
        and src.name in ("COMMANDLINE", "ENVIRONMENT")
    }


def _resumed(run_dir: Path, given: dict[str, Any], quiet: bool):
    """The Trainer of `--resume RUN` with the flags --resume accepts applied (resume_rules)."""
    from recu_cli.training.resume_rules import apply_resume_flags, finished
    from recu_cli.training.run_folder import load_run_config, read_position
    from recu_cli.training.trainer import Trainer

    saved = load_run_config(run_dir)
    # the settings typed, and --config (refused); --json and --quiet change nothing
    given = {
        k: v
        for k, v in given.items()
        if (k in by_param(TrainConfig) or k == "config") and k not in ("model", "data")
    }
    # torchrun's WORLD_SIZE: a resume with another number of processes is refused first
    done = read_position(run_dir, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    cfg, changes = apply_resume_flags(saved, given, str(run_dir), done)
    cfg.validate()
    if finished(cfg, done):
        limit = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs} epochs"
        raise RecuError(
            f"{run_dir} has finished ({done.epoch} epochs, {done.global_step} steps of "
            f"{limit}); nothing to resume. To "
            f"train longer, add a larger --epochs (or --max-steps) to --resume {run_dir}"
        )
    return Trainer(cfg, run_dir=run_dir, quiet=quiet, resume_changes=changes)
