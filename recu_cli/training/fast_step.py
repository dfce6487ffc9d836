"""`--compile`: the training step compiled, and on CUDA captured as one graph.

A ReCU step launches hundreds of small kernels (each binary layer's sign, rescale and
weight path, forward and backward); on a GPU the host cannot launch them as fast as the
GPU runs them. Three things remove that, each falling back to the next slower one with one
line in train.log when it fails, so a run never stops for them:

1. `torch.compile` of the step's forward and loss (`steps.forward_loss`: student, teacher,
   distillation), fullgraph: the layers trace without graph breaks (binarize/), and the
   stage switch and tau are tensors, so nothing recompiles during a run. The backward is
   compiled with it; the optimizer is fused on CUDA (`optim.optimizer_options`).
2. On CUDA, the whole step (compiled forward, backward, clipping, Adam) captured once as a
   CUDA graph after a few warm-up steps and replayed for every batch of the same shape:
   one launch per step. The batch is copied into static input buffers, each group's
   learning rate into a device tensor that the captured Adam reads (timm's scheduler keeps
   writing Python floats into the param groups; `_replay` copies them in), tau and the
   stage switch are filled in place, and the switch's fresh Adam moments are zeros written
   in place (optim.restart_moments). Skipped (one line) under DDP, with fp16's grad scaler,
   and with SGD (its tensor learning rate is read on the host).
3. Without either: the eager step (steps.py).

The compiled step is checked against the eager one at the first batch of each stage (and of
a resumed run): step_check.py compares the gradients of that batch; where they differ, or
compiling fails, the run continues eagerly with one line in train.log.

A batch of another shape (unreadable images dropped from it) runs the eager step, so the
compiled step never recompiles for it. Validation, calibration and BatchNorm re-estimation
run the plain model eagerly (eval mode, any batch size). The model object stays the plain
module (state_dict, resume.pt and packed files unchanged); only a separate callable is
compiled.

Warm-up (compilation, the graph's warm-up steps and capture) is timed on its own: train.log
states it once, and summary.csv's img/s leaves those steps out (its `seconds` is the
epoch's wall time, warm-up included).
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from recu_cli.training.config import TrainConfig
    from recu_cli.training.distributed import DistInfo
    from recu_cli.training.parts import Parts

from recu_cli.bnn import binary_layers  # noqa: E402
from recu_cli.training.optim import compile_enabled  # noqa: E402
from recu_cli.training.step_check import (  # noqa: E402
    Agreement,
    check_compiled_step,
    restore_buffers,
    saved_buffers,
)

GRAPH_WARMUP_STEPS = 3  # eager-compiled steps on a side stream before capture (CUDA docs)

Log = Callable[..., None]


def graph_obstacle(cfg: TrainConfig, parts: Parts, info: DistInfo) -> str | None:
    """Why the step cannot be one CUDA graph here (None: it can)."""
    if parts.device.type != "cuda":
        return "not on CUDA"
    if info.enabled:
        return "under torchrun (DDP's gradient hooks are not captured)"
    if parts.scaler.is_enabled():
        return "fp16 with a grad scaler (it reads found-inf on the host)"
    if cfg.opt not in ("adam", "adamw"):
        return f"--opt {cfg.opt} (its learning rate is read on the host each step)"
    if not all(g.get("capturable") for g in parts.optimizer.param_groups):
        return "the optimizer is not capturable"
    return None


def make_fast_step(
    cfg: TrainConfig, info: DistInfo, parts: Parts, log: Log, graphs: bool = True
) -> FastStep | None:
    """The run's FastStep, or None when --compile resolves to off here."""
    if not compile_enabled(cfg.compile, parts.device, info.enabled):
        return None
    return FastStep(cfg, info, parts, log, graphs=graphs)


def compile_failed(e: BaseException) -> str:
    return f"note: --compile failed ({_first_line(e)}); training continues eagerly"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class CudaGraphRunner:
    """One torch.cuda.CUDAGraph: `capture` records without running, `replay` runs."""

    tensor_lr = True  # the captured optimizer reads its learning rate from device tensors

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.output: Any = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> None:
        with torch.cuda.graph(self.graph):
            self.output = fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerRunner:
    """The CPU stand-in for CudaGraphRunner (tests): `replay` runs the captured callable on
    the same static buffers, so everything around the capture runs and is checked here."""

    tensor_lr = False  # CPU Adam takes Python floats (a tensor lr would round differently)

    def __init__(self) -> None:
        self.fn: Callable[[], torch.Tensor] | None = None
        self.output: Any = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn

    def replay(self) -> None:
        assert self.fn is not None
        self.output = self.fn()


