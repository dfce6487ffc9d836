"""The parts a run trains with, built once from its config: model (converted), teacher,
data and loaders, optimizer, mixed precision. Built in a fixed order, so that a resumed run
meets the same random streams as the uninterrupted one."""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recu_cli.bnn import ConversionReport, binary_layers, check_keep, convert_model
from recu_cli.data import DataBundle, build_data, make_loader
from recu_cli.devices import default_amp_dtype, default_workers
from recu_cli.errors import RecuError
from recu_cli.fastdata.choice import DataPathChoice, choose
from recu_cli.imagecheck import check_tree, collate
from recu_cli.models.create import create_model, reset_head
from recu_cli.spec import ModelSpec
from recu_cli.training.average import WeightAverage, average_for
from recu_cli.training.config import TrainConfig
from recu_cli.training.device_scalar import DeviceScalar
from recu_cli.training.distill import FeatureTap, feature_points
from recu_cli.training.distributed import DistInfo
from recu_cli.training.optim import build_optimizer, optimizer_options
from recu_cli.training.sampling import EpochBatchSampler, SeededItems
from recu_cli.training.signals import ignore_sigint
from recu_cli.training.switch import SignPenalty

Log = Callable[..., None]


@dataclass
class Parts:
    device: torch.device
    model: nn.Module
    ddp_model: nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    spec: ModelSpec
    report: ConversionReport
    data: DataBundle
    sampler: EpochBatchSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # None: no autocast
    teacher: nn.Module | None = None
    features: tuple[FeatureTap, FeatureTap] | None = None  # student's and teacher's taps
    attention_weight: DeviceScalar | None = None  # the stage's weight of their loss
    original: nn.Module | None = None  # the unconverted model, for step 0 (then dropped)
    data_path: DataPathChoice | None = None  # which loaders (fastdata/choice.py) and why
    fast: Any = None  # --compile: the compiled (CUDA-graph) step, training/fast_step.py
    sign_penalty: SignPenalty | None = None  # --binarize-penalty's weight (training/switch.py)
    average: WeightAverage | None = None  # --ema-decay's average (training/average.py)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def packed_model(self) -> nn.Module:
        """What is validated and packed: the average with --ema-decay, else the model."""
        return self.model if self.average is None else self.average.synced(self.model)

    def state_dicts(self) -> dict[str, Any]:
        """What resume.pt holds of the parts (loaded back by the trainer)."""
        saved = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.average is not None:
            saved["average"] = self.average.state_dict()
        return saved


def build_parts(
    cfg: TrainConfig, info: DistInfo, device: torch.device, log: Log, resuming: bool
) -> Parts:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, spec = create_model(
        cfg.model, num_classes=cfg.num_classes, pretrained=cfg.pretrained, weights=cfg.weights
    )
    data = build_data(cfg.data, spec, train=True)
    check_tree(data.val, "the validation images")  # seconds now, not after an epoch
    n_data = len(data.classes)
    head_reset = spec.num_classes != n_data
    if head_reset:
        if cfg.num_classes is not None:
            raise RecuError(
                f"--num-classes {cfg.num_classes} but {cfg.data} has {n_data} classes; "
                "drop --num-classes or fix the data"
            )
        spec = reset_head(model, spec, n_data)
        log(f"note: new {n_data}-class classifier for {cfg.data} (initialised at random)")
    if cfg.weights is None and not cfg.pretrained:
        log("note: no --weights/--pretrained given: training from random initialisation")
    original = copy.deepcopy(model) if cfg.step0_eval and not resuming else None
    teacher = _teacher(cfg, model, head_reset, n_data, device, log)
    if not resuming:
        check_keep(model, cfg.convert.keep)
    model, report = convert_model(model, cfg.convert)
    if not binary_layers(model):
        raise RecuError(f"{cfg.model} has no layer to binarize; see `recu convert --dry-run`")
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    ddp_model: nn.Module = model
    if info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    sampler, train_loader, val_loader, data_path = build_loaders(cfg, info, device, data, spec, log)
    log(data_path.line)
    optimizer = build_optimizer(model, cfg, optimizer_options(cfg, device, info))
    amp_dtype, scaler = _amp(cfg, device, log, resuming)
    average = average_for(model, cfg)
    features = _feature_taps(cfg, model, teacher)
    # the attention loss's weight: set again where each stage begins (EpochLoop.enter_stage)
    weight = None if features is None else DeviceScalar(cfg.feature_kd, device)
    return Parts(
        device, model, ddp_model, spec, report, data, sampler, train_loader, val_loader,
        optimizer, scaler, amp_dtype, teacher, features, weight, original, data_path,
        sign_penalty=_sign_penalty(cfg, device), average=average,
    )  # fmt: skip


