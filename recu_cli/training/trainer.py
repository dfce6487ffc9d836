"""Trainer: ties a run's folder, parts, state and loop together, from start to result."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recu_cli.data import calibration_images
from recu_cli.devices import bind_device, configure_backends, pick_device
from recu_cli.errors import RecuError
from recu_cli.progress import make_progress
from recu_cli.step0 import describe_step0, step0_numbers
from recu_cli.training.config import TrainConfig
from recu_cli.training.distributed import barrier, init_distributed, shutdown
from recu_cli.training.fast_step import make_fast_step
from recu_cli.training.loop import EpochLoop
from recu_cli.training.optim import settle_optimizer, stage_of
from recu_cli.training.parts import Parts, build_parts
from recu_cli.training.resumeclock import ResumeClock
from recu_cli.training.run_folder import RunFolder, check_world_size, damaged
from recu_cli.training.signals import StopOnSigint
from recu_cli.training.state import TrainState, restore
from recu_cli.training.step_metrics import StepMetrics
from recu_cli.training.steps import validate
from recu_cli.training.trackers import weights_digest


class Trainer:
    """A new run (run_dir None: a folder is created) or the resumed run in run_dir.

    What it trains with is `parts` (model, optimizer, data, ...), where the run stands is
    `state` (position, history, scheduler, ...), and `loop` runs the epochs."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path | None = None,
        quiet: bool = False,
        resume_changes: list[str] | None = None,
        echo: Callable[[str], None] | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.quiet = quiet
        device = pick_device(cfg.device)
        configure_backends(device, cfg.deterministic)
        self.info = init_distributed(device.type)
        if self.info.enabled and device.type == "cuda":
            device = torch.device("cuda", self.info.local_rank)
        device = bind_device(device)
        self.resuming = run_dir is not None
        created = False
        if run_dir is None:
            self.run, created = RunFolder.create(
                cfg.output, cfg.experiment, cfg.model, self.info, quiet=quiet, echo=echo
            )
        else:
            self.run = RunFolder(run_dir, self.info, quiet=quiet, echo=echo)
        self.run_dir = self.run.path
        try:
            self.run.open(self.resuming)
            self.run.log_start(self.resuming)
            self._setup(device, list(resume_changes or []))
        except BaseException as e:
            self.run.log_end(e)
            self.run.close()
            if created:
                self.run.discard()
            raise

    def _setup(self, device: torch.device, resume_changes: list[str]) -> None:
        cfg, log = self.cfg, self.run.log
        self.parts: Parts = build_parts(cfg, self.info, device, log, self.resuming)
        self.state = TrainState(StepMetrics(device), ResumeClock(cfg.checkpoint_interval))
        self.loop = EpochLoop(cfg, self.info, self.parts, self.state, self.run)
        if self.resuming:
            self._load_resume()
            if resume_changes:
                self.run.write_config(cfg.to_dict(), self.parts.spec, self._data_path())
                log("settings changed on resume: " + ", ".join(resume_changes))
        else:
            self.run.write_config(cfg.to_dict(), self.parts.spec, self._data_path())
            with torch.random.fork_rng(devices=[]):  # leaves the training RNG stream as it was
                self.state.step0 = self._start_model(self.parts.original)
            if self.parts.average is not None:  # the calibrated thresholds
                self.parts.average.restart(self.parts.model)
        self.parts.original = None
        self.parts.fast = make_fast_step(cfg, self.info, self.parts, log)
        # where this process starts training (the result's `resumed_from`): the proof that
        # a resume continued the run instead of training it again from step 1
        self.resumed_from = self._where() if self.resuming else None
        self.loop.enter_stage(stage_of(cfg, self.state.pos.epoch), switching=False)
        if not self.resuming:
            self.loop.save_resume()  # the first resume point: a kill from here on loses little
            log("resume point saved (start of training)", echo=False)

    def _data_path(self) -> dict[str, str] | None:
        choice = self.parts.data_path
        return choice.to_dict() if choice is not None else None

    def _start_model(self, original: nn.Module | None) -> dict[str, Any]:
        """Step 0: calibrate the thresholds on training images (eval transforms) and measure
        what conversion lost (recu_cli/step0.py), through training's validation."""
        cfg, parts = self.cfg, self.parts
        images = calibration_images(parts.data, cfg.calib_images, cfg.seed).to(parts.device)
        top1 = (
            (lambda m: validate(parts, self.info, cfg.channels_last, m).top1)
            if cfg.step0_eval
            else None
        )
        if original is not None:
            original = original.to(parts.device)
        median = cfg.convert.act_threshold == "median"
        step0 = step0_numbers(parts.model, images, median, top1, original)
        self.run.log("step 0: " + describe_step0(step0))
        return step0

    def _load_resume(self) -> None:
        path = self.run.resume_path
        try:
            # on the CPU first: load_state_dict moves the model's and Adam's moments to the
            # parameters' device and leaves Adam's `step` on the CPU, where non-capturable
            # Adam wants it (a CUDA step costs a host sync per step)
            saved = torch.load(path, map_location="cpu", weights_only=True)
            check_world_size(self.run_dir, saved.get("world_size"), self.info.world_size)
            self.parts.model.load_state_dict(saved["model"])
            self.parts.optimizer.load_state_dict(saved["optimizer"])
            if self.parts.average is not None:
                self.parts.average.load_state_dict(saved["average"])
            settle_optimizer(self.parts.optimizer)  # this run's fused/capturable flags
            self._load_scaler(saved.get("scaler") or {})
        except RecuError:
            raise
        except Exception as e:  # noqa: BLE001 - any damage means the same thing to the user
            raise damaged(path, e) from e
        restore(saved, self.state, self.info, self.parts.device)
        if self.state.history:
            self.run.write_summary(
                self.state.history
            )  # a kill between resume.pt and summary.csv loses no row
        pos = self.state.pos
        self.run.log(
            f"resuming {self.run_dir} at epoch {pos.epoch + 1}, step "
            f"{pos.step_in_epoch} (global step {pos.global_step})"
        )

    def _where(self) -> dict[str, int]:
        """The position as train.log words it: the epoch it is in (from 1), the steps of
        that epoch already taken, the steps of the run already taken."""
        pos = self.state.pos
        return {
            "epoch": pos.epoch + 1,
            "step_in_epoch": pos.step_in_epoch,
            "global_step": pos.global_step,
        }

    def _load_scaler(self, saved: dict[str, Any]) -> None:
        """An empty state comes from a scaler that was off (bf16, fp32, or a machine
        without fp16 autocast): a scaler that is on now starts fresh, as a new run's does."""
        if not saved:
            if self.parts.scaler.is_enabled():
                self.run.log("note: resume.pt holds no grad-scaler state; starting a fresh scaler")
            return
        self.parts.scaler.load_state_dict(saved)

    @property
    def steps_per_epoch(self) -> int:
        return self.parts.steps_per_epoch

    @property
    def is_main(self) -> bool:
        """The process that prints and writes (the only one outside torchrun)."""
        return self.info.is_main

    def headline(self) -> str:
        """The first line a command prints: where the run goes and what it trains."""
        t = self.parts.report.totals(self.parts.model)
        return (
            f"run folder {self.run_dir}: {self.cfg.model} on {self.parts.data.source}, "
            f"{t['binary_layers']} binary layers ({t['binary_params']:,} binary weights), "
            f"{self.steps_per_epoch} steps/epoch, device {self.parts.device}"
        )

    def close(self) -> None:
        """Release the run folder (the process's exit would too)."""
        self.run.close()

    def fit(self) -> dict[str, Any]:
        """Train to the end; train.log gets the final line (done, interrupted or error)."""
        try:
            with (
                make_progress(self.quiet or not self.info.is_main) as progress,
                StopOnSigint() as stop,
            ):
                self.loop.run_epochs(progress, stop)
            return self._finish()
        except BaseException as e:
            self.run.log_end(e)
            raise
        finally:
            self.close()

    def _finish(self) -> dict[str, Any]:
        """Every rank's weights digest under torchrun, the done line, the result."""
        if self.info.enabled:
            line = (
                f"rank {self.info.rank}/{self.info.world_size}: final weights digest "
                f"{weights_digest(self.parts.model)}\n"
            )
            sys.stdout.flush()
            os.write(sys.stdout.fileno(), line.encode())  # one write: ranks share the pipe
        barrier(self.info)
        shutdown(self.info)
        history = self.state.history
        binary_rows = [r for r in history if r.get("stage", 2) == 2]
        best = max((r["val_top1"] for r in binary_rows), default=float("nan"))
        skipped = max((int(r.get("skipped_images", 0)) for r in history), default=0)
        final = history[-1] if history else {}
        steps_run = self.loop.steps_run
        start = self.resumed_from
        self.run.log(
            f"done: {len(history)} epochs, last val top-1 "
            f"{final.get('val_top1', float('nan')):.2f}%, best {best:.2f}%"
            + (f", {skipped} unreadable training images skipped" if skipped else "")
            + f"; this process ran {steps_run} steps"
            + (
                f" from epoch {start['epoch']} step {start['step_in_epoch']} "
                f"(global step {start['global_step']})"
                if start
                else ""
            ),
            echo=False,
        )
        return {
            "run_dir": str(self.run_dir),
            "epochs": len(history),
            "final": history[-1] if history else None,
            "best_top1": best,
            "last": self.run.checkpoint("last"),
            "best": self.run.checkpoint("best"),
            "step0": self.state.step0,
            "skipped_images": skipped,
            "resumed_from": start,
            "steps_run": steps_run,
        }
