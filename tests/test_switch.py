"""The stage switch (training/switch.py): stage 1's binarization penalty and stage 2's
weight ramp, their formulas by hand, their schedules in a real run, exact resume across
both."""

from __future__ import annotations

import csv
import json
import math
import signal

import pytest
import torch
from safetensors.torch import load_file

from recu_cli.binarize.layers import ReCUConv2d
from recu_cli.binarize.weights import sign_gap
from recu_cli.bnn import binary_layers
from recu_cli.training import TrainConfig, Trainer
from recu_cli.training.state import TrainingStopped
from recu_cli.training.switch import model_sign_gap, penalty_share, ramp_mix
from tests.resume_checks import assert_continued, assert_fresh_run, saved_position
from tests.test_cli_models import run_cli
from tests.test_recipe import finetune_config
from tests.test_train import final_state, small_cifar  # noqa: F401

STEPS = 120 // 16  # small_cifar's 120 training images in batches of 16


def test_sign_gap_and_its_gradient_by_hand() -> None:
    # channel 0: [1, 3]: mean|w| = 2, mean w^2 = 5, gap = 1 - 4/5 = 0.2;
    # channel 1: [-2, 2]: every |w| equal, gap 0. The layer's gap: their mean, 0.1.
    w = torch.tensor([[[[1.0, 3.0]]], [[[-2.0, 2.0]]]], requires_grad=True)
    gap = sign_gap(w)
    assert gap.item() == pytest.approx(0.1)
    gap.backward()
    # d/dw_i (1 - a^2 / s) = -(a / s) sign(w_i) + (a^2 / s^2) w_i, a = mean|w|, s = mean w^2
    # (each mean over n = 2 weights, hence no 1/n left), then / 2 for the mean over channels:
    # channel 0: w = 1: (-2/5 + 4/25) / 2 = -0.12; w = 3: (-2/5 + 12/25) / 2 = 0.04
    # channel 1: a = 2, s = 4: w = -2: (1/2 - 1/2) / 2 = 0; w = 2: 0
    want = torch.tensor([[[[-0.12, 0.04]]], [[[0.0, 0.0]]]])
    assert torch.allclose(w.grad, want, atol=1e-7)
    assert sign_gap(torch.zeros(1, 1, 1, 4)).item() == 1.0  # no 0 / 0
    # a large Gaussian channel: 1 - 2/pi
    g = torch.randn(1, 1, 1, 400_000, generator=torch.Generator().manual_seed(0))
    assert sign_gap(g).item() == pytest.approx(1 - 2 / torch.pi, abs=3e-3)


def test_model_sign_gap_is_of_the_centred_weights_averaged_over_layers() -> None:
    a, b = ReCUConv2d(1, 1, (1, 2)), ReCUConv2d(1, 2, (1, 2))
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[[[11.0, 13.0]]]]))  # centred: [-1, 1], gap 0
        b.weight.copy_(torch.tensor([[[[0.0, 4.0]]], [[[1.0, 1.0]]]]))  # [-2, 2] and [0, 0]
    model = torch.nn.Sequential(a, b)
    # layer a: 0; layer b: (0 + 1) / 2 (an all-zero channel counts as gap 1); mean 0.25
    assert model_sign_gap(model).item() == pytest.approx(0.25)


