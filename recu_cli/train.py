"""The fine-tuning loop: plain PyTorch, resumable to the bit, DDP under torchrun.

One run = one folder: config.json, summary.csv (a row per epoch), train.log, packed
last/best checkpoints and resume.pt (everything needed to continue exactly).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recu_cli.atomic import atomic_path, write_bytes
from recu_cli.binarize.functions import sign_pos
from recu_cli.binarize.tau import tau_schedule
from recu_cli.convert import (
    ConvertConfig,
    binary_layers,
    check_keep,
    convert_model,
    set_tau,
)
from recu_cli.data import build_data, calibration_images, make_loader
from recu_cli.devices import (
    bind_device,
    configure_backends,
    default_amp_dtype,
    default_workers,
    pick_device,
)
from recu_cli.distill import FeatureTap, attention_loss, distillation_loss, feature_points
from recu_cli.distributed import (
    DistInfo,
    agree,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown,
    sync_buffers,
)
from recu_cli.errors import RecuError
from recu_cli.evaluate import EvalResult, batch_sums
from recu_cli.imagecheck import bad_of, check_tree, collate, fail_on_bad
from recu_cli.models import ModelSpec, create_model, reset_head
from recu_cli.progress import make_progress
from recu_cli.resumeclock import DEFAULT_INTERVAL, ResumeClock, parse_interval
from recu_cli.runlock import LOCK_NAME, RunLock
from recu_cli.sampling import EpochBatchSampler, SeededItems
from recu_cli.step_metrics import StepMetrics, SyncResult

OPTIMIZERS = ("sgd", "adam", "adamw")
SYNC_STEPS = 50  # host sync points without --log-interval (non-finite loss, Ctrl-C under DDP)
SUMMARY_FIELDS = [
    "epoch", "stage", "lr", "tau", "train_loss", "val_top1", "val_top5", "val_loss", "dead_share",
    "flip_rate", "flip_rate_tail", "flip_rate_core", "seconds", "img_per_s", "skipped_images",
]  # fmt: skip


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
    tau_min: float = 0.85
    tau_max: float = 0.99
    tau_update: str = "epoch"
    teacher: str = "self"
    teacher_weights: str | None = None
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    amp: bool = False
    amp_dtype: str = "auto"  # resolved when a run starts (devices.default_amp_dtype)
    channels_last: bool = False
    max_steps: int | None = None
    seed: int = 42
    workers: int | None = None  # None: devices.default_workers
    device: str | None = None
    output: str = "output"
    experiment: str | None = None
    log_interval: int = 50
    half: bool = False
    keep_latent: bool = False
    convert: dict[str, Any] = field(default_factory=dict)
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

    def validate(self) -> None:
        if self.opt not in OPTIMIZERS:
            raise RecuError(f"--opt must be one of {', '.join(OPTIMIZERS)}, got '{self.opt}'")
        if self.tau_update not in ("epoch", "step"):
            raise RecuError("--tau-update must be 'epoch' or 'step'")
        if not (0.5 < self.tau_min <= self.tau_max <= 1.0):
            raise RecuError(
                f"need 0.5 < --tau-min <= --tau-max <= 1, got {self.tau_min} and {self.tau_max}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise RecuError("--epochs and --batch-size must be at least 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise RecuError(f"--lr must be a positive number, got {self.lr}")
        if self.amp_dtype not in ("auto", "bf16", "fp16"):
            raise RecuError("--amp-dtype must be auto, bf16 or fp16")
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
        ConvertConfig.from_dict(self.convert)
        parse_interval(self.checkpoint_interval)

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else (0.1 if self.opt == "sgd" else 1e-3)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Position:
    """Where a run is: resuming from here reproduces the uninterrupted run exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float = -1.0


class TrainingStopped(RecuError):
    pass


def _run_dir(cfg: TrainConfig, info: DistInfo) -> tuple[Path, bool]:
    """The run folder, created here (True) or already there (False)."""
    name = cfg.experiment or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.model.replace(':', '_')}"
    path = Path(cfg.output) / name
    created = False
    if info.is_main:
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RecuError(
                f"cannot create run folder {path}: a file is in the way; pick another "
                "--output or --experiment"
            ) from None
        except OSError as e:
            raise RecuError(
                f"cannot create run folder {path} ({e.strerror}); pick a writable --output"
            ) from None
    return Path(broadcast_object(str(path), info)), created


# files a fresh run writes before its first resume point (removed when its start fails)
START_FILES = ("config.json", "train.log", "summary.csv", LOCK_NAME)


