"""TrainConfig: every setting a run depends on, its checks, and its file form.

The dataclass is the one source of a setting's default; `recu binarize` fills it by field
name (training/settings.py), and config.json in the run folder is its `asdict`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from recu_cli.binarize.tau import TAU_MAX, TAU_MIN
from recu_cli.convert_config import ConvertConfig
from recu_cli.errors import RecuError
from recu_cli.fastdata import DATA_PATHS
from recu_cli.training.resumeclock import DEFAULT_INTERVAL, parse_interval

OPTIMIZERS = ("sgd", "adam", "adamw")
COMPILE_MODES = ("auto", "on", "off")  # as training/fast_step.py (torch-free here)


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.json and reloaded by --resume."""

    model: str
    data: str
    weights: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    epochs: int = 6
    batch_size: int = 128
    opt: str = "adam"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    clip_grad: float | None = None
    tau_min: float = TAU_MIN
    tau_max: float = TAU_MAX
    tau_update: str = "epoch"
    teacher: str = "self"
    teacher_weights: str | None = None
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    amp: bool = False
    amp_dtype: str = "auto"  # resolved when a run starts (devices.default_amp_dtype)
    channels_last: bool = False
    data_path: str = "auto"  # resolved when a run starts (fastdata/choice.py)
    max_steps: int | None = None
    seed: int = 42
    workers: int | None = None  # None: devices.default_workers
    device: str | None = None
    output: str = "output"
    experiment: str | None = None
    log_interval: int = 50
    half: bool = False
    keep_latent: bool = False
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    # the recipe's levers (defaults here = the paper's single-stage recipe; see recipes.py)
    recipe: str = "paper"
    stage1_epochs: int = 0
    feature_kd: float = 0.0
    other_lr_scale: float = 1.0
    other_weight_decay: float | None = None
    bn_recalib: int = 0
    calib_images: int = 256
    step0_eval: bool = True
    # how the run is executed (--resume may change these: resume_rules.py)
    checkpoint_interval: str = DEFAULT_INTERVAL
    strict_data: bool = False
    deterministic: bool = False
    compile: str = "auto"  # auto | on | off: training/fast_step.py

    def __post_init__(self) -> None:
        if isinstance(self.convert, dict):  # config.json and callers that hold a dict
            self.convert = ConvertConfig.from_dict(self.convert)

    def validate(self) -> None:
        """Each value on its own, then the rules that tie flags together."""
        check_tau_range(self.tau_min, self.tau_max)
        if not self.convert.clamp and (self.tau_min, self.tau_max) != (TAU_MIN, TAU_MAX):
            raise RecuError(
                "--plain-sign has no clamp, so --tau-min/--tau-max have no effect; drop them"
            )
        if self.opt not in OPTIMIZERS:
            raise RecuError(f"--opt must be one of {', '.join(OPTIMIZERS)}, got '{self.opt}'")
        if self.tau_update not in ("epoch", "step"):
            raise RecuError("--tau-update must be 'epoch' or 'step'")
        if self.epochs < 1 or self.batch_size < 1:
            raise RecuError("--epochs and --batch-size must be at least 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise RecuError(f"--lr must be a positive number, got {self.lr}")
        if self.amp_dtype not in ("auto", "bf16", "fp16"):
            raise RecuError("--amp-dtype must be auto, bf16 or fp16")
        if self.data_path not in DATA_PATHS:
            raise RecuError(
                f"--data-path must be one of {', '.join(DATA_PATHS)}, got '{self.data_path}'"
            )
        if not 0.0 <= self.kd_weight <= 1.0:
            raise RecuError("--kd-weight must be in [0, 1]")
        if not 0 <= self.stage1_epochs < self.epochs:
            raise RecuError(
                f"--stage1-epochs must be at least 0 and less than --epochs ({self.epochs}), "
                f"got {self.stage1_epochs}: stage 2 (binary weights) needs at least one epoch"
            )
        if not (self.feature_kd >= 0 and math.isfinite(self.feature_kd)):
            raise RecuError(f"--feature-kd must be a number >= 0, got {self.feature_kd}")
        if not (self.other_lr_scale > 0 and math.isfinite(self.other_lr_scale)):
            raise RecuError(f"--other-lr-scale must be positive, got {self.other_lr_scale}")
        if self.other_weight_decay is not None and not self.other_weight_decay >= 0:
            raise RecuError(f"--other-weight-decay must be >= 0, got {self.other_weight_decay}")
        if self.bn_recalib < 0 or self.calib_images < 1:
            raise RecuError("--bn-recalib must be >= 0 and --calib-images at least 1")
        if self.feature_kd > 0 and self.teacher == "none":
            raise RecuError("--feature-kd needs a teacher; drop --teacher none or set it to 0")
        if self.compile not in COMPILE_MODES:
            raise RecuError(
                f"--compile must be one of {', '.join(COMPILE_MODES)}, got '{self.compile}'"
            )
        parse_interval(self.checkpoint_interval)

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else (0.1 if self.opt == "sgd" else 1e-3)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Lenient: keys of older versions that no field takes any more are dropped."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_tau_range(tau_min: float, tau_max: float) -> None:
    if not 0.5 < tau_min <= tau_max <= 1.0:
        raise RecuError(f"need 0.5 < --tau-min <= --tau-max <= 1, got {tau_min} and {tau_max}")


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file's settings: TrainConfig field names (`-` or `_`), with conversion
    options under `convert`; a run's config.json (settings under "train") works as is."""
    if not path.is_file():
        raise RecuError(f"config file {path} not found")
    text = path.read_text()
    try:
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
    except Exception as e:  # noqa: BLE001 - any parse error means the same thing to the user
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecuError(f"cannot read config file {path} ({first})") from None
    if isinstance(payload, dict) and isinstance(payload.get("train"), dict):
        payload = payload["train"]
    if not isinstance(payload, dict):
        raise RecuError(f"config file {path} must hold a mapping of setting: value")
    return _known_keys(payload, path)


def _known_keys(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    names = {f.name for f in fields(TrainConfig)}
    out = {str(k).replace("-", "_"): v for k, v in payload.items()}
    for key in out:
        if key not in names:
            raise RecuError(f"unknown setting '{key}' in config file {path}")
    for f in fields(TrainConfig):
        if f.name in out and "float" in str(f.type) and isinstance(out[f.name], str):
            out[f.name] = _number(out[f.name], f.name, path)
    convert = out.get("convert", {})
    if not isinstance(convert, dict):
        raise RecuError(f"'convert' in config file {path} must be a mapping of option: value")
    out["convert"] = {str(k).replace("-", "_"): v for k, v in convert.items()}
    known = {f.name for f in fields(ConvertConfig)}
    for key in out["convert"]:
        if key not in known:
            raise RecuError(f"unknown setting 'convert.{key}' in config file {path}")
    return out


def _number(text: str, key: str, path: Path) -> float:
    """YAML 1.1 reads `1e-3` (no dot) as a string: a number field takes it as the number."""
    try:
        return float(text)
    except ValueError:
        raise RecuError(f"'{key}' in config file {path} must be a number, got {text!r}") from None
