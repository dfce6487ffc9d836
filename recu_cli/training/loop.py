"""The epoch loop: steps that only queue device work, host sync points, epoch ends."""

from __future__ import annotations

import time
from typing import Any

import torch
from rich.progress import Progress

from recu_cli.bnn import binary_layers, set_tau
from recu_cli.imagecheck import bad_of
from recu_cli.stats import model_stats
from recu_cli.training.config import TrainConfig
from recu_cli.training.distributed import DistInfo, all_reduce_sum, barrier, shutdown, sync_buffers
from recu_cli.training.optim import (
    build_scheduler,
    lr_share,
    restart_moments,
    stage_bounds,
    tau_at,
)
from recu_cli.training.parts import Parts
from recu_cli.training.run_folder import RunFolder
from recu_cli.training.signals import StopOnSigint
from recu_cli.training.state import TrainingStopped, TrainState, resume_state
from recu_cli.training.step_metrics import SyncResult
from recu_cli.training.steps import epoch_line, epoch_row, train_step, validate
from recu_cli.training.switch import penalty_share, ramp_mix, set_weight_mix

SYNC_STEPS = 50  # host sync points without --log-interval (non-finite loss, Ctrl-C under DDP)


class EpochLoop:
    """Trains `parts` from `state`'s position, writing through `run`; one object per run,
    handed the progress display and the Ctrl-C flag by whoever drives it."""

    def __init__(
        self, cfg: TrainConfig, info: DistInfo, parts: Parts, state: TrainState, run: RunFolder
    ) -> None:
        self.cfg, self.info, self.parts, self.state, self.run = cfg, info, parts, state, run
        self.steps_run = 0  # steps this process took (not saved: a resume starts at 0)

    def run_epochs(self, progress: Progress, stop: StopOnSigint) -> None:
        """To the end of the run; on an agreed Ctrl-C, a resume point and TrainingStopped."""
        pos = self.state.pos
        while pos.epoch < self.cfg.epochs and not self.max_steps_reached():
            if not self.train_epoch(progress, stop):
                self.save_resume()
                shutdown(self.info)
                raise TrainingStopped(
                    f"interrupted at epoch {pos.epoch + 1} step {pos.step_in_epoch}; resume "
                    f"point saved: recu binarize --resume {self.run.path}",
                    exit_code=130,
                )

    def max_steps_reached(self) -> bool:
        return bool(self.cfg.max_steps) and self.state.pos.global_step >= self.cfg.max_steps

    def save_resume(self) -> None:
        """A resume point: the parts' state dicts and the run's state. Called by every rank
        (gathering the ranks' loss sums is a collective); the main process writes."""
        epoch_loss = self.state.metrics.state(self.info)
        if self.info.is_main:
            payload = resume_state(self.state, self.info, epoch_loss, self.parts.device)
            self.run.save_resume({**self.parts.state_dicts(), **payload})
        self.state.clock.reset()

    def enter_stage(self, stage: int, switching: bool) -> None:
        """Stage 1 trains real centred weights behind binary activations; stage 2 binarizes
        the weights too. Switching: alpha starts at mean |W0| (so alpha * sign(W0) continues
        stage 1's W0) and Adam's moments restart (unless --switch-moments keep), as the loss
        surface changes. Either way the stage gets its own schedule, continued from the
        current step."""
        cfg, parts, state = self.cfg, self.parts, self.state
        state.stage = stage
        planned_start = stage_bounds(cfg, stage)[0] * parts.steps_per_epoch
        set_weight_mix(parts.model, 1.0 if stage == 2 else 0.0)
        if parts.fast is not None:  # the graph's path through the weights changed
            resumed = not switching and state.pos.global_step != planned_start
            where = "first batch after --resume" if resumed else "first batch"
            parts.fast.check_next_step(f"stage {stage}'s {where}")
        if parts.sign_penalty is not None:
            parts.sign_penalty.set_share(0.0)  # stage 1's alone; set per step there
        if parts.attention_weight is not None:
            parts.attention_weight.set(cfg.attention_weight(stage))
        if switching:
            for _, layer in binary_layers(parts.model):
                layer.reset_alpha_from_latent()
            if cfg.switch_moments == "reset":
                restart_moments(parts.optimizer, in_place=parts.fast is not None)
            if parts.average is not None:  # an average across the switch blends two networks
                parts.average.restart(parts.model)
            self.run.log(f"stage 2 from epoch {state.pos.epoch + 1}: binary weights (ReCU)")
        start = planned_start
        if switching:  # here and now: after an epoch cut by --max-steps, before `start`
            start = state.pos.global_step
        elif state.stage_start is not None and state.stage_start[0] == stage:
            start = state.stage_start[1]  # resumed inside the stage: where it began
        state.stage_start = (stage, start)
        state.scheduler = build_scheduler(
            parts.optimizer, cfg, parts.steps_per_epoch, stage, start_step=start
        )
        state.scheduler.step_update(state.pos.global_step - start)

    def train_epoch(self, progress: Progress, stop: StopOnSigint) -> bool:
        """One epoch from the current position; False when a Ctrl-C asked to stop.

        Each step only queues device work; the host reads the loss and the flags at sync
        points (every --log-interval steps, or SYNC_STEPS without logging, and at the end of
        the epoch), where all ranks agree on Ctrl-C. Alone, a process stops at the next
        step; under torchrun at the next sync point."""
        cfg, parts, state = self.cfg, self.parts, self.state
        pos, clock, steps_per_epoch = state.pos, state.clock, parts.steps_per_epoch
        epoch = pos.epoch
        if pos.step_in_epoch == 0 and epoch == cfg.stage1_epochs > 0:
            self.enter_stage(2, switching=True)
        if pos.step_in_epoch == 0:
            set_tau(parts.model, tau_at(cfg, steps_per_epoch, epoch, 0))
            state.flips.snapshot(parts.model)
            state.metrics.reset()
            state.skipped.epoch = 0
        parts.sampler.set_epoch(epoch, pos.step_in_epoch)
        parts.model.train()
        start = time.perf_counter()
        images_seen = steps_here = 0
        sync_every = cfg.log_interval or SYNC_STEPS
        task = progress.add_task(
            f"epoch {epoch + 1}/{cfg.epochs}" + (" (stage 1)" if state.stage == 1 else ""),
            total=steps_per_epoch,
            info="",
        )
        progress.update(task, completed=pos.step_in_epoch)
        batches = iter(parts.train_loader)
        while True:
            alone_stopping = stop.requested and not self.info.enabled
            # a step-count resume point is due on every rank at once, so it makes a sync
            # point; a time-based one is agreed at the next one (resumeclock.py)
            steps_due = bool(steps_here) and clock.steps is not None
            steps_due = steps_due and clock.due(pos.global_step)
            if alone_stopping or steps_due or (steps_here and pos.step_in_epoch % sync_every == 0):
                rate = images_seen * self.info.world_size / (time.perf_counter() - start)
                self._sync_point(stop, progress, task, rate, clock.due(pos.global_step))
            if state.stop_agreed:
                progress.remove_task(task)
                return False
            if self.max_steps_reached():
                break
            try:
                batch = next(batches)
            except StopIteration:
                break
            except RuntimeError:
                if stop.requested:  # Ctrl-C also ended the loader's workers
                    continue
                raise
            images, targets = batch
            self._skip_bad(bad_of(batch))
            if images.shape[0] == 0:  # every image of this batch was unreadable
                pos.step_in_epoch += 1
                pos.global_step += 1
                self.steps_run += 1
                continue
            if cfg.tau_update == "step":
                set_tau(parts.model, tau_at(cfg, steps_per_epoch, epoch, pos.step_in_epoch))
            self._switch_schedule()
            loss = train_step(cfg, parts, images, targets)
            if parts.average is not None:  # this step's rate: before the scheduler moves it
                parts.average.update(parts.model, lr_share(parts.optimizer))
            images_seen += images.shape[0]
            steps_here += 1
            pos.step_in_epoch += 1
            pos.global_step += 1
            self.steps_run += 1
            state.scheduler.step_update(pos.global_step - state.stage_start[1])
            state.metrics.add(loss, images.shape[0], pos.step_in_epoch)
            progress.update(task, advance=1)
        progress.remove_task(task)
        self._sync_point(stop)  # no epoch ends on a non-finite loss
        self._end_epoch(time.perf_counter() - start, images_seen)
        return True

    def _switch_schedule(self) -> None:
        """This step's stage-1 penalty share and stage-2 weight blend (training/switch.py),
        from the steps taken in the stage: a resumed run computes the same."""
        cfg, parts, state = self.cfg, self.parts, self.state
        steps_in_stage = state.pos.global_step - state.stage_start[1]
        if state.stage == 1 and parts.sign_penalty is not None:
            first, end = stage_bounds(cfg, 1)
            stage_steps = (end - first) * parts.steps_per_epoch
            parts.sign_penalty.set_share(penalty_share(steps_in_stage, stage_steps))
        elif state.stage == 2 and cfg.binarize_ramp:
            ramp_steps = round(cfg.binarize_ramp * parts.steps_per_epoch)
            set_weight_mix(parts.model, ramp_mix(steps_in_stage, ramp_steps))

    def _skip_bad(self, bad) -> None:
        """Unreadable training images: a warning per file, counted; fatal with --strict-data
        (all ranks agree, so none waits forever for the others)."""
        if self.cfg.strict_data:
            n_bad = all_reduce_sum([float(len(bad))], self.info, self.parts.device)[0]
            if n_bad:
                self.save_resume()
                first = bad[0].message() if bad else "an unreadable image on another process"
                raise TrainingStopped(
                    f"{first} (--strict-data); remove or replace it, then continue with "
                    f"recu binarize --resume {self.run.path}",
                    exit_code=1,
                )
        for item in bad:
            if self.state.skipped.add(item.path):
                self.run.log(f"warning: skipped {item.message()}")

    def _sync_point(
        self, stop: StopOnSigint, progress: Progress | None = None, task: Any = None,
        rate: float = 0.0, save_wanted: bool = False,
    ) -> None:  # fmt: skip
        """The loop's host sync: stop when any rank saw a non-finite loss (nothing is saved,
        the last good checkpoint stays), agree on Ctrl-C, write a resume point when one is
        due (--checkpoint-interval; only here, after the non-finite check, and on every rank
        at once), log at --log-interval."""
        cfg, state = self.cfg, self.state
        pos = state.pos
        seen = state.metrics.sync(stop.requested, self.info, save_wanted=save_wanted)
        if seen.bad_ranks:
            raise self._non_finite(seen)
        state.stop_agreed = seen.stop
        if seen.save and not seen.stop and 0 < pos.step_in_epoch < self.parts.steps_per_epoch:
            self.save_resume()
        if progress is None:
            return
        progress.update(task, info=f"loss {seen.last_loss:.4f}  {rate:.0f} img/s")
        if cfg.log_interval and pos.step_in_epoch % cfg.log_interval == 0:
            lr = float(self.parts.optimizer.param_groups[0]["lr"])
            self.run.log(
                f"epoch {pos.epoch + 1} step {pos.step_in_epoch}/{self.parts.steps_per_epoch} "
                f"loss {seen.last_loss:.4f} lr {lr:.3g} {rate:.0f} img/s"
            )

    def _non_finite(self, seen: SyncResult) -> TrainingStopped:
        shutdown(self.info)
        epoch = self.state.pos.epoch + 1
        where = (
            f"loss became {seen.bad_loss} at epoch {epoch} step {seen.bad_step}"
            if seen.bad_step >= 0
            else f"loss became nan or inf on another process in epoch {epoch}"
        )
        return TrainingStopped(
            f"{where}; stopped without saving anything. Lower --lr (now "
            f"{self.cfg.base_lr:g}) or set --clip-grad; the last good checkpoint is kept in "
            f"{self.run.path}",
            exit_code=1,
        )

    def _end_epoch(self, seconds: float, images_seen: int) -> None:
        """Validate, record the row, write checkpoints, resume point and summary.csv (last:
        it never lists an epoch that is not saved), then the epoch's line. With
        --ema-decay the average is validated and packed, and the last step's weights are
        validated too (val_top1_live)."""
        cfg, parts, state = self.cfg, self.parts, self.state
        if state.stage == 2:  # binary weights, also where --max-steps cut a ramp short:
            set_weight_mix(parts.model, 1.0)  # what is validated is what is packed
        packed = parts.packed_model()
        if state.pos.epoch + 1 == cfg.epochs and cfg.bn_recalib:
            self._reestimate_batchnorm(packed)
        sync_buffers(parts.model, self.info)
        live = None
        if packed is not parts.model:
            sync_buffers(packed, self.info)
            live = validate(parts, self.info, cfg.channels_last)
        val = validate(parts, self.info, cfg.channels_last, model=packed)
        warmup = parts.fast.take_warmup() if parts.fast is not None else (0.0, 0)
        row = epoch_row(parts, state, self.info, val, seconds, images_seen, warmup, live)
        state.history.append(row)
        state.pos.epoch += 1
        state.pos.step_in_epoch = 0
        is_best = self._keep_epoch(row)
        self.save_resume()
        self.run.write_summary(state.history)
        barrier(self.info)
        self.run.log(epoch_line(row, cfg.epochs, is_best))

    def _keep_epoch(self, row: dict[str, Any]) -> bool:
        """The packed checkpoints of a binary epoch (a stage-1 model has real weights:
        nothing to pack yet); True when this epoch is the best so far."""
        cfg, parts, state = self.cfg, self.parts, self.state
        if state.stage != 2:
            return False
        training = {
            "epoch": row["epoch"],
            "global_step": state.pos.global_step,
            "val_top1": row["val_top1"],
            "val_top5": row["val_top5"],
            "tau": row["tau"],
            "data": parts.data.source,
            "config": cfg.to_dict(),
        }
        packed = parts.packed_model()
        is_best = self.run.keep_epoch(
            row["val_top1"], state.pos.best_top1, packed, parts.spec, cfg.convert,
            stats=model_stats(packed) if self.info.is_main else [],  # only it writes
            training=training, history=state.history, half=cfg.half, keep_latent=cfg.keep_latent,
        )  # fmt: skip
        if is_best:
            state.pos.best_top1 = row["val_top1"]
        return is_best

    def _reestimate_batchnorm(self, model: torch.nn.Module) -> None:
        """BatchNorm statistics recomputed on training images with the final weights (of
        the model that is packed)."""
        from recu_cli.calibrate import image_batches, reestimate_batchnorm

        self.parts.sampler.set_epoch(self.cfg.epochs, 0)
        with torch.random.fork_rng(devices=[]):
            batches = image_batches(self.parts.train_loader, self.cfg.bn_recalib)
            used = reestimate_batchnorm(model, batches, self.parts.device)
        self.run.log(f"BatchNorm statistics re-estimated on {used} training batches")