def _discard_run_dir(path: Path) -> None:
    """Remove a run folder this process created and that holds no resume point yet."""
    if (path / "resume.pt").exists():
        return
    for f in path.iterdir():
        if f.name in START_FILES or f.name.endswith(".tmp"):
            f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something else is in it: keep it
        path.rmdir()


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    other_lr_scale: float = 1.0,
    other_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Three groups, because a BNN's parameters want different treatment:
    latent binary weights (lr, weight_decay: only their signs matter, so decay only moves
    them toward flipping), full-precision conv/linear weights (lr * other_lr_scale,
    other_weight_decay, default weight_decay), and everything else: BatchNorm, biases,
    alpha, thresholds, PReLU slopes (lr * other_lr_scale, never decayed: decay would pull
    them away from their scale). Group 0 is always the latent binary weights."""
    latent = {id(m.weight) for _, m in binary_layers(model)}
    binary, fp_weights, rest = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in latent:
            binary.append(p)
        elif name.endswith("weight") and p.ndim > 1:
            fp_weights.append(p)
        else:
            rest.append(p)
    other_lr = lr * other_lr_scale
    fp_decay = weight_decay if other_weight_decay is None else other_weight_decay
    return [
        {"params": binary, "lr": lr, "weight_decay": weight_decay},
        {"params": fp_weights, "lr": other_lr, "weight_decay": fp_decay},
        {"params": rest, "lr": other_lr, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(
        model, cfg.base_lr, cfg.weight_decay, cfg.other_lr_scale, cfg.other_weight_decay
    )
    if cfg.opt == "sgd":
        return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, nesterov=True)
    if cfg.opt == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.base_lr)
    return torch.optim.Adam(groups, lr=cfg.base_lr)


def stage_bounds(cfg: TrainConfig, stage: int) -> tuple[int, int]:
    """[first, end) epochs of a stage: stage 1 = binary activations with real weights (only
    with --stage1-epochs), stage 2 = binary weights too (the whole run with one stage)."""
    if stage == 1:
        return 0, cfg.stage1_epochs
    return cfg.stage1_epochs, cfg.epochs


def stage_of(cfg: TrainConfig, epoch: int) -> int:
    return 1 if epoch < cfg.stage1_epochs else 2


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, stage: int = 2
):
    """timm's cosine schedule with linear warm-up, stepped per update, over one stage (each
    stage of a two-stage run gets its own warm-up and cosine, as in ReActNet)."""
    from timm.scheduler import CosineLRScheduler

    first, end = stage_bounds(cfg, stage)
    total = (end - first) * steps_per_epoch
    if cfg.max_steps:
        total = max(1, min(total, cfg.max_steps - first * steps_per_epoch))
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total - warmup),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class FlipTracker:
    """Sign flips of the binary weights over an epoch, split by where each weight started:
    in the tails (|W1| > Q, the dead weights) or in the core."""

    def __init__(self) -> None:
        self.start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def snapshot(self, model: nn.Module) -> None:
        self.start = {}
        for name, layer in binary_layers(model):
            qz = layer.quantize()
            self.start[name] = (qz.w2 >= 0, qz.w1.abs() > qz.q)

    @torch.no_grad()
    def rates(self, model: nn.Module) -> dict[str, float]:
        from recu_cli.stats import flip_rates

        flips = tail_flips = tails = n = 0
        for name, layer in binary_layers(model):
            if name not in self.start:
                continue
            old_plus, tail = self.start[name]
            r = flip_rates(old_plus.float() * 2 - 1, sign_pos(layer.quantize().w2), tail)
            size, n_tail = old_plus.numel(), int(tail.sum())
            flips += r["overall"] * size
            tail_flips += (r["tail"] or 0.0) * n_tail
            tails += n_tail
            n += size
        core = n - tails
        return {
            "flip_rate": flips / n if n else 0.0,
            "flip_rate_tail": tail_flips / tails if tails else 0.0,
            "flip_rate_core": (flips - tail_flips) / core if core else 0.0,
        }

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (plus, tail) in self.start.items():
            out[f"{name}.sign"] = plus
            out[f"{name}.tail"] = tail
        return out

    def load(self, state: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
        """Masks onto `device` (the model's), whatever device they were read onto."""
        names = {k.rsplit(".", 1)[0] for k in state}
        self.start = {
            n: (state[f"{n}.sign"].to(device), state[f"{n}.tail"].to(device)) for n in names
        }


class SkippedImages:
    """Unreadable training images: each named once per process, counted per epoch."""

    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.epoch = 0

    def add(self, path: str) -> bool:
        """Count one skip; True when the file is new (warn about it)."""
        self.epoch += 1
        new = path not in self.paths
        self.paths.add(path)
        return new

    def state(self) -> dict[str, Any]:
        return {"paths": sorted(self.paths), "epoch": self.epoch}

    def load(self, d: dict[str, Any]) -> None:
        self.paths = set(d.get("paths", []))
        self.epoch = int(d.get("epoch", 0))


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path | None = None,
        quiet: bool = False,
        resume_changes: list[str] | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.quiet = quiet
        device = pick_device(cfg.device)
        configure_backends(device, cfg.deterministic)
        self.info = init_distributed(device.type)
        if self.info.enabled and device.type == "cuda":
            device = torch.device("cuda", self.info.local_rank)
        self.device = bind_device(device)
        self.resuming = run_dir is not None
        self.resume_changes = list(resume_changes or [])
        created = False
        if run_dir is None:
            run_dir, created = _run_dir(cfg, self.info)
        self.run_dir = run_dir
        self.log_file = self.run_dir / "train.log"
        self.lock: RunLock | None = None
        try:
            if self.info.is_main:
                self.lock = RunLock(self.run_dir).acquire()
                for stale in self.run_dir.glob("*.tmp"):  # from a killed writer; ours now
                    stale.unlink(missing_ok=True)
                if not self.resuming and (self.run_dir / "resume.pt").exists():
                    raise RecuError(
                        f"{self.run_dir} already holds a run; continue it with "
                        f"--resume {self.run_dir}"
                    )
            self._log_start()
            self._setup()
        except BaseException as e:
            self._log_end(e)
            self.close()
            if created:
                _discard_run_dir(self.run_dir)
            raise

    def close(self) -> None:
        """Release the run folder (the process's exit would too)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _log_start(self) -> None:
        import shlex

        verb = "resume" if self.resuming else "start"
        self.log(
            f"{verb}: recu {_version()}, pid {os.getpid()}: recu {shlex.join(sys.argv[1:])}",
            echo=False,
        )

    def _log_end(self, e: BaseException) -> None:
        """The last line of train.log says how the process ended."""
        if isinstance(e, TrainingStopped) and e.exit_code == 130:
            self.log(f"interrupted: {e}", echo=False)
        elif isinstance(e, KeyboardInterrupt):
            self.log("interrupted (second Ctrl-C): stopped at once", echo=False)
        elif isinstance(e, RecuError):
            self.log(f"error: {e}", echo=False)
        elif isinstance(e, Exception):
            self.log(f"error: {type(e).__name__}: {str(e)[:300]}", echo=False)

    # ---------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        self.head_reset = False
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        model, spec = create_model(
            cfg.model, num_classes=cfg.num_classes, pretrained=cfg.pretrained, weights=cfg.weights
        )
        self.data = build_data(cfg.data, spec, train=True)
        check_tree(self.data.val, "the validation images")  # seconds now, not after an epoch
        n_data = len(self.data.classes)
        if spec.num_classes != n_data:
            if cfg.num_classes is not None:
                raise RecuError(
                    f"--num-classes {cfg.num_classes} but {cfg.data} has {n_data} classes; "
                    "drop --num-classes or fix the data"
                )
            spec = reset_head(model, spec, n_data)
            self.head_reset = True
            self.log(f"note: new {n_data}-class classifier for {cfg.data} (initialised at random)")
        if cfg.weights is None and not cfg.pretrained:
            self.log("note: no --weights/--pretrained given: training from random initialisation")
        self.spec: ModelSpec = spec
        original = copy.deepcopy(model) if cfg.step0_eval and not self.resuming else None
        self.teacher = self._teacher(model)
        self.convert_config = ConvertConfig.from_dict(cfg.convert)
        if not self.resuming:
            check_keep(model, self.convert_config.keep)
        model, self.report = convert_model(model, self.convert_config)
        if not binary_layers(model):
            raise RecuError(f"{cfg.model} has no layer to binarize; see `recu convert --dry-run`")
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = default_workers(self.device, local_world) if cfg.workers is None else cfg.workers
        self.ddp_model: nn.Module = self.model
        if self.info.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        train_ds = SeededItems(self.data.train, cfg.seed)
        self.sampler = EpochBatchSampler(
            len(train_ds), cfg.batch_size, cfg.seed, self.info.rank, self.info.world_size
        )
        if len(self.sampler) == 0:
            raise RecuError(
                f"the training set ({len(train_ds)} images) is smaller than one batch per "
                f"process; lower -b (now {cfg.batch_size})"
            )
        self.train_loader = torch.utils.data.DataLoader(
            train_ds,
            batch_sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=_ignore_sigint,
            collate_fn=collate,
        )
        val = self.data.val
        if self.info.enabled:
            val = torch.utils.data.Subset(
                val, list(range(self.info.rank, len(val), self.info.world_size))
            )
        self.val_loader = make_loader(
            val, max(cfg.batch_size, 64), workers, pin_memory=self.device.type == "cuda"
        )
        self.steps_per_epoch = len(self.sampler)
        self.optimizer = build_optimizer(self.model, cfg)
        self._setup_amp()
        self.pos = Position()
        self.history: list[dict[str, Any]] = []
        self.flips = FlipTracker()
        self.metrics = StepMetrics(self.device)  # this epoch's training loss, on the device
        self.stop_agreed = False  # all ranks agreed at a sync point to stop at the next step
        self.features = self._feature_taps()
        self.step0: dict[str, Any] | None = None
        self.skipped = SkippedImages()
        self.clock = ResumeClock(cfg.checkpoint_interval)
        if self.resuming:
            self._load_resume()
            if self.resume_changes:
                self._write_config()
                self.log("settings changed on resume: " + ", ".join(self.resume_changes))
        else:
            self._write_config()
            with torch.random.fork_rng(devices=[]):  # leaves the training RNG stream as it was
                self.step0 = self._start_model(original)
        del original
        self._enter_stage(stage_of(cfg, self.pos.epoch), switching=False)
        if not self.resuming:
            self.save_resume()  # the first resume point: a kill from here on loses little
            self.log("resume point saved (start of training)", echo=False)

    def _write_config(self) -> None:
        if self.info.is_main:
            payload = {
                "train": asdict(self.cfg), "model": self.spec.to_dict(), "recu_version": _version()
            }  # fmt: skip
            write_bytes(self.run_dir / "config.json", json.dumps(payload, indent=2).encode())

    def _setup_amp(self) -> None:
        """Autocast in --amp-dtype ('auto' resolved here and stored with the run), on CUDA
        and on the CPU (the same code path, which is how the tests see it); a grad scaler
        with fp16 only."""
        cfg = self.cfg
        if cfg.amp_dtype == "auto":
            cfg.amp_dtype = default_amp_dtype(self.device)
        self.amp_enabled = cfg.amp
        self.amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
        fp16 = self.amp_dtype == torch.float16
        if cfg.amp and not self.resuming:
            self.log(
                f"mixed precision: {cfg.amp_dtype} autocast"
                + (" with a grad scaler" if fp16 else "")
                + (
                    " (on the CPU: the code path of CUDA, for testing; most CPUs train "
                    "faster in fp32)"
                    if self.device.type == "cpu"
                    else ""
                )
            )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp and fp16)

    # ---------------------------------------------------------------- recipe parts
    def _start_model(self, original: nn.Module | None) -> dict[str, Any]:
        """Step 0: calibrate the thresholds on training images (eval transforms) and measure
        what conversion lost: val top-1 of the original and of the converted model, and the
        share of one-sided binary-conv input channels, before and after calibration."""
        from recu_cli.calibrate import calibrate_thresholds, one_sided_share, sign_balance

        cfg = self.cfg
        images = calibration_images(self.data, cfg.calib_images, cfg.seed).to(self.device)
        step0: dict[str, Any] = {}
        if original is not None:
            step0["fp_top1"] = self._validate(original.to(self.device)).top1
        before = {"one_sided_share": one_sided_share(sign_balance(self.model, images))}
        if cfg.step0_eval:
            before["top1"] = self._validate().top1
        step0["before"] = before
        if self.convert_config.act_threshold == "median":
            calibrate_thresholds(self.model, images)
            after = {"one_sided_share": one_sided_share(sign_balance(self.model, images))}
            if cfg.step0_eval:
                after["top1"] = self._validate().top1
            step0["after"] = after
        self.log("step 0: " + describe_step0(step0))
        return step0

    def _feature_taps(self) -> tuple[FeatureTap, FeatureTap] | None:
        if not self.cfg.feature_kd or self.teacher is None:
            return None
        points = feature_points(self.model, self.teacher)
        if not points:
            raise RecuError(
                f"--feature-kd: {self.cfg.model} and its teacher share no stage to match "
                "(they need ResNet stages of the same names); set --feature-kd 0"
            )
        return FeatureTap(self.model, points), FeatureTap(self.teacher, points)

    def _enter_stage(self, stage: int, switching: bool) -> None:
        """Stage 1 trains real centred weights behind binary activations; stage 2 binarizes
        the weights too. Switching: alpha starts at mean |W0| (so alpha * sign(W0) continues
        stage 1's W0) and Adam's moments restart, as the loss surface changes."""
        self.stage = stage
        for _, layer in binary_layers(self.model):
            layer.binarize_weights = stage == 2
        if switching:
            for _, layer in binary_layers(self.model):
                layer.reset_alpha_from_latent()
            self.optimizer.state.clear()
            self.log(f"stage 2 from epoch {self.pos.epoch + 1}: binary weights (ReCU)")
        first, _ = stage_bounds(self.cfg, stage)
        self.stage_start_step = first * self.steps_per_epoch
        self.scheduler = build_scheduler(self.optimizer, self.cfg, self.steps_per_epoch, stage)
        self.scheduler.step_update(self.pos.global_step - self.stage_start_step)

    def _teacher(self, model: nn.Module) -> nn.Module | None:
        cfg = self.cfg
        if cfg.teacher == "none" or cfg.kd_weight == 0:
            return None
        if cfg.teacher == "self":
            if cfg.weights is None and not cfg.pretrained:
                self.log("note: --teacher self without pretrained weights: distillation off")
                return None
            if self.head_reset:
                self.log(
                    "note: --teacher self: the original model has no classifier for these "
                    "classes: distillation off (pass --teacher MODEL with --teacher-weights)"
                )
                return None
            teacher = copy.deepcopy(model)
        else:
            try:
                teacher, t_spec = create_model(
                    cfg.teacher, pretrained=cfg.teacher_weights is None, weights=cfg.teacher_weights
                )
            except RecuError as e:  # name the flag: the message may be about MODEL otherwise
                raise RecuError(f"--teacher: {e}", e.exit_code) from e
            if t_spec.num_classes != len(self.data.classes):
                raise RecuError(
                    f"teacher {cfg.teacher} predicts {t_spec.num_classes} classes but "
                    f"{cfg.data} has {len(self.data.classes)}; give a teacher trained on this data"
                )
        teacher.eval().requires_grad_(False)
        if cfg.channels_last:  # it sees the student's channels-last images
            teacher = teacher.to(memory_format=torch.channels_last)
        return teacher.to(self.device)

    def log(self, msg: str, echo: bool = True) -> None:
        """A line on stderr (unless quiet or echo=False) and in train.log."""
        if not self.info.is_main:
            return
        from recu_cli.app import err_console

        if echo and not self.quiet:
            err_console.print(msg, highlight=False, markup=False, soft_wrap=True)
        if self.lock is not None and self.lock.held:  # only the folder's owner writes
            with open(self.log_file, "a") as f:
                f.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {msg}\n")

    # ---------------------------------------------------------------- state
    def tau_at(self, epoch: int, step: int) -> float:
        """ReCU's schedule spans stage 2 (the whole run when there is one stage)."""
        cfg = self.cfg
        first, end = stage_bounds(cfg, 2)
        e = max(0, epoch - first)
        e += step / self.steps_per_epoch if cfg.tau_update == "step" else 0.0
        return tau_schedule(e, end - first, cfg.tau_min, cfg.tau_max)

    def _resume_state(self, epoch_loss: torch.Tensor) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "position": asdict(self.pos),
            "history": json.dumps(self.history),
            "epoch_loss": epoch_loss,  # [world_size, 2]: each rank's own loss sum and count
            "world_size": self.info.world_size,
            "flips": self.flips.state(),
            "rng_torch": torch.get_rng_state(),
            "rng_python": json.dumps(random.getstate()),
            "step0": json.dumps(self.step0),
            "skipped": json.dumps(self.skipped.state()),
        }
        if self.device.type == "cuda":  # the ranks' generators advance alike: rank 0's serves
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_resume(self) -> None:
        """Called by every rank (gathering the ranks' loss sums is a collective)."""
        epoch_loss = self.metrics.state(self.info)
        if self.info.is_main:
            atomic_torch_save(self._resume_state(epoch_loss), self.run_dir / "resume.pt")
        self.clock.reset()

    def _load_resume(self) -> None:
        path = self.run_dir / "resume.pt"
        try:
            # on the CPU first: load_state_dict moves the model's and Adam's moments to the
            # parameters' device and leaves Adam's `step` on the CPU, where non-capturable
            # Adam wants it (a CUDA step costs a host sync per step)
            state = torch.load(path, map_location="cpu", weights_only=True)
            self._check_world_size(state.get("world_size"))
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self._load_scaler(state.get("scaler") or {})
        except RecuError:
            raise
        except Exception as e:  # noqa: BLE001 - any damage means the same thing to the user
            raise RecuError(
                f"cannot resume from {path} ({type(e).__name__}); the file is damaged or from "
                "another run: start a new run"
            ) from e
        self.pos = Position(**state["position"])
        self.history = json.loads(state["history"])
        self.metrics.load(state["epoch_loss"], self.info)
        self.flips.load(state["flips"], self.device)
        self.step0 = json.loads(state["step0"]) if "step0" in state else None
        if "skipped" in state:
            self.skipped.load(json.loads(state["skipped"]))
        if self.info.is_main and self.history:
            self._write_summary()  # a kill between resume.pt and summary.csv loses no row
        torch.set_rng_state(state["rng_torch"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        py = json.loads(state["rng_python"])
        random.setstate((py[0], tuple(py[1]), py[2]))
        self.log(
            f"resuming {self.run_dir} at epoch {self.pos.epoch + 1}, step "
            f"{self.pos.step_in_epoch} (global step {self.pos.global_step})"
        )

    def _check_world_size(self, saved: int | None) -> None:
        check_world_size(self.run_dir, saved, self.info.world_size)

    def _load_scaler(self, saved: dict[str, Any]) -> None:
        """An empty state comes from a scaler that was off (bf16, fp32, or a machine
        without fp16 autocast): a scaler that is on now starts fresh, as a new run's does."""
        if not saved:
            if self.scaler.is_enabled():
                self.log("note: resume.pt holds no grad-scaler state; starting a fresh scaler")
            return
        self.scaler.load_state_dict(saved)

    def _save_checkpoint(self, name: str, row: dict[str, Any]) -> None:
        from recu_cli.pack import save

        training = {
            "epoch": row["epoch"],
            "global_step": self.pos.global_step,
            "val_top1": row["val_top1"],
            "val_top5": row["val_top5"],
            "tau": row["tau"],
            "data": self.data.source,
            "config": asdict(self.cfg),
        }
        save(
            self.run_dir / f"{name}.safetensors",
            self.model,
            self.spec,
            self.convert_config,
            half=self.cfg.half,
            keep_latent=self.cfg.keep_latent,
            training=training,
            history=self.history,
        )

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train to the end; train.log gets the final line (done, interrupted or error)."""
        try:
            result = self._fit()
        except BaseException as e:
            self._log_end(e)
            raise
        finally:
            self.close()
        return result

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        with (
            make_progress(self.quiet or not self.info.is_main) as progress,
            _StopOnSigint() as stop,
        ):
            self.progress = progress
            self.stop = stop
            while self.pos.epoch < cfg.epochs and not self._max_steps_reached():
                if not self._train_epoch():
                    self.save_resume()
                    shutdown(self.info)
                    raise TrainingStopped(
                        f"interrupted at epoch {self.pos.epoch + 1} step "
                        f"{self.pos.step_in_epoch}; resume point saved: recu binarize "
                        f"--resume {self.run_dir}",
                        exit_code=130,
                    )
        if self.info.enabled:
            line = (
                f"rank {self.info.rank}/{self.info.world_size}: final weights digest "
                f"{weights_digest(self.model)}\n"
            )
            sys.stdout.flush()
            os.write(sys.stdout.fileno(), line.encode())  # one write: ranks share the pipe
        barrier(self.info)
        shutdown(self.info)
        binary_rows = [r for r in self.history if r.get("stage", 2) == 2]
        best = max((r["val_top1"] for r in binary_rows), default=float("nan"))
        skipped = max((int(r.get("skipped_images", 0)) for r in self.history), default=0)
        final = self.history[-1] if self.history else {}
        self.log(
            f"done: {len(self.history)} epochs, last val top-1 "
            f"{final.get('val_top1', float('nan')):.2f}%, best {best:.2f}%"
            + (f", {skipped} unreadable training images skipped" if skipped else ""),
            echo=False,
        )
        return {
            "run_dir": str(self.run_dir),
            "epochs": len(self.history),
            "final": self.history[-1] if self.history else None,
            "best_top1": best,
            "last": _if_exists(self.run_dir / "last.safetensors"),
            "best": _if_exists(self.run_dir / "best.safetensors"),
            "step0": self.step0,
            "skipped_images": skipped,
        }

    def _max_steps_reached(self) -> bool:
        return bool(self.cfg.max_steps) and self.pos.global_step >= self.cfg.max_steps

    def _train_epoch(self) -> bool:
        """One epoch from the current position; False when a Ctrl-C asked to stop.

        Each step only queues device work; the host reads the loss and the flags at sync
        points (every --log-interval steps, or SYNC_STEPS without logging, and at the end of
        the epoch), where all ranks agree on Ctrl-C. Alone, a process stops at the next
        step; under torchrun at the next sync point."""
        cfg, pos = self.cfg, self.pos
        epoch = pos.epoch
        if pos.step_in_epoch == 0 and epoch == cfg.stage1_epochs > 0:
            self._enter_stage(2, switching=True)
        if pos.step_in_epoch == 0:
            set_tau(self.model, self.tau_at(epoch, 0))
            self.flips.snapshot(self.model)
            self.metrics.reset()
            self.skipped.epoch = 0
        self.sampler.set_epoch(epoch, pos.step_in_epoch)
        self.model.train()
        start = time.perf_counter()
        images_seen = steps_here = 0
        sync_every = cfg.log_interval or SYNC_STEPS
        task = self.progress.add_task(
            f"epoch {epoch + 1}/{cfg.epochs}" + (" (stage 1)" if self.stage == 1 else ""),
            total=self.steps_per_epoch,
            info="",
        )
        self.progress.update(task, completed=pos.step_in_epoch)
        batches = iter(self.train_loader)
        while True:
            alone_stopping = self.stop.requested and not self.info.enabled
            # a step-count resume point is due on every rank at once, so it makes a sync
            # point; a time-based one is agreed at the next one (resumeclock.py)
            steps_due = bool(steps_here) and self.clock.steps is not None
            steps_due = steps_due and self.clock.due(pos.global_step)
            if alone_stopping or steps_due or (steps_here and pos.step_in_epoch % sync_every == 0):
                rate = images_seen * self.info.world_size / (time.perf_counter() - start)
                self._sync_point(task, rate, save_wanted=self.clock.due(pos.global_step))
            if self.stop_agreed:
                self.progress.remove_task(task)
                return False
            if self._max_steps_reached():
                break
            try:
                batch = next(batches)
            except StopIteration:
                break
            except RuntimeError:
                if self.stop.requested:  # Ctrl-C also ended the loader's workers
                    continue
                raise
            images, targets = batch
            self._skip_bad(bad_of(batch))
            if images.shape[0] == 0:  # every image of this batch was unreadable
                pos.step_in_epoch += 1
                pos.global_step += 1
                continue
            if cfg.tau_update == "step":
                set_tau(self.model, self.tau_at(epoch, pos.step_in_epoch))
            loss = self._step(images, targets)
            images_seen += images.shape[0]
            steps_here += 1
            pos.step_in_epoch += 1
            pos.global_step += 1
            self.scheduler.step_update(pos.global_step - self.stage_start_step)
            self.metrics.add(loss, images.shape[0], pos.step_in_epoch)
            self.progress.update(task, advance=1)
        self.progress.remove_task(task)
        self._sync_point(None, 0.0)  # no epoch ends on a non-finite loss
        seconds = time.perf_counter() - start
        self._end_epoch(epoch, seconds, images_seen)
        return True

    def _skip_bad(self, bad) -> None:
        """Unreadable training images: a warning per file, counted; fatal with --strict-data
        (all ranks agree, so none waits forever for the others)."""
        if self.cfg.strict_data:
            n_bad = all_reduce_sum([float(len(bad))], self.info, self.device)[0]
            if n_bad:
                self.save_resume()
                first = bad[0].message() if bad else "an unreadable image on another process"
                raise TrainingStopped(
                    f"{first} (--strict-data); remove or replace it, then continue with "
                    f"recu binarize --resume {self.run_dir}",
                    exit_code=1,
                )
        for item in bad:
            if self.skipped.add(item.path):
                self.log(f"warning: skipped {item.message()}")

    def _sync_point(self, task: Any, rate: float, save_wanted: bool = False) -> None:
        """The loop's host sync: stop when any rank saw a non-finite loss (nothing is saved,
        the last good checkpoint stays), agree on Ctrl-C, write a resume point when one is
        due (--checkpoint-interval; only here, after the non-finite check, and on every rank
        at once), log at --log-interval."""
        cfg, pos = self.cfg, self.pos
        seen = self.metrics.sync(self.stop.requested, self.info, save_wanted=save_wanted)
        if seen.bad_ranks:
            raise self._non_finite(seen)
        self.stop_agreed = seen.stop
        if seen.save and not seen.stop and 0 < pos.step_in_epoch < self.steps_per_epoch:
            self.save_resume()
        if task is None:
            return
        self.progress.update(task, info=f"loss {seen.last_loss:.4f}  {rate:.0f} img/s")
        if cfg.log_interval and pos.step_in_epoch % cfg.log_interval == 0:
            self.log(
                f"epoch {pos.epoch + 1} step {pos.step_in_epoch}/{self.steps_per_epoch} "
                f"loss {seen.last_loss:.4f} lr {self._lr():.3g} {rate:.0f} img/s"
            )

    def _non_finite(self, seen: SyncResult) -> TrainingStopped:
        shutdown(self.info)
        where = (
            f"loss became {seen.bad_loss} at epoch {self.pos.epoch + 1} step {seen.bad_step}"
            if seen.bad_step >= 0
            else f"loss became nan or inf on another process in epoch {self.pos.epoch + 1}"
        )
        return TrainingStopped(
            f"{where}; stopped without saving anything. Lower --lr (now "
            f"{self.cfg.base_lr:g}) or set --clip-grad; the last good checkpoint is kept in "
            f"{self.run_dir}",
            exit_code=1,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        """--amp's autocast; nothing at all without it."""
        if not self.amp_enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the loss as a device tensor (no host sync here)."""
        cfg = self.cfg
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            logits = self.ddp_model(images)
            loss = F.cross_entropy(logits.float(), targets)
            if self.teacher is not None:
                with torch.no_grad():
                    soft = self.teacher(images)
                kd = distillation_loss(logits, soft, cfg.kd_temperature)
                loss = (1.0 - cfg.kd_weight) * loss + cfg.kd_weight * kd
            if self.features is not None:
                student_tap, teacher_tap = self.features
                at = attention_loss(student_tap.take(), teacher_tap.take())
                loss = loss + cfg.feature_kd * at
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    @torch.no_grad()
    def _validate(self, model: nn.Module | None = None) -> EvalResult:
        """In fp32 even with --amp, as `recu eval` measures the saved model: val_top1 and
        the choice of best are the numbers the checkpoint gives. Sums stay on the device:
        one host read per validation."""
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # top-1, top-5, loss
        n = 0
        for batch in self.val_loader:
            fail_on_bad(batch)
            images, targets = batch
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            sums += batch_sums(model(images), targets)
            n += targets.numel()
        model.train(was_training)
        totals = torch.cat([sums, sums.new_tensor([float(n)])])
        c1, c5, loss_sum, n_all = agree(totals, self.info).tolist()
        n_all = max(n_all, 1.0)
        return EvalResult(100.0 * c1 / n_all, 100.0 * c5 / n_all, loss_sum / n_all, int(n_all))

    def _end_epoch(self, epoch: int, seconds: float, images_seen: int) -> None:
        from recu_cli.stats import dead_weight_share

        last = self.pos.epoch + 1 == self.cfg.epochs
        if last and self.cfg.bn_recalib:
            self._reestimate_batchnorm()
        sync_buffers(self.model, self.info)
        val = self._validate()
        skipped = all_reduce_sum([float(self.skipped.epoch)], self.info, self.device)[0]
        flips = self.flips.rates(self.model)
        row = {
            "epoch": epoch + 1,
            "stage": self.stage,
            "lr": self._lr(),
            "tau": float(binary_layers(self.model)[0][1].tau),
            "train_loss": self.metrics.epoch_mean(self.info),
            "val_top1": val.top1,
            "val_top5": val.top5,
            "val_loss": val.loss,
            "dead_share": dead_weight_share(self.model),
            **flips,
            "seconds": seconds,
            "img_per_s": images_seen * self.info.world_size / max(seconds, 1e-9),
            "skipped_images": int(skipped),
        }
        self.history.append(row)
        self.pos.epoch += 1
        self.pos.step_in_epoch = 0
        binary = self.stage == 2  # a stage-1 model has real weights: nothing to pack yet
        is_best = binary and val.top1 > self.pos.best_top1
        if is_best:
            self.pos.best_top1 = val.top1
        if self.info.is_main:  # summary.csv last: it never lists an epoch that is not saved
            if binary:
                self._save_checkpoint("last", row)
            if is_best:
                self._save_checkpoint("best", row)
        self.save_resume()
        if self.info.is_main:
            self._write_summary()
        barrier(self.info)
        self.log(
            f"epoch {row['epoch']}/{self.cfg.epochs}: train loss {row['train_loss']:.4f}  "
            f"val top-1 {val.top1:.2f}%  top-5 {val.top5:.2f}%  tau {row['tau']:.4f}  "
            f"dead {100 * row['dead_share']:.1f}%  flips {100 * flips['flip_rate']:.2f}% "
            f"(tail {100 * flips['flip_rate_tail']:.2f}%, "
            f"core {100 * flips['flip_rate_core']:.2f}%)"
            f"  {row['seconds']:.0f}s {row['img_per_s']:.0f} img/s"
            + ("  *best*" if is_best else "")
            + ("  (stage 1: real weights, no packed checkpoint yet)" if not binary else "")
        )

    def _reestimate_batchnorm(self) -> None:
        """BatchNorm statistics recomputed on training images with the final weights."""
        from recu_cli.calibrate import image_batches, reestimate_batchnorm

        self.sampler.set_epoch(self.cfg.epochs, 0)
        with torch.random.fork_rng(devices=[]):
            batches = image_batches(self.train_loader, self.cfg.bn_recalib)
            used = reestimate_batchnorm(self.model, batches, self.device)
        self.log(f"BatchNorm statistics re-estimated on {used} training batches")

    def _write_summary(self) -> None:
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for r in self.history:
            old = {"skipped_images": 0}  # rows of runs started before the column existed
            writer.writerow({k: _fmt(r.get(k, old.get(k, ""))) for k in SUMMARY_FIELDS})
        write_bytes(self.run_dir / "summary.csv", buf.getvalue().encode())


class _StopOnSigint:
    """First Ctrl-C: finish the current step, then stop cleanly with a resume point.
    Second Ctrl-C: stop at once (files already written stay intact: they are atomic)."""

    REPEAT_S = 1.0  # under torchrun a terminal's Ctrl-C arrives twice (direct + forwarded)

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._first = 0.0
        self._torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1

    def __enter__(self) -> _StopOnSigint:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if self._torchrun and time.monotonic() - self._first < self.REPEAT_S:
                return
            raise KeyboardInterrupt
        self.requested = True
        self._first = time.monotonic()

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the training process: it stops at a step (or, under
    torchrun, a sync point) that every rank reaches, which dead loaders would not allow."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _if_exists(path: Path) -> str | None:
    """A checkpoint path, or None when the run ended in stage 1 (nothing binary to pack)."""
    return str(path) if path.is_file() else None


def describe_step0(step0: dict[str, Any]) -> str:
    """One line: what conversion kept, before any training step."""
    parts = []
    if "fp_top1" in step0:
        parts.append(f"full precision {step0['fp_top1']:.2f}%")
    for key, label in (("before", "converted"), ("after", "after calibration")):
        d = step0.get(key)
        if d:
            acc = f" {d['top1']:.2f}%" if "top1" in d else ""
            parts.append(f"{label}{acc} ({100 * d['one_sided_share']:.1f}% one-sided channels)")
    return ", ".join(parts)


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _version() -> str:
    from recu_cli import __version__

    return __version__


def load_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    if path.is_file() and not (run_dir / "resume.pt").is_file():
        raise RecuError(
            f"{run_dir} was stopped before its first resume point (written when training "
            "starts), so there is nothing to continue; start it again with the same "
            f"command (its settings are in {path})"
        )
    if not (run_dir / "resume.pt").is_file() or not path.is_file():
        raise RecuError(
            f"{run_dir} is not a resumable run (needs config.json and resume.pt); "
            "give the run folder printed at the start of training"
        )
    try:
        payload = json.loads(path.read_text())
        return TrainConfig.from_dict(payload["train"])
    except (ValueError, KeyError, TypeError) as e:
        raise RecuError(f"{path} is damaged ({e}); start a new run") from e


def check_world_size(run_dir: Path, saved: int | None, current: int) -> None:
    """Steps per epoch, the schedule's length and each rank's shard depend on it."""
    if saved is not None and saved != current:
        how = f"torchrun --nproc_per_node {saved} -m recu_cli" if saved > 1 else "recu"
        raise RecuError(
            f"{run_dir} was trained by {saved} process(es), this resume has "
            f"{current}: resume with the same number ({how} binarize --resume {run_dir})"
        )


def read_position(run_dir: Path, world_size: int | None = None) -> Position:
    """Where a run's resume point is (memory-mapped: reads only the small part); with
    world_size, also refuse a resume point written by another number of processes."""
    path = run_dir / "resume.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        position = Position(**state["position"])
        saved = state.get("world_size")
    except Exception as e:  # noqa: BLE001 - any damage means the same thing to the user
        raise RecuError(
            f"cannot resume from {path} ({type(e).__name__}); the file is damaged or from "
            "another run: start a new run"
        ) from e
    if world_size is not None:
        check_world_size(run_dir, int(saved) if saved is not None else None, world_size)
    return position