def _sign_penalty(cfg: TrainConfig, device: torch.device) -> SignPenalty | None:
    """Stage 1's binarization penalty, where there is a stage 1 and a weight for it."""
    if not (cfg.binarize_penalty and cfg.stage1_epochs):
        return None
    return SignPenalty(cfg.binarize_penalty, device)


def build_loaders(
    cfg: TrainConfig, info: DistInfo, device: torch.device, data: DataBundle, spec: ModelSpec,
    log: Log,
) -> tuple[EpochBatchSampler, Any, Any, DataPathChoice]:  # fmt: skip
    """The seeded, resumable training batches of this rank, and its share of validation,
    on the data path --data-path picks (fastdata/choice.py; 'auto' resolved here and
    stored with the run)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = default_workers(device, local_world) if cfg.workers is None else cfg.workers
    n_train = len(data.train)
    sampler = EpochBatchSampler(n_train, cfg.batch_size, cfg.seed, info.rank, info.world_size)
    if len(sampler) == 0:
        raise RecuError(
            f"the training set ({n_train} images) is smaller than one batch per "
            f"process; lower -b (now {cfg.batch_size})"
        )
    pin = device.type == "cuda"
    val_batch = max(cfg.batch_size, 64)
    # Each loader draws its workers' base seed from its own generator: from the global
    # one, every iter() (one more after each resume) would shift the stream the training
    # step draws from, and resume.pt's RNG would differ from the uninterrupted run's.
    # SeededItems seeds each item itself, so the base seed does not change the data.

    def train_loader(ds: Any, collate_fn: Any) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            SeededItems(ds, cfg.seed),
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
            worker_init_fn=ignore_sigint,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def val_loader(ds: Any, collate_fn: Any) -> torch.utils.data.DataLoader:
        if info.enabled:
            ds = torch.utils.data.Subset(ds, list(range(info.rank, len(ds), info.world_size)))
        return make_loader(
            ds, val_batch, workers, pin_memory=pin, collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(cfg.seed + 1),
        )  # fmt: skip

    val_indices = list(range(info.rank, len(data.val), info.world_size)) if info.enabled else None
    fast = choose(
        cfg.data_path, device, data, spec, cfg.seed, sampler, val_batch, val_indices, workers,
        train_loader, val_loader, log,
    )  # fmt: skip
    cfg.data_path = fast.choice.path
    if fast.train is None:  # the PIL path
        fast.train, fast.val = train_loader(data.train, collate), val_loader(data.val, collate)
    return sampler, fast.train, fast.val, fast.choice


def _amp(
    cfg: TrainConfig, device: torch.device, log: Log, resuming: bool
) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """Autocast in --amp-dtype ('auto' resolved here and stored with the run), on CUDA
    and on the CPU (the same code path, which is how the tests see it); a grad scaler
    with fp16 only."""
    if cfg.amp_dtype == "auto":
        cfg.amp_dtype = default_amp_dtype(device)
    dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    fp16 = dtype == torch.float16
    if cfg.amp and not resuming:
        log(
            f"mixed precision: {cfg.amp_dtype} autocast"
            + (" with a grad scaler" if fp16 else "")
            + (
                " (on the CPU: the code path of CUDA, for testing; most CPUs train faster in fp32)"
                if device.type == "cpu"
                else ""
            )
        )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and fp16)
    return (dtype if cfg.amp else None), scaler


def _teacher(
    cfg: TrainConfig, model: nn.Module, head_reset: bool, n_classes: int, device: torch.device,
    log: Log,
) -> nn.Module | None:  # fmt: skip
    if cfg.teacher == "none" or cfg.kd_weight == 0:
        return None
    if cfg.teacher == "self":
        if cfg.weights is None and not cfg.pretrained:
            log("note: --teacher self without pretrained weights: distillation off")
            return None
        if head_reset:
            log(
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
        if t_spec.num_classes != n_classes:
            raise RecuError(
                f"teacher {cfg.teacher} predicts {t_spec.num_classes} classes but "
                f"{cfg.data} has {n_classes}; give a teacher trained on this data"
            )
    teacher.eval().requires_grad_(False)
    if cfg.channels_last:  # it sees the student's channels-last images
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher.to(device)


def _feature_taps(
    cfg: TrainConfig, model: nn.Module, teacher: nn.Module | None
) -> tuple[FeatureTap, FeatureTap] | None:
    if not cfg.feature_kd or teacher is None:
        return None
    points = feature_points(model, teacher)
    if not points:
        raise RecuError(
            f"--feature-kd: {cfg.model} and its teacher share no stage to match "
            "(they need ResNet stages of the same names); set --feature-kd 0"
        )
    return FeatureTap(model, points), FeatureTap(teacher, points)
