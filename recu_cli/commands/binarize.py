"""`recu binarize`: convert a pretrained model and fine-tune it under the tau schedule."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from recu_cli.app import app, console, print_json
from recu_cli.binarize.tau import TAU_MAX, TAU_MIN
from recu_cli.commands.options import (
    Activation,
    AlphaInit,
    AlphaMode,
    BStar,
    Json,
    Keep,
    NoStandardize,
    NumClasses,
    PlainSign,
    Pretrained,
    Quiet,
    Weights,
)
from recu_cli.errors import RecuError
from recu_cli.recipes import DEFAULT_RECIPE, RECIPE_HELP
from recu_cli.training.resumeclock import DEFAULT_INTERVAL

ADVICE = (
    RECIPE_HELP + " Both use ReCU's weight path (standardization, clamp, tau "
    f"{TAU_MIN} -> {TAU_MAX} over the binary-weight stage) and Adam with cosine. From "
    "scratch, use the paper's schedule: --recipe paper --opt sgd --lr 0.1 --weight-decay "
    "5e-4 --warmup-epochs 5 --epochs 600 --teacher none. Measurements: docs/results.md."
)


@app.command(epilog=ADVICE)
def binarize(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Argument(help="Model name (resnet18, tv:resnet18, resnet20, ...).")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="Folder with train/ and val/, a dataset name, or 'demo'."
        ),
    ] = None,
    weights: Weights = None,
    pretrained: Pretrained = False,
    num_classes: NumClasses = None,
    recipe: Annotated[
        str, typer.Option("--recipe", help="'finetune' (short fine-tune) or 'paper'.")
    ] = DEFAULT_RECIPE,
    epochs: Annotated[
        int,
        typer.Option(
            "--epochs", min=1, help="Epochs in total (with --resume: a larger number trains on)."
        ),
    ] = 6,
    stage1_epochs: Annotated[
        int | None,
        typer.Option(
            "--stage1-epochs",
            min=0,
            help="Epochs of stage 1 (binary activations, real weights) before ReCU's binary "
            "weights; 0 = one stage (finetune: half of --epochs, paper: 0).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 128,
    opt: Annotated[str, typer.Option("--opt", help="sgd, adam or adamw.")] = "adam",
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Peak learning rate of the latent binary weights (finetune: 2e-3; paper: "
            "1e-3 for adam/adamw, 0.1 for sgd).",
        ),
    ] = None,
    other_lr_scale: Annotated[
        float | None,
        typer.Option(
            "--other-lr-scale",
            help="lr of everything else (BN, alpha, thresholds, PReLU, full-precision "
            "layers) = --lr times this.",
        ),
    ] = None,
    other_weight_decay: Annotated[
        float | None,
        typer.Option(
            "--other-weight-decay",
            min=0.0,
            help="Weight decay of full-precision conv/linear weights (default: --weight-decay).",
        ),
    ] = None,
    momentum: Annotated[float, typer.Option("--momentum")] = 0.9,
    weight_decay: Annotated[
        float,
        typer.Option("--weight-decay", min=0.0, help="On latent binary weights (and fp weights)."),
    ] = 0.0,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", min=0.0)] = 0.0,
    warmup_lr: Annotated[float, typer.Option("--warmup-lr", min=0.0)] = 1e-6,
    min_lr: Annotated[float, typer.Option("--min-lr", min=0.0)] = 0.0,
    clip_grad: Annotated[
        float | None, typer.Option("--clip-grad", min=0.0, help="Clip the gradient norm.")
    ] = None,
    tau_min: Annotated[
        float,
        typer.Option("--tau-min", help="tau at the first epoch (1 with --tau-max 1: no ReCU)."),
    ] = TAU_MIN,
    tau_max: Annotated[float, typer.Option("--tau-max", help="tau reached at the end.")] = TAU_MAX,
    tau_update: Annotated[
        str, typer.Option("--tau-update", help="'epoch' (paper) or 'step'.")
    ] = "epoch",
    teacher: Annotated[
        str,
        typer.Option(
            "--teacher",
            help="'self' (the original model), 'none', or a model name (with --teacher-weights).",
        ),
    ] = "self",
    teacher_weights: Annotated[
        Path | None,
        typer.Option("--teacher-weights", help="Local weights of the --teacher model."),
    ] = None,
    kd_weight: Annotated[
        float,
        typer.Option("--kd-weight", help="Share of the distillation loss (1 = distillation only)."),
    ] = 1.0,
    feature_kd: Annotated[
        float | None,
        typer.Option(
            "--feature-kd",
            help="Weight of the attention-map loss on block outputs of the teacher "
            "(finetune: 3, paper: 0).",
        ),
    ] = None,
    act_threshold: Annotated[
        str | None,
        typer.Option(
            "--act-threshold",
            help="Threshold before each sign: zero (paper), learned (from 0), median "
            "(learned, calibrated on training images; finetune).",
        ),
    ] = None,
    calib_images: Annotated[
        int, typer.Option("--calib-images", min=1, help="Training images for calibration.")
    ] = 256,
    bn_recalib: Annotated[
        int | None,
        typer.Option(
            "--bn-recalib",
            min=0,
            help="Re-estimate BatchNorm statistics on N training batches after the last step.",
        ),
    ] = None,
    step0_eval: Annotated[
        bool,
        typer.Option(
            "--step0-eval/--no-step0-eval",
            help="Validate the original and the converted model before training.",
        ),
    ] = True,
    keep: Keep = None,
    act: Activation = None,
    b_star: BStar = 2.0,
    alpha_init: AlphaInit = "pretrained",
    alpha_mode: AlphaMode = "learned",
    no_standardize: NoStandardize = False,
    plain_sign: PlainSign = False,
    amp: Annotated[
        bool,
        typer.Option(
            "--amp",
            help="Mixed precision (autocast) on CUDA; on the CPU the same code path, for tests. "
            "Validation stays fp32.",
        ),
    ] = False,
    amp_dtype: Annotated[
        str,
        typer.Option(
            "--amp-dtype",
            help="auto (default): bf16 on GPUs of compute capability >= 8.0 with bf16 support "
            "(A100, H100, RTX 30xx on) and on the CPU, fp16 with a grad scaler on older GPUs "
            "(V100, T4, whose bf16 convolutions are slow); or bf16, fp16.",
        ),
    ] = "auto",
    deterministic: Annotated[
        bool,
        typer.Option(
            "--deterministic",
            help="Deterministic GPU kernels (torch.use_deterministic_algorithms, cuDNN "
            "deterministic, no cuDNN autotuning): a resumed GPU run then matches an "
            "uninterrupted one to the bit; slower. CPU runs are exact without it.",
        ),
    ] = False,
    compile: Annotated[
        str,
        typer.Option(
            "--compile",
            help="auto (default): on for CUDA, off on the CPU; on: torch.compile the training "
            "step (student, teacher, losses; fused optimizer on CUDA, and one CUDA graph per "
            "step where possible); off: eager. Falls back to a slower path with one line in "
            "train.log where one fails. Validation stays eager.",
        ),
    ] = "auto",
    channels_last: Annotated[
        bool,
        typer.Option(
            "--channels-last", help="NHWC memory layout, student and teacher (faster on GPUs)."
        ),
    ] = False,
    data_path: Annotated[
        str,
        typer.Option(
            "--data-path",
            help="Where images are decoded and augmented: auto (default: resident when the "
            "decoded set of a small-input model fits, gpu-decode for image trees on CUDA, "
            "else pil), resident (decoded once, cached, kept as uint8 on the training "
            "device), gpu-decode (JPEGs decoded on the GPU; on the CPU by the workers), or pil "
            "(PIL in loader workers). Recorded in config.json; --resume keeps it.",
        ),
    ] = "auto",
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Stop after N optimizer steps.")
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of data order, augmentation and initialisation.")
    ] = 42,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            "-j",
            min=0,
            help="Data-loading processes (default: 2 on the CPU; on CUDA the CPU cores per "
            "GPU process minus one, at most 8).",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="cpu, cuda, cuda:N (default: cuda if present)."),
    ] = None,
    checkpoint_interval: Annotated[
        str,
        typer.Option(
            "--checkpoint-interval",
            help="Resume point every N steps (500) or every so long (10m, 90s, 1h) inside an "
            "epoch, besides the start and each epoch end; 0 = only those.",
        ),
    ] = DEFAULT_INTERVAL,
    strict_data: Annotated[
        bool,
        typer.Option(
            "--strict-data",
            help="Stop at the first unreadable training image (default: skip it with a warning).",
        ),
    ] = False,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Parent folder of run folders.")
    ] = Path("output"),
    experiment: Annotated[
        str | None, typer.Option("--experiment", help="Run folder name (default: time-model).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Settings from a file (.json, or .yaml with PyYAML), e.g. a run's "
            "config.json; flags given here override it.",
        ),
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this folder exactly.")
    ] = None,
    log_interval: Annotated[int, typer.Option("--log-interval", min=0)] = 50,
    half: Annotated[
        bool, typer.Option("--half", help="Store full-precision tensors as fp16 in checkpoints.")
    ] = False,
    keep_latent: Annotated[
        bool, typer.Option("--keep-latent", help="Store latent weights in checkpoints.")
    ] = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune MODEL as a ReCU binary network; writes a run folder with packed checkpoints."""
    given = given_params(ctx)
    quiet = quiet or json_out
    from recu_cli.runtime.allocator import keep_freed_memory

    keep_freed_memory()  # a CPU training step allocates dozens of activation-sized tensors
    if resume is not None:
        if model is not None or data is not None:
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
    given = {k: v for k, v in given.items() if k not in ("model", "data")}
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
