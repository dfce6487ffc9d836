"""Optimizer, parameter groups, stages and schedules (learning rate and tau)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recu_cli.binarize.tau import tau_schedule
from recu_cli.bnn import binary_layers
from recu_cli.devices import default_amp_dtype
from recu_cli.training.config import TrainConfig
from recu_cli.training.distributed import DistInfo


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


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, options: dict[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The run's optimizer; `options` are implementation flags that do not change the
    maths (fused, capturable: `optimizer_options` below)."""
    groups = param_groups(
        model, cfg.base_lr, cfg.weight_decay, cfg.other_lr_scale, cfg.other_weight_decay
    )
    kw = dict(options or {})
    if cfg.opt == "sgd":
        kw.pop("capturable", None)  # SGD has no such flag (and no CUDA graphs: fast_step.py)
        return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, nesterov=True, **kw)
    if cfg.opt == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.base_lr, **kw)
    return torch.optim.Adam(groups, lr=cfg.base_lr, **kw)


IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable")


def settle_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict`: this run's implementation flags (the file holds those of the
    run that saved it, which load_state_dict restores), and each `step` counter where they
    want it: on the parameter's device for fused or capturable Adam, else on the CPU.
    Changes nothing when the flags are the saved ones (an eager CPU resume stays exact)."""
    for group in optimizer.param_groups:
        for key in IMPLEMENTATION_FLAGS:
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            step = state.get("step") if state else None
            if isinstance(step, torch.Tensor):
                where = p.device if on_device else torch.device("cpu")
                state["step"] = step.to(device=where, dtype=torch.float32)


def restart_moments(optimizer: torch.optim.Optimizer, in_place: bool) -> None:
    """Adam's moments (and step counts, SGD's momentum) start again from zero. In place for
    a compiled or captured step, whose graph holds these very tensors; dropped otherwise
    (the same numbers: fresh state is zeros)."""
    if not in_place:
        optimizer.state.clear()
        return
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()


# --compile auto compiles on CUDA. The first H200 run's compiled step (torch 2.11) did not
# train: its latent weights froze in stage 2 (39 % val against 68 % eager; performance.md).
# The suspected cause is rewritten (layers.py, mixed_weight) but not yet measured on a GPU,
# so every compiled run checks its gradients against the eager step's at each stage's first
# batch and goes on eagerly where they differ (step_check.py): a fault costs speed, not the
# run. bench/gpu_check.py's `equal` part measures it over many steps.


def compile_enabled(mode: str, device: torch.device, distributed: bool = False) -> bool:
    """--compile on, or auto on CUDA for one process. Off on the CPU, where inductor's C++
    compile costs minutes and its step measures no faster than the hand-tuned eager one
    (performance.md); off under torchrun, whose compiled step (graphs split at DDP's
    buckets) has not run on a GPU yet (docs/usage.md, --compile)."""
    if mode == "auto":
        return device.type == "cuda" and not distributed
    return mode == "on"


def optimizer_options(cfg: TrainConfig, device: torch.device, info: DistInfo) -> dict:
    """Optimizer flags for a compiled run on CUDA: fused kernels, and, where the step can
    be one CUDA graph, capturable Adam/AdamW (step counters on the device, no host read).
    Same maths; none of it on the CPU, whose eager training stays bit for bit what it was."""
    if device.type != "cuda" or not compile_enabled(cfg.compile, device, info.enabled):
        return {}
    if cfg.opt == "sgd":
        return {"fused": True}
    amp_dtype = cfg.amp_dtype
    if amp_dtype == "auto":
        amp_dtype = default_amp_dtype(device)
    fp16_scaler = cfg.amp and amp_dtype == "fp16"
    return {"fused": True, "capturable": not (info.enabled or fp16_scaler)}


def stage_bounds(cfg: TrainConfig, stage: int) -> tuple[int, int]:
    """[first, end) epochs of a stage: stage 1 = binary activations with real weights (only
    with --stage1-epochs), stage 2 = binary weights too (the whole run with one stage)."""
    if stage == 1:
        return 0, cfg.stage1_epochs
    return cfg.stage1_epochs, cfg.epochs


def stage_of(cfg: TrainConfig, epoch: int) -> int:
    return 1 if epoch < cfg.stage1_epochs else 2


def stage_peak_scale(cfg: TrainConfig, stage: int) -> float:
    """Stage 2 of a two-stage run restarts its cosine at --stage2-lr-scale times the peak."""
    return cfg.stage2_lr_scale if stage == 2 and cfg.stage1_epochs else 1.0


def set_stage_peaks(optimizer: torch.optim.Optimizer, cfg: TrainConfig, stage: int) -> None:
    """Each group's peak for this stage, where timm's scheduler reads it (`initial_lr`).
    `peak_lr` keeps the run's own peak (the group's lr when the optimizer was built) and
    travels in the optimizer's state_dict; a run saved before it existed had no stage scale,
    so its `initial_lr` is that peak."""
    scale = stage_peak_scale(cfg, stage)
    for group in optimizer.param_groups:
        peak = group.setdefault("peak_lr", group.get("initial_lr", group["lr"]))
        group["initial_lr"] = peak * scale


def lr_share(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate's share of its stage's peak, in (0, 1] while the cosine runs: every
    group follows the same schedule, so the first (the latent binary weights) speaks for
    all. A host-side float (group["lr"] is a Python float outside a graph capture)."""
    group = optimizer.param_groups[0]
    peak = float(group.get("initial_lr", group["lr"]))
    return min(1.0, float(group["lr"]) / peak) if peak > 0 else 1.0


def cycle_bounds(cfg: TrainConfig, stage: int, total: int, steps_per_epoch: int) -> list[int]:
    """The steps (from the stage's start) where its cosines begin: stage 2's
    one-epoch cycles (TrainConfig.short_cycles_in_use), then the rest; a cycle past `total`
    (a stage cut by --max-steps) is dropped, so the last one kept ends there."""
    short = cfg.short_cycles_in_use if stage == 2 else 0
    starts = [k * steps_per_epoch for k in range(short + 1)]
    return [s for s in starts if s < total] or [0]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    steps_per_epoch: int,
    stage: int = 2,
    start_step: int | None = None,
) -> CosineCycles:
    """timm's cosine schedule with linear warm-up, stepped per update, over one stage (each
    stage of a two-stage run gets its own warm-up and cosine, as in ReActNet), or over each
    of its cycles. `start_step`: the global step the stage began at (default: its first
    epoch's first step); the scheduler is then stepped with the steps taken since."""
    from timm.scheduler import CosineLRScheduler

    set_stage_peaks(optimizer, cfg, stage)
    first, end = stage_bounds(cfg, stage)
    total = (end - first) * steps_per_epoch
    if start_step is None:
        start_step = first * steps_per_epoch
    if cfg.max_steps:
        total = max(1, min(total, cfg.max_steps - start_step))
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    starts = cycle_bounds(cfg, stage, total, steps_per_epoch)
    cycles = []
    for begin, stop in zip(starts, [*starts[1:], total], strict=True):
        cosine = CosineLRScheduler(
            optimizer,
            t_initial=max(1, stop - begin - (warmup if begin == 0 else 0)),
            lr_min=cfg.min_lr,
            warmup_t=warmup if begin == 0 else 0,  # the stage's warm-up, once
            warmup_lr_init=cfg.warmup_lr,
            warmup_prefix=True,
            t_in_epochs=False,
        )
        cycles.append((begin, cosine))
    return CosineCycles(cycles)


class CosineCycles:
    """Consecutive timm cosines, each stepped with the updates since its own start (the
    learning rate restarts at the peak where the next begins)."""

    def __init__(self, cycles: list[tuple[int, Any]]) -> None:
        self.cycles = cycles

    def step_update(self, num_updates: int) -> None:
        """Before the first cycle's start (a resumed run's stage entered ahead of its
        switch, which then enters it again where the run stands) timm's cosine answers."""
        begin, cosine = self.cycles[0]
        for b, c in self.cycles[1:]:
            if num_updates >= b:
                begin, cosine = b, c
        cosine.step_update(num_updates - begin)


def tau_at(cfg: TrainConfig, steps_per_epoch: int, epoch: int, step: int) -> float:
    """ReCU's schedule spans stage 2 (the whole run when there is one stage)."""
    first, end = stage_bounds(cfg, 2)
    e = max(0, epoch - first)
    e += step / steps_per_epoch if cfg.tau_update == "step" else 0.0
    return tau_schedule(e, end - first, cfg.tau_min, cfg.tau_max)