class FastStep:
    """The compiled training step of one run, with its CUDA graph once captured.

    `compile=False` and `runner=EagerRunner` exist for tests: the same flow with the eager
    forward and a replay that reruns the step, which must equal the plain step bit for bit.
    `backend` is torch.compile's (bench/gpu_check.py --dry-run traces without inductor).
    """

    def __init__(
        self, cfg: TrainConfig, info: DistInfo, parts: Parts, log: Log, graphs: bool = True,
        compile: bool = True, runner: Callable[[], Any] | None = None,
        backend: str = "inductor",
    ) -> None:  # fmt: skip
        from recu_cli.training.steps import forward_loss

        self.cfg, self.parts, self.log = cfg, parts, log
        self.batch_size = cfg.batch_size
        self.eager_loss = functools.partial(forward_loss, cfg, parts)
        static_loss = functools.partial(forward_loss, cfg, parts, cache=False)
        self.compiled = compile
        self.loss_fn: Callable[..., torch.Tensor] = static_loss
        if compile:
            self.loss_fn = torch.compile(
                static_loss,
                fullgraph=not info.enabled,  # DDP splits the graph at its buckets
                dynamic=False,
                backend=backend,
            )
        self.ready = False  # the first step of loss_fn has run
        self.check_due = compile  # compare with the eager step at this stage's first batch
        self.check_label = "the run's first batch"
        self.latent = {f"{name}.weight" for name, _ in binary_layers(parts.model)}
        self.runner_factory = runner or CudaGraphRunner
        why_not = "not asked for" if not graphs else None
        if why_not is None and runner is None:
            why_not = graph_obstacle(cfg, parts, info)
        self.graph_wanted = why_not is None
        if why_not is not None and parts.device.type == "cuda":
            log(f"note: CUDA graphs off: {why_not}; compiled steps without them")
        self.warmup_left = GRAPH_WARMUP_STEPS
        self.runner: Any = None  # set once captured
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lrs: list[torch.Tensor] = []
        self.side_stream: Any = None
        self.warmup_seconds = 0.0  # of all warm-up steps so far
        self.warmup_images = 0
        self._unreported = (0.0, 0)  # warm-up not yet taken by an epoch's img/s
        self._announced = False

    # ---------------------------------------------------------------- the step
    def step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimizer step; the loss as a device tensor, not read on the host."""
        if images.shape[0] != self.batch_size:  # a short batch: eager, no recompile
            return self._eager(images, targets)
        if self.check_due:
            self.check_due = False
            if not self._checked(images, targets):
                return self._eager(images, targets)
        if self.runner is not None:
            return self._replay(images, targets)
        if self.graph_wanted:
            if self.warmup_left > 0:
                self.warmup_left -= 1
                return self._timed(self._side_stream_step, images, targets)
            return self._timed(self._capture, images, targets)
        if not self.ready:
            return self._timed(self._run, images, targets)
        return self._run(images, targets)

    def check_next_step(self, label: str) -> None:
        """Compare the compiled step with the eager one at the next full batch (a stage's
        first: the stage switch changes the graph's path through the weights)."""
        self.check_due, self.check_label = self.compiled, label

    def _checked(self, images: torch.Tensor, targets: torch.Tensor) -> bool:
        """step_check.py: True when the compiled gradients are the eager ones; otherwise
        (or when compiling fails) eager from here on, with one line. Timed as warm-up (it
        compiles at the run's first batch), with no images: it trains none."""
        _sync(self.parts.device)
        start = time.perf_counter()
        try:
            agreement = self.compare_with_eager(images, targets)
        except Exception as e:  # noqa: BLE001 - any compiler failure: continue eagerly
            self._fall_back(compile_failed(e))
            return False
        finally:
            _sync(self.parts.device)
            self._add_warmup(time.perf_counter() - start, 0)
        if agreement.ok:
            self.log(
                f"compiled step checked against the eager step on {self.check_label}: "
                f"{agreement.describe()}"
            )
            return True
        self._fall_back(
            f"note: the compiled step's gradients differ from the eager step's on "
            f"{self.check_label} ({agreement.describe()}): a compiler fault; training "
            "continues eagerly (please report it with this train.log)"
        )
        return False

    def compare_with_eager(self, images: torch.Tensor, targets: torch.Tensor) -> Agreement:
        """This batch's gradients, compiled step against eager (step_check.py); changes
        nothing (bench/gpu_check.py asks it without falling back)."""
        return check_compiled_step(
            self.parts.model, self.parts.ddp_model, self.latent, self.eager_loss,
            self.loss_fn, images, targets,
        )  # fmt: skip

    def _fall_back(self, line: str) -> None:
        """Eager steps for the rest of the run (the captured graph, if any, is dropped)."""
        self.parts.optimizer.zero_grad(set_to_none=True)
        self.compiled = self.graph_wanted = False
        self.runner = self.static = None
        self.loss_fn = self.eager_loss
        self.ready = True
        self.log(line)

    def _eager(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from recu_cli.training.steps import apply_gradients

        return apply_gradients(self.cfg, self.parts, self.eager_loss(images, targets))

    def _run(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The compiled step; at its first call a failure to compile falls back to eager."""
        from recu_cli.training.steps import apply_gradients

        if self.ready or not self.compiled:
            self.ready = True
            return apply_gradients(self.cfg, self.parts, self.loss_fn(images, targets))
        # a failed first compiled step may have run its forward (and updated BatchNorm's
        # statistics) before its backward failed to compile
        saved = saved_buffers(self.parts.model)
        try:
            loss = apply_gradients(self.cfg, self.parts, self.loss_fn(images, targets))
        except Exception as e:  # noqa: BLE001 - any compiler failure: continue eagerly
            restore_buffers(self.parts.model, saved)
            self._fall_back(compile_failed(e))
            loss = self._eager(images, targets)
        self.ready = True
        return loss

    def _side_stream_step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A warm-up step before capture, on a side stream as CUDA graphs require."""
        if self.parts.device.type != "cuda":
            return self._run(images, targets)
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream(self.parts.device)
        main = torch.cuda.current_stream(self.parts.device)
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream), _quiet_capturable_warning():
            loss = self._run(images, targets)
        main.wait_stream(self.side_stream)
        return loss

    def _capture(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Capture the whole step on static buffers, then replay it for this batch; when
        capture fails, one line and compiled steps without graphs from here on."""
        if not self.graph_wanted:  # the warm-up fell back to eager
            return self._run(images, targets)
        opt = self.parts.optimizer
        runner = self.runner_factory()
        floats = [g["lr"] for g in opt.param_groups]
        if not self.lrs:
            device = self.parts.device
            self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in floats]
        self.static = (images.clone(), targets.clone())  # clone keeps channels-last
        for group, lr, value in zip(opt.param_groups, self.lrs, floats, strict=True):
            lr.fill_(float(value))
            if runner.tensor_lr:
                group["lr"] = lr  # what the captured Adam reads; refilled before each replay
        opt.zero_grad(set_to_none=True)  # gradients get allocated in the graph's pool
        try:
            runner.capture(functools.partial(self._run, *self.static))
            failed = None
        except Exception as e:  # noqa: BLE001 - capture is an optimisation: continue without
            failed = e
        for group, value in zip(opt.param_groups, floats, strict=True):
            group["lr"] = value  # Python floats for the scheduler, logs and state_dict
        if failed is not None:
            opt.zero_grad(set_to_none=True)
            self.graph_wanted, self.static = False, None
            self.log(
                f"note: CUDA graph capture failed ({_first_line(failed)}); compiled steps "
                "without graphs from here on"
            )
            return self._run(images, targets)
        self.runner = runner
        runner.replay()
        return runner.output.clone()

    def _replay(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        assert self.static is not None
        static_images, static_targets = self.static
        static_images.copy_(images, non_blocking=True)
        static_targets.copy_(targets, non_blocking=True)
        for group, lr in zip(self.parts.optimizer.param_groups, self.lrs, strict=True):
            lr.fill_(float(group["lr"]))  # a Python float: a kernel argument, no sync
        self.runner.replay()
        return self.runner.output.clone()  # the static loss is overwritten by the next replay

    # ------------------------------------------------------------ warm-up time
    def _timed(self, fn: Callable[..., torch.Tensor], images, targets) -> torch.Tensor:
        """A warm-up step, timed to its end on the device (warm-up may sync)."""
        _sync(self.parts.device)
        start = time.perf_counter()
        loss = fn(images, targets)
        _sync(self.parts.device)
        self._add_warmup(time.perf_counter() - start, images.shape[0])
        if self.warmed_up and not self._announced:
            self._announced = True
            self.log(self.describe())
        return loss

    def _add_warmup(self, seconds: float, images: int) -> None:
        self.warmup_seconds += seconds
        self.warmup_images += images
        s, n = self._unreported
        self._unreported = (s + seconds, n + images)

    @property
    def warmed_up(self) -> bool:
        return self.runner is not None or (not self.graph_wanted and self.ready)

    @property
    def mode(self) -> str:
        graph = ""
        if self.runner is not None:
            graph = " + CUDA graph" if self.runner.tensor_lr else " + replayed step (CPU)"
        return ("compiled" if self.compiled else "eager") + graph

    def describe(self) -> str:
        return (
            f"training step: {self.mode}, warm-up {self.warmup_seconds:.1f} s over "
            f"{self.warmup_images} images (left out of summary.csv's img/s)"
        )

    def take_warmup(self) -> tuple[float, int]:
        """Warm-up seconds and images since the last call (the epoch's share)."""
        out, self._unreported = self._unreported, (0.0, 0)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_capturable_warning():
    """Capturable Adam warns when it steps outside a graph: the warm-up steps do, by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        yield
