"""The GPU code path of `recu binarize`, checked on the CPU wherever the CPU can show it:
validation precision, resume state placement, grad-scaler state, determinism helpers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from recu_cli.training import TrainConfig, Trainer, build_optimizer
from tests.test_cli_models import run_cli
from tests.test_train import binarize_args, small_cifar  # noqa: F401 - fixture


@pytest.fixture
def restore_determinism():
    """--deterministic switches process-wide flags; tests run in one process."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


def short_config(data: Path, weights: Path, out: Path, name: str, **kw) -> TrainConfig:
    base = dict(
        model="resnet20", data=str(data), weights=str(weights), epochs=2, batch_size=16,
        workers=0, output=str(out), experiment=name, max_steps=3, log_interval=0,
        step0_eval=False, seed=3, recipe="paper",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_amp_validation_runs_in_fp32_like_recu_eval(
    capsys,
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """val_top1/val_loss of an --amp run (bf16 autocast on the CPU) are what `recu eval`
    measures on the saved checkpoint in fp32: best is chosen by the numbers it gives."""
    args = binarize_args(
        small_cifar, tmp_path, resnet20_weights, "amp", "--amp", "--epochs", "1",
        "--max-steps", "2", "--json",
    )  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    run = tmp_path / "amp"
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert cfg["amp_dtype"] == "bf16"  # --amp-dtype auto, resolved and stored
    row = list(csv.DictReader((run / "summary.csv").open()))[-1]
    code, out, err = run_cli(
        ["eval", str(run / "last.safetensors"), "--data", str(small_cifar), "-j", "0", "--json"],
        capsys,
    )
    assert code == 0, err
    measured = json.loads(out)
    assert float(row["val_top1"]) == pytest.approx(measured["top1"], abs=1e-4)
    assert float(row["val_loss"]) == pytest.approx(measured["loss"], rel=1e-5)


@pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter")
def test_resume_keeps_adam_steps_on_the_cpu_and_moves_the_rest_to_the_device(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """Resume onto a non-CPU device (meta stands in for CUDA, absent here): the state is
    read on the CPU; Adam's moments and the flip masks go to the device, Adam's `step`
    stays on the CPU as non-capturable Adam expects (a CUDA step syncs every step)."""
    cfg = short_config(small_cifar, resnet20_weights, tmp_path, "meta")
    Trainer(cfg, quiet=True).fit()
    trainer = Trainer(TrainConfig(**{**cfg.__dict__, "max_steps": None}), tmp_path / "meta")
    device = torch.device("meta")
    trainer.parts.device = device
    trainer.parts.model.to(device)
    trainer.parts.optimizer = build_optimizer(trainer.parts.model, trainer.cfg)
    trainer._load_resume()
    states = list(trainer.parts.optimizer.state.values())
    assert states
    for st in states:
        assert st["step"].device.type == "cpu"
        assert st["exp_avg"].device == device and st["exp_avg_sq"].device == device
    masks = [m for pair in trainer.state.flips.start.values() for m in pair]
    assert masks and all(m.device == device for m in masks)


def test_resume_with_an_empty_grad_scaler_state_starts_a_fresh_scaler(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
    restore_determinism,
) -> None:
    """A resume.pt written while the grad scaler was off (a run begun where fp16 autocast
    did not run, e.g. a CPU before this version) holds an empty scaler state; an fp16 run
    that resumes it starts a fresh scaler instead of calling the file damaged. (Run with
    --deterministic, which the CPU path must accept.)"""
    cfg = short_config(
        small_cifar, resnet20_weights, tmp_path, "fp16", amp=True, amp_dtype="fp16",
        deterministic=True,
    )  # fmt: skip
    first = Trainer(cfg, quiet=True)
    assert first.parts.scaler.is_enabled()  # fp16 autocast with a grad scaler, on the CPU too
    first.fit()
    assert torch.are_deterministic_algorithms_enabled()
    path = tmp_path / "fp16" / "resume.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["scaler"]  # an enabled scaler saves its scale and growth tracker
    state["scaler"] = {}  # what a disabled GradScaler's state_dict() is
    torch.save(state, path)
    resumed = Trainer(
        TrainConfig(**{**cfg.__dict__, "max_steps": 5}), run_dir=tmp_path / "fp16", quiet=True
    )
    assert resumed.parts.scaler.is_enabled() and resumed.parts.scaler.get_scale() == 2.0**16
    result = resumed.fit()
    assert result["epochs"] == 2
    assert "starting a fresh scaler" in (tmp_path / "fp16" / "train.log").read_text()


def test_histogram_counts_equal_histc() -> None:
    """bincount-based counts (deterministic on CUDA) equal torch.histc's, edges included."""
    from recu_cli.stats import HIST_BINS, histc_counts, histogram

    gen = torch.Generator().manual_seed(0)
    for scale in (0.05, 1.0, 30.0):
        x = torch.randn(20_000, generator=gen) * scale
        r = float(x.abs().max()) * 0.7
        edges = torch.linspace(-r, r, HIST_BINS + 1)
        x = torch.cat([x, edges, torch.tensor([-r, r, 0.0])])
        expected = torch.histc(x, bins=HIST_BINS, min=-r, max=r).long()
        assert torch.equal(histc_counts(x, HIST_BINS, -r, r), expected)
        w1 = x.view(1, -1, 1, 1)
        h = histogram(w1, None)
        ref = torch.histc(x, bins=HIST_BINS, min=-h["range"], max=h["range"]).long()
        assert h["counts"] == ref.tolist()


def test_lower_median_equals_torch_median() -> None:
    from recu_cli.calibrate import lower_median

    gen = torch.Generator().manual_seed(1)
    for n in (1, 2, 999, 1000):
        v = torch.randn(6, n, generator=gen)
        v[0] = 0.5  # ties
        assert torch.equal(lower_median(v), v.median(dim=1).values)
        assert torch.equal(v.sort(dim=1).values[:, (n - 1) // 2], v.median(dim=1).values)


class _FirstRead(Exception):
    pass


@pytest.mark.parametrize(("log_interval", "first_read"), [(0, 7), (3, 3)])
def test_training_steps_queue_device_work_and_read_it_only_at_sync_points(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
    log_interval,
    first_read,
) -> None:
    """The training loop on the meta device, where any host read of a tensor raises (as a
    read of a CUDA tensor waits for the GPU): steps, distillation, loss sums and the
    optimizer run; the first read is the sync point (every --log-interval steps, or the
    end of this 7-step epoch without logging)."""
    from recu_cli.progress import make_progress
    from recu_cli.training.signals import StopOnSigint as _StopOnSigint
    from recu_cli.training.step_metrics import StepMetrics

    cfg = short_config(
        small_cifar, resnet20_weights, tmp_path, "steps", max_steps=None, log_interval=log_interval
    )
    trainer = Trainer(cfg, quiet=True)
    assert trainer.parts.teacher is not None and trainer.steps_per_epoch == 7
    device = torch.device("meta")
    trainer.parts.device = device
    trainer.parts.model.to(device)
    trainer.parts.teacher.to(device)
    trainer.parts.optimizer = build_optimizer(trainer.parts.model, trainer.cfg)
    trainer.loop.enter_stage(2, switching=False)  # the scheduler follows the new optimizer
    trainer.state.metrics = StepMetrics(device)
    reads: list[int] = []

    def sync(stop_requested, info, save_wanted=False):
        reads.append(trainer.state.pos.step_in_epoch)
        raise _FirstRead

    trainer.state.metrics.sync = sync
    with make_progress(True) as progress, _StopOnSigint() as stop, pytest.raises(_FirstRead):
        trainer.loop.train_epoch(progress, stop)
    assert reads == [first_read]
    assert trainer.state.pos.global_step == first_read
    assert all(st["exp_avg"].device == device for st in trainer.parts.optimizer.state.values())


def test_step_metrics_sum_as_python_floats_did_and_find_the_first_bad_step() -> None:
    from recu_cli.training.distributed import DistInfo
    from recu_cli.training.step_metrics import StepMetrics

    info = DistInfo()
    gen = torch.Generator().manual_seed(2)
    losses = (torch.rand(20, generator=gen) * 5).tolist()
    sizes = [16, 16, 7] * 6 + [16, 3]
    metrics = StepMetrics(torch.device("cpu"))
    total = 0.0
    for step, (loss, n) in enumerate(zip(losses, sizes, strict=True), start=1):
        value = torch.tensor(loss, dtype=torch.float32)
        metrics.add(value, n, step)
        total += float(value) * n  # what the loop summed on the host before
    seen = metrics.sync(False, info)
    assert not seen.stop and not seen.save and seen.bad_ranks == 0 and seen.bad_step == -1
    assert seen.last_loss == float(torch.tensor(losses[-1], dtype=torch.float32))
    assert metrics.epoch_mean(info) == total / sum(sizes)  # bit for bit

    restored = StepMetrics(torch.device("cpu"))
    restored.load(metrics.state(info), info)
    assert restored.epoch_mean(info) == metrics.epoch_mean(info)

    metrics.add(torch.tensor(float("inf")), 16, 21)
    metrics.add(torch.tensor(float("nan")), 16, 22)
    seen = metrics.sync(True, info, save_wanted=True)
    assert seen.stop and seen.save and seen.bad_ranks == 1
    assert seen.bad_step == 21 and seen.bad_loss == float("inf")
