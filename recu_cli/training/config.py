"""TrainConfig: every setting a run depends on, declared once, its checks, its file form.

Each field is one setting's whole declaration (default, help, bounds, choices, --resume
rule: recu_cli/setting.py says how to add one); `recu binarize`'s flags, config files,
config.json, the recipes and the resume rules read it. A TrainConfig built in Python from
model and data alone is the run `recu binarize MODEL --data DATA` trains: recipe
`finetune`, whose levers fill every field left at None (recipes.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from recu_cli.binarize.tau import TAU_MAX, TAU_MIN
from recu_cli.convert_config import CONVERSION, ConvertConfig
from recu_cli.errors import RecuError
from recu_cli.fastdata import DATA_PATHS
from recu_cli.recipes import DEFAULT_RECIPE, PAPER_LR, RECIPES, lever_values
from recu_cli.setting import EXECUTION, LONGER, check_fields, check_mapping, declared, setting
from recu_cli.training.resumeclock import DEFAULT_INTERVAL, parse_interval

OPTIMIZERS = tuple(PAPER_LR)
# Levers added after runs were saved without them, and the value those runs trained with:
# a run's config.json without the key (--resume, --config RUN/config.json) gets it, so the
# run is reproduced; a fresh run, or a config file of the user's own, takes the recipe's.
ABSENT_FROM_OLDER_RUNS = {
    "switch_moments": "reset", "stage2_short_cycles": 0, "ema_decay": 0.0, "ema_memory": "fixed",
    "stage2_feature_kd_scale": 1.0,
}  # fmt: skip
COMPILE_MODES = ("auto", "on", "off")  # --compile: training/optim.compile_enabled
MODEL, SCHEDULE, OPTIMIZER = "Model and data", "Recipe and schedule", "Optimizer"
DISTILL, RUN = "Distillation", "Run, output and speed"


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.json and reloaded by --resume.

    None in a recipe lever means "the recipe's value" and is filled at construction;
    `convert` may be a ConvertConfig (taken whole), or a dict or None (laid over the
    recipe's conversion). The conversion's tau is always --tau-min, where the schedule
    starts."""

    model: str = setting(help="Model name (resnet18, tv:resnet18, resnet20, ...).", argument=True)
    data: str = setting(
        help="Folder with train/ and val/, a dataset name, or 'demo'.",
        flags=("--data", "-d"),
        panel=MODEL,
    )
    weights: str | None = setting(
        None,
        "Local weights: .safetensors, or .pth/.th/.pt (loaded with weights_only=True).",
        flags=("--weights", "-w"),
        path=True,
        panel=MODEL,
    )
    pretrained: bool = setting(
        False, "Download the model's pretrained weights from the hub (online).", panel=MODEL
    )
    num_classes: int | None = setting(
        None, "Classifier size (default: the model's or the data's).", min=1, panel=MODEL
    )
    # the recipe and the run's length
    recipe: str = setting(
        DEFAULT_RECIPE,
        "Named defaults for the levers marked 'recipe' (see below); flags you give win.",
        choices=tuple(RECIPES),
        panel=SCHEDULE,
    )
    epochs: int = setting(
        6,
        "Epochs in total (with --resume: a larger number trains on).",
        min=1,
        resume=LONGER,
        panel=SCHEDULE,
    )
    stage1_epochs: int | None = setting(
        None,
        "Epochs of stage 1 (binary activations, real weights) before ReCU's binary "
        "weights; 0 = one stage.",
        min=0,
        panel=SCHEDULE,
    )
    binarize_penalty: float | None = setting(
        None,
        "Weight of stage 1's penalty that draws each channel's real weights toward +-alpha "
        "(growing from 0 over stage 1), so binarizing them at the switch loses less; 0 = none.",
        min=0.0,
        panel=SCHEDULE,
    )
    binarize_ramp: float | None = setting(
        None,
        "Epochs at the start of stage 2 over which the weights turn binary step by step "
        "(a blend of real and binary weights); 0 = all at once, at most 1.",
        min=0.0,
        max=1.0,
        panel=SCHEDULE,
    )
    switch_moments: str | None = setting(
        None,
        "At the stage switch, Adam's moments (SGD's momentum) start again from zero "
        "('reset', as a new optimizer would) or carry on from stage 1 ('keep').",
        choices=("reset", "keep"),
        panel=SCHEDULE,
    )
    stage2_lr_scale: float | None = setting(
        None,
        "Stage 2's peak learning rate as a share of stage 1's (every parameter group; its "
        "cosine restarts from there at the switch); 1 = the same peak. Two stages only.",
        min=0.0,
        above=True,
        panel=SCHEDULE,
    )
    stage2_short_cycles: int | None = setting(
        None,
        "Stage 2 begins with N one-epoch cosines, each from the peak down to --min-lr, "
        "then one cosine over the rest: the epochs after the switch end on settled "
        "weights; 0 = one cosine over stage 2. Two stages only.",
        min=0,
        panel=SCHEDULE,
    )
    ema_decay: float | None = setting(
        None,
        "Validate and pack an exponential moving average of the weights with this decay "
        "(restarted at each stage, warmed up by --ema-warmup-power), not the last step's "
        "weights; 0 = the last step's.",
        min=0.0,
        max=1.0,
        below=True,
        panel=SCHEDULE,
    )
    ema_memory: str | None = setting(
        None,
        "How long the average remembers: 'fixed', 1/(1 - decay) updates; 'lr', that times "
        "the learning rate's share of the stage's peak, so the average becomes the last "
        "step's weights where a cosine ends.",
        choices=("fixed", "lr"),
        panel=SCHEDULE,
    )
    ema_warmup_power: float = setting(
        0.75,
        "The average's warm-up: update k of a stage uses the decay min(--ema-decay, "
        "1 - k^-P); 1 = the plain mean of the stage's weights until the decay is reached.",
        min=0.0,
        max=1.0,
        above=True,
        panel=SCHEDULE,
    )
    max_steps: int | None = setting(
        None,
        "Stop after N optimizer steps (with --resume: a larger number trains on).",
        min=1,
        resume=LONGER,
        panel=SCHEDULE,
    )
    batch_size: int = setting(
        128,
        "Images per optimizer step (per process under torchrun).",
        flags=("--batch-size", "-b"),
        min=1,
        panel=SCHEDULE,
    )
    tau_min: float = setting(
        TAU_MIN,
        "tau at the first epoch of ReCU's binary weights (1 with --tau-max 1: no ReCU).",
        min=0.5,
        above=True,
        max=1.0,
        panel=SCHEDULE,
    )
    tau_max: float = setting(
        TAU_MAX, "tau reached at the end.", min=0.5, above=True, max=1.0, panel=SCHEDULE
    )
    tau_update: str = setting(
        "epoch",
        "Set tau each 'epoch' (paper) or each 'step'.",
        choices=("epoch", "step"),
        panel=SCHEDULE,
    )
    # the optimizer
    opt: str = setting("adam", "Optimizer (sgd: Nesterov).", choices=OPTIMIZERS, panel=OPTIMIZER)
    lr: float | None = setting(
        None, "Peak learning rate of the latent binary weights.", min=0.0, above=True,
        panel=OPTIMIZER,
    )  # fmt: skip
    other_lr_scale: float | None = setting(
        None,
        "lr of everything else (BN, alpha, thresholds, PReLU, full-precision layers) = "
        "--lr times this.",
        min=0.0,
        above=True,
        panel=OPTIMIZER,
    )
    weight_decay: float = setting(
        0.0, "On latent binary weights (and fp weights).", min=0.0, panel=OPTIMIZER
    )
    other_weight_decay: float | None = setting(
        None,
        "Weight decay of full-precision conv/linear weights (default: --weight-decay).",
        min=0.0,
        panel=OPTIMIZER,
    )
    momentum: float = setting(
        0.9, "SGD's (Nesterov) momentum.", min=0.0, max=1.0, below=True, panel=OPTIMIZER
    )
    warmup_epochs: float = setting(
        0.0,
        "Linear warm-up at the start of each stage, in epochs (at most the stage's length).",
        min=0.0,
        panel=OPTIMIZER,
    )
    warmup_lr: float = setting(
        1e-6, "Learning rate the warm-up starts from.", min=0.0, panel=OPTIMIZER
    )
    min_lr: float = setting(
        0.0, "Where the cosine ends (at most the peak --lr).", min=0.0, panel=OPTIMIZER
    )
    clip_grad: float | None = setting(
        None, "Clip the gradient norm to this (0: no clipping).", min=0.0, panel=OPTIMIZER
    )
    # distillation
    teacher: str = setting(
        "self",
        "'self' (the original model), 'none', or a model name (with --teacher-weights).",
        panel=DISTILL,
    )
    teacher_weights: str | None = setting(
        None, "Local weights of the --teacher model.", path=True, panel=DISTILL
    )
    kd_weight: float = setting(
        1.0,
        "Share of the distillation loss (1 = distillation only).",
        min=0.0,
        max=1.0,
        panel=DISTILL,
    )
    kd_temperature: float | None = setting(
        None,
        "Softmax temperature of the logit distillation (loss scaled by T^2).",
        min=0.0,
        above=True,
        panel=DISTILL,
    )
    feature_kd: float | None = setting(
        None,
        "Weight of the attention-map loss on block outputs of the teacher.",
        min=0.0,
        panel=DISTILL,
    )
    stage2_feature_kd_scale: float | None = setting(
        None,
        "Stage 2's weight of the attention-map loss as a share of --feature-kd's (the "
        "binary-weight stage); 1 = the same weight. Two stages only.",
        min=0.0,
        panel=DISTILL,
    )
    # the conversion (ConvertConfig's fields appear here), calibration and step 0
    convert: ConvertConfig = None  # type: ignore[assignment]
    calib_images: int = setting(256, "Training images for calibration.", min=1, panel=CONVERSION)
    bn_recalib: int | None = setting(
        None,
        "Re-estimate BatchNorm statistics on N training batches after the last step.",
        min=0,
        panel=CONVERSION,
    )
    step0_eval: bool = setting(
        True,
        "Validate the original and the converted model before training.",
        flags=("--step0-eval/--no-step0-eval",),
        panel=CONVERSION,
    )
    # how the run is executed and what it writes
    seed: int = setting(
        42,
        "Seed of data order, augmentation and initialisation.",
        min=0,
        max=2**32 - 1,
        panel=RUN,
    )
    amp: bool = setting(
        False,
        "Mixed precision (autocast) on CUDA; on the CPU the same code path, for tests. "
        "Validation stays fp32.",
        panel=RUN,
    )
    amp_dtype: str = setting(
        "auto",
        "auto: bf16 on GPUs of compute capability >= 8.0 with bf16 support (A100, H100, "
        "RTX 30xx on) and on the CPU, fp16 with a grad scaler on older GPUs (V100, T4, "
        "whose bf16 convolutions are slow); or bf16, fp16.",
        choices=("auto", "bf16", "fp16"),
        auto=("auto",),  # config.json holds what auto resolved to
        panel=RUN,
    )
    channels_last: bool = setting(
        False, "NHWC memory layout, student and teacher (faster on GPUs).", panel=RUN
    )
    compile: str = setting(
        "auto",
        "on: torch.compile the training step (student, teacher, losses; fused optimizer on "
        "CUDA, and one CUDA graph per step where possible), its gradients checked against "
        "the eager step's at each stage's first batch; off: eager; auto: on for CUDA in one "
        "process, off on the CPU and under torchrun. Falls back to a slower path with one "
        "line in train.log where one fails. Validation stays eager.",
        choices=COMPILE_MODES,
        resume=EXECUTION,
        panel=RUN,
    )
    data_path: str = setting(
        "auto",
        "Where images are decoded and augmented: auto (resident when the decoded set of a "
        "small-input model fits, gpu-decode for image trees on CUDA, else pil), resident "
        "(decoded once, cached, kept as uint8 on the training device), gpu-decode (JPEGs "
        "decoded on the GPU; on the CPU by the workers), or pil (PIL in loader workers). "
        "Recorded in config.json; --resume keeps it.",
        choices=DATA_PATHS,
        auto=("auto",),  # config.json holds what auto resolved to
        panel=RUN,
    )
    deterministic: bool = setting(
        False,
        "Deterministic GPU kernels (torch.use_deterministic_algorithms, cuDNN "
        "deterministic, no cuDNN autotuning): a resumed GPU run then matches an "
        "uninterrupted one to the bit; slower. CPU runs are exact without it.",
        resume=EXECUTION,
        panel=RUN,
    )
    device: str | None = setting(
        None,
        "cpu, cuda, cuda:N (default: cuda if present).",
        pattern=r"cpu|cuda(:\d+)?",
        shape="cpu, cuda or cuda:N",
        resume=EXECUTION,
        panel=RUN,
    )
    workers: int | None = setting(
        None,
        "Data-loading processes (default: 2 on the CPU; on CUDA the CPU cores per GPU "
        "process minus one, at most 8).",
        flags=("--workers", "-j"),
        min=0,
        resume=EXECUTION,
        panel=RUN,
    )
    checkpoint_interval: str = setting(
        DEFAULT_INTERVAL,
        "Resume point every N steps (500) or every so long (10m, 90s, 1h) inside an "
        "epoch, besides the start and each epoch end; 0 = only those.",
        check=parse_interval,
        resume=EXECUTION,
        panel=RUN,
    )
    strict_data: bool = setting(
        False,
        "Stop at the first unreadable training image (default: skip it with a warning).",
        resume=EXECUTION,
        panel=RUN,
    )
    log_interval: int = setting(
        50,
        "A progress line every N steps in train.log and on the terminal; 0 = none (only "
        "epoch lines).",
        min=0,
        resume=EXECUTION,
        panel=RUN,
    )
    output: str = setting(
        "output",
        "Parent folder of run folders.",
        flags=("--output", "-o"),
        path=True,
        panel=RUN,
    )
    experiment: str | None = setting(None, "Run folder name (default: time-model).", panel=RUN)
    half: bool = setting(False, "Store full-precision tensors as fp16 in checkpoints.", panel=RUN)
    keep_latent: bool = setting(False, "Store latent weights in checkpoints.", panel=RUN)

    def __post_init__(self) -> None:
        check_fields(self)
        levers = lever_values(self.recipe, self.epochs)
        for key, value in levers.items():
            if "." not in key and getattr(self, key) is None:
                setattr(self, key, value)
        convert = self.convert
        if not isinstance(convert, ConvertConfig):
            if convert is not None and not isinstance(convert, dict):
                raise RecuError(f"convert must be a mapping of option: value, got {convert!r}")
            recipe = {k.split(".", 1)[1]: v for k, v in levers.items() if "." in k}
            given = {k: v for k, v in (convert or {}).items() if v is not None}
            convert = ConvertConfig.from_dict({**recipe, **given})
        if convert.tau != self.tau_min:
            convert = replace(convert, tau=self.tau_min)
        self.convert = convert
        self._absolute_paths()

    def _absolute_paths(self) -> None:
        """Paths are stored absolute, so `--resume` and `--config RUN/config.json` work
        from any working directory; the demo binarizes the shipped pretrained network."""
        untrained = self.weights is None and not self.pretrained
        if self.data == "demo" and self.model == "resnet20" and untrained:
            from recu_cli.demo import DEMO_WEIGHTS

            self.weights = str(DEMO_WEIGHTS)
        data = Path(self.data).expanduser()
        self.data = str(data.resolve()) if data.exists() else self.data
        for d in declared(type(self)).values():
            if d.setting.path and getattr(self, d.key) is not None:
                setattr(self, d.key, str(Path(getattr(self, d.key)).expanduser().resolve()))

    def validate(self) -> None:
        """Each value on its own (the declarations), then the rules that tie flags together."""
        check_fields(self)
        check_tau_range(self.tau_min, self.tau_max)
        if not self.convert.clamp and (self.tau_min, self.tau_max) != (TAU_MIN, TAU_MAX):
            raise RecuError(
                "--plain-sign has no clamp, so --tau-min/--tau-max have no effect; drop them"
            )
        if not self.stage1_epochs < self.epochs:
            raise RecuError(
                f"--stage1-epochs must be at least 0 and less than --epochs ({self.epochs}), "
                f"got {self.stage1_epochs}: stage 2 (binary weights) needs at least one epoch"
            )
        if self.feature_kd > 0 and self.teacher == "none":
            raise RecuError("--feature-kd needs a teacher; drop --teacher none or set it to 0")
        if self.opt == "sgd" and self.momentum == 0:
            raise RecuError("--opt sgd uses Nesterov momentum, which needs --momentum above 0")
        if self.min_lr > self.base_lr:
            raise RecuError(
                f"--min-lr {self.min_lr:g} is above the peak learning rate {self.base_lr:g} "
                "(--lr): the cosine would climb instead of decaying; give a smaller --min-lr"
            )
        if self.stage1_epochs and self.min_lr > self.base_lr * self.stage2_lr_scale:
            raise RecuError(
                f"--min-lr {self.min_lr:g} is above stage 2's peak learning rate "
                f"{self.base_lr * self.stage2_lr_scale:g} (--lr times --stage2-lr-scale): give "
                "a smaller --min-lr or a larger --stage2-lr-scale"
            )
        stage2 = self.epochs - self.stage1_epochs
        stages = [n for n in (self.stage1_epochs, stage2) if n > 0]
        if self.warmup_epochs > min(stages):
            raise RecuError(
                f"--warmup-epochs {self.warmup_epochs:g} is longer than the run's shortest "
                f"stage ({min(stages)} epochs; each stage warms up anew): give at most "
                f"{min(stages)}"
            )
        if self.short_cycles_in_use and stage2 > 1 and self.warmup_epochs >= 1:
            raise RecuError(
                f"--warmup-epochs {self.warmup_epochs:g} fills stage 2's first one-epoch "
                f"cosine (--stage2-short-cycles {self.stage2_short_cycles}): give a warm-up "
                "under 1 epoch, or --stage2-short-cycles 0"
            )

    @property
    def short_cycles_in_use(self) -> int:
        """Stage 2's one-epoch cosines: --stage2-short-cycles in a two-stage run, none with
        one stage (no switch whose weights they would settle)."""
        return self.stage2_short_cycles if self.stage1_epochs else 0

    def attention_weight(self, stage: int) -> float:
        """The attention loss's weight in `stage`: --feature-kd, times
        --stage2-feature-kd-scale in stage 2 of a two-stage run."""
        if stage == 2 and self.stage1_epochs:
            return self.feature_kd * self.stage2_feature_kd_scale
        return self.feature_kd

    @property
    def base_lr(self) -> float:
        """The peak learning rate: --lr, else the paper's for the optimizer."""
        return self.lr if self.lr is not None else PAPER_LR[self.opt]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> TrainConfig:
        """A run's config.json `train` section. Lenient: keys of older versions that no
        field takes any more are dropped; one without 'recipe' predates recipes and ran
        the paper's levers. `source` (the file) is named in errors."""
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        kept.setdefault("recipe", "paper")
        kept = {**ABSENT_FROM_OLDER_RUNS, **kept}
        if source:
            kept = check_mapping(cls, kept, source)
        return cls(**kept)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["convert"] = self.convert.to_dict()
        return d