def test_schedules_of_ramp_and_penalty() -> None:
    assert [ramp_mix(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ramp_mix(0, 0) == 1.0  # no ramp: binary from the first step
    assert [penalty_share(k, 4) for k in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_a_run_applies_both_schedules_step_by_step(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """Penalty weight, weight blend and learning rates as each training step sees them,
    read inside the forward of a real run; the penalty lowers the gap that binarizing
    costs; stage 2's cosine is stage 1's at --stage2-lr-scale of its height."""
    cfg = finetune_config(
        small_cifar, resnet20_weights, tmp_path, "sched", epochs=2, stage1_epochs=1,
        binarize_penalty=40.0, binarize_ramp=0.5, stage2_lr_scale=0.25,
    )  # fmt: skip
    trainer = Trainer(cfg, quiet=True)
    gap_before = model_sign_gap(trainer.parts.model).item()
    layer = binary_layers(trainer.parts.model)[0][1]
    seen: list[tuple[float, float]] = []
    lrs: list[list[float]] = []

    def record(module, _inputs) -> None:
        if module.training:
            penalty = float(trainer.parts.sign_penalty.scale)
            seen.append((penalty, float(module.weight_mix)))
            lrs.append([g["lr"] for g in trainer.parts.optimizer.param_groups])

    layer.register_forward_pre_hook(record)
    trainer.fit()
    ramp = round(0.5 * STEPS)  # 4 steps
    want_stage1 = [(40.0 * (k + 1) / STEPS, 0.0) for k in range(STEPS)]
    want_stage2 = [(0.0, min(1.0, (k + 1) / ramp)) for k in range(STEPS)]
    want = want_stage1 + want_stage2
    assert len(seen) == len(want)
    for got, expected in zip(seen, want, strict=True):
        assert got == pytest.approx(expected, rel=1e-6), (got, expected)
    assert all(m._weight_mix == 1.0 for _, m in binary_layers(trainer.parts.model))
    peaks = [cfg.base_lr, 3 * cfg.base_lr, 3 * cfg.base_lr]  # latent, fp weights, the rest
    assert lrs[0] == pytest.approx(peaks, rel=1e-12)
    assert lrs[STEPS] == pytest.approx([0.25 * p for p in peaks], rel=1e-12)
    for stage1, stage2 in zip(lrs[:STEPS], lrs[STEPS:], strict=True):  # equal lengths
        assert stage2 == pytest.approx([0.25 * v for v in stage1], rel=1e-12)
    rows = list(csv.DictReader((trainer.run_dir / "summary.csv").open()))
    assert [r["stage"] for r in rows] == ["1", "2"]
    # stage 1's penalty drew the weights toward +-alpha: binarizing them loses less (7
    # steps of the task loss alone move it by about 0.003 here)
    assert 0.0 < float(rows[0]["sign_gap"]) < gap_before - 0.01


def test_ctrl_c_inside_the_ramp_after_a_penalized_stage_resumes_to_the_bit(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """Ctrl-C (a real SIGINT, raised by the run's own forward) at stage 2's third step,
    inside the ramp and stage 2's lowered cosine, then --resume: the same weights and
    packed file as a run never stopped, with the stopped run's saved position and the
    steps that were left."""
    total = 2 * STEPS

    def config(name: str) -> TrainConfig:
        return finetune_config(
            small_cifar, resnet20_weights, tmp_path, name, epochs=2, binarize_penalty=10.0,
            binarize_ramp=1.0, stage2_lr_scale=0.5,
        )  # fmt: skip

    straight = Trainer(config("straight"), quiet=True)
    assert_fresh_run(tmp_path / "straight", total, straight.fit())
    broken = Trainer(config("broken"), quiet=True)
    forwards = 0

    def ctrl_c_in_stage_two(module, _inputs) -> None:
        nonlocal forwards
        forwards += module.training
        if module.training and forwards == STEPS + 3:
            signal.raise_signal(signal.SIGINT)

    binary_layers(broken.parts.model)[0][1].register_forward_pre_hook(ctrl_c_in_stage_two)
    with pytest.raises(TrainingStopped):
        broken.fit()
    run = tmp_path / "broken"
    saved = saved_position(run)
    assert saved == {"epoch": 2, "step_in_epoch": 3, "global_step": STEPS + 3}  # in the ramp
    resumed = Trainer(config("broken"), run_dir=run, quiet=True).fit()
    assert_continued(run, saved, total, resumed)
    a, b = final_state(tmp_path / "straight"), final_state(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pa, pb = (load_file(tmp_path / n / "last.safetensors") for n in ("straight", "broken"))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_a_ramp_cut_by_max_steps_validates_binary_weights(
    capsys,
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """An epoch that --max-steps ends inside the ramp is validated and packed on the
    binary weights: the val top-1 in summary.csv is the packed checkpoint's."""
    cfg = finetune_config(
        small_cifar, resnet20_weights, tmp_path, "cut", epochs=2, binarize_ramp=1.0,
        max_steps=STEPS + 2,
    )  # fmt: skip
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()
    assert all(m._weight_mix == 1.0 for _, m in binary_layers(trainer.parts.model))
    assert all(float(m.weight_mix) == 1.0 for _, m in binary_layers(trainer.parts.model))
    rows = list(csv.DictReader((tmp_path / "cut" / "summary.csv").open()))
    args = ["eval", str(tmp_path / "cut" / "last.safetensors"), "--data", str(small_cifar),
            "-j", "0", "--device", "cpu", "--json"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert json.loads(out)["top1"] == pytest.approx(float(rows[-1]["val_top1"]), abs=1e-3)


def test_stage_peaks_of_a_run_saved_before_the_stage_scale() -> None:
    """An older run's optimizer state has each group's `initial_lr` (timm's record of the
    peak) and no `peak_lr`: its peak is that, whatever lr the group stands at now."""
    from recu_cli.training.optim import set_stage_peaks

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.Adam([{"params": [params[0]], "lr": 1e-5}, {"params": [params[1]]}])
    opt.param_groups[0]["initial_lr"] = 4e-3  # mid-cosine: lr 1e-5, peak 4e-3
    opt.param_groups[1]["lr"] = 1.2e-2  # never scheduled: its lr is its peak
    cfg = TrainConfig(model="m", data="d", epochs=6, stage2_lr_scale=0.25)
    set_stage_peaks(opt, cfg, stage=2)
    assert [g["peak_lr"] for g in opt.param_groups] == [4e-3, 1.2e-2]
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([1e-3, 3e-3])
    set_stage_peaks(opt, cfg, stage=1)  # stage 1 (and one-stage runs): the peak itself
    assert [g["initial_lr"] for g in opt.param_groups] == [4e-3, 1.2e-2]
    one_stage = TrainConfig(model="m", data="d", stage1_epochs=0, stage2_lr_scale=0.25)
    set_stage_peaks(opt, one_stage, stage=2)
    assert [g["initial_lr"] for g in opt.param_groups] == [4e-3, 1.2e-2]


def test_min_lr_above_stage_twos_peak_is_refused() -> None:
    from recu_cli.errors import RecuError

    cfg = TrainConfig(model="m", data="d", lr=4e-3, min_lr=1e-3, stage2_lr_scale=0.2)
    with pytest.raises(RecuError, match=r"stage 2's peak learning rate 0.0008 .*--stage2-lr"):
        cfg.validate()
    TrainConfig(model="m", data="d", lr=4e-3, min_lr=1e-3, stage2_lr_scale=0.25).validate()
    one_stage = TrainConfig(model="m", data="d", lr=4e-3, min_lr=1e-3, stage1_epochs=0)
    one_stage.stage2_lr_scale = 0.2
    one_stage.validate()  # no stage 2 of its own: the scale does nothing


def test_stage2_cycles_by_hand() -> None:
    """--stage2-cycles 3 over a 3-epoch stage 2 of 4 steps an epoch: each epoch is one
    cosine from the peak to --min-lr, lr(k) = peak/2 (1 + cos(pi (k mod 4) / 4)); stage 1
    keeps its one cosine; steps past the last cycle stay at --min-lr."""
    from recu_cli.training.optim import build_scheduler

    peak = 8e-3
    by_hand = [8e-3, 6.828427124746190e-3, 4e-3, 1.171572875253810e-3]
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(model="m", data="d", epochs=4, stage1_epochs=1, lr=peak, stage2_cycles=3)
    opt = torch.optim.Adam([param], lr=peak)
    sched = build_scheduler(opt, cfg, steps_per_epoch=4, stage=2)
    seen = []
    for k in range(13):
        sched.step_update(k)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([*by_hand, *by_hand, *by_hand, 0.0], rel=1e-12, abs=1e-15)
    one = build_scheduler(torch.optim.Adam([param], lr=peak), cfg, 4, stage=1)
    one.step_update(2)  # stage 1: one cosine over its 4 steps, halfway down
    assert one.optimizer.param_groups[0]["lr"] == pytest.approx(4e-3, rel=1e-12)
    one_stage = TrainConfig(model="m", data="d", epochs=2, stage1_epochs=0, lr=peak,
                            stage2_cycles=2)  # fmt: skip
    whole = build_scheduler(torch.optim.Adam([param], lr=peak), one_stage, 2, stage=2)
    lrs = []
    for k in range(4):
        whole.step_update(k)
        lrs.append(whole.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([8e-3, 4e-3, 8e-3, 4e-3], rel=1e-12)  # the whole run's
    doubling = TrainConfig(model="m", data="d", epochs=4, stage1_epochs=1, lr=peak,
                           stage2_cycles=2, stage2_cycle_mul=2)  # fmt: skip
    sgdr = build_scheduler(torch.optim.Adam([param], lr=peak), doubling, 2, stage=2)
    lrs = []
    for k in range(7):
        sgdr.step_update(k)
        lrs.append(sgdr.optimizer.param_groups[0]["lr"])
    # 1 epoch of 2 steps, then 2 epochs: 4 steps down from the peak, then lr_min
    assert lrs == pytest.approx([8e-3, 4e-3, *by_hand, 0.0], rel=1e-12, abs=1e-15)


def test_stage2_cycles_that_do_not_end_at_an_epochs_end_are_refused() -> None:
    from recu_cli.errors import RecuError

    TrainConfig(model="m", data="d", epochs=6, stage2_cycles=3).validate()  # 3 + 3
    with pytest.raises(RecuError, match=r"--stage2-cycles 2 .* stage 2's 3 epochs.* 2 must"):
        TrainConfig(model="m", data="d", epochs=6, stage2_cycles=2).validate()
    TrainConfig(model="m", data="d", epochs=6, stage2_cycles=2, stage2_cycle_mul=2).validate()
    with pytest.raises(RecuError, match=r"--stage2-cycle-mul 2\) .* 4 epochs.* 3 must"):
        TrainConfig(model="m", data="d", epochs=8, stage2_cycles=2, stage2_cycle_mul=2).validate()
    with pytest.raises(RecuError, match=r"--stage2-cycles with --warmup-epochs"):
        TrainConfig(model="m", data="d", epochs=6, stage2_cycles=3, warmup_epochs=0.5).validate()
    TrainConfig(model="m", data="d", epochs=6, warmup_epochs=0.5).validate()  # one cycle


def test_stage2_cycles_restart_each_epoch_in_a_run_and_resume_to_the_bit(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """A real run of 1 + 2 epochs with --stage2-cycles 2: the learning rates its steps see
    restart at each stage-2 epoch; Ctrl-C in the second cycle and --resume gives the
    weights and packed file of a run never stopped."""
    total = 3 * STEPS

    def config(name: str) -> TrainConfig:
        return finetune_config(
            small_cifar, resnet20_weights, tmp_path, name, epochs=3, stage1_epochs=1,
            stage2_cycles=2,
        )  # fmt: skip

    straight = Trainer(config("straight"), quiet=True)
    lrs: list[float] = []

    def record(module, _inputs) -> None:
        if module.training:
            lrs.append(straight.parts.optimizer.param_groups[0]["lr"])

    binary_layers(straight.parts.model)[0][1].register_forward_pre_hook(record)
    assert_fresh_run(tmp_path / "straight", total, straight.fit())
    peak = straight.cfg.base_lr
    cosine = [peak / 2 * (1 + math.cos(math.pi * k / STEPS)) for k in range(STEPS)]
    assert lrs == pytest.approx(cosine * 3, rel=1e-12)  # stage 1, then one cycle per epoch
    broken = Trainer(config("broken"), quiet=True)
    forwards = 0

    def ctrl_c_in_the_second_cycle(module, _inputs) -> None:
        nonlocal forwards
        forwards += module.training
        if module.training and forwards == 2 * STEPS + 2:
            signal.raise_signal(signal.SIGINT)

    binary_layers(broken.parts.model)[0][1].register_forward_pre_hook(ctrl_c_in_the_second_cycle)
    with pytest.raises(TrainingStopped):
        broken.fit()
    run = tmp_path / "broken"
    saved = saved_position(run)
    assert saved == {"epoch": 3, "step_in_epoch": 2, "global_step": 2 * STEPS + 2}
    resumed = Trainer(config("broken"), run_dir=run, quiet=True).fit()
    assert_continued(run, saved, total, resumed)
    a, b = final_state(tmp_path / "straight"), final_state(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pa, pb = (load_file(tmp_path / n / "last.safetensors") for n in ("straight", "broken"))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