def check_tau_range(tau_min: float, tau_max: float) -> None:
    if not 0.5 < tau_min <= tau_max <= 1.0:
        raise RecuError(f"need 0.5 < --tau-min <= --tau-max <= 1, got {tau_min} and {tau_max}")


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file's settings, checked: TrainConfig field names (`-` or `_`), with
    conversion options under `convert`; a run's config.json (settings under "train") works
    as is. Every value is checked as its flag's would be, naming the file."""
    if not path.is_file():
        raise RecuError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise RecuError(
                    f"{path} is YAML, which needs PyYAML: pip install pyyaml (or give a .json)"
                ) from None
            payload = yaml.safe_load(text) or {}
        else:
            payload = json.loads(text)
    except RecuError:
        raise
    except UnicodeDecodeError:
        raise RecuError(f"cannot read config file {path} (not UTF-8 text)") from None
    except Exception as e:  # noqa: BLE001 - any parse error means the same thing to the user
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecuError(f"cannot read config file {path} ({first})") from None
    if isinstance(payload, dict) and isinstance(payload.get("train"), dict):
        payload = {**ABSENT_FROM_OLDER_RUNS, **payload["train"]}  # a run's own config.json
    if not isinstance(payload, dict):
        raise RecuError(f"config file {path} must hold a mapping of setting: value")
    return check_mapping(TrainConfig, payload, f"config file {path}")
