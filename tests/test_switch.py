"""The stage switch (training/switch.py): stage 1's binarization penalty and stage 2's
weight ramp, their formulas by hand, their schedules in a real run, exact resume across
both."""

from __future__ import annotations

import csv
import json
import math
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path

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


def ctrl_c_then_resume_equals_straight(
    config: Callable[[str], TrainConfig], tmp_path: Path, at_forward: int, total: int
) -> dict[str, int]:
    """A real SIGINT raised by the run's own training forward number `at_forward`, then
    --resume: weights and packed file equal to the finished run `tmp_path/straight`.
    Returns the stopped run's saved position."""
    broken = Trainer(config("broken"), quiet=True)
    forwards = 0

    def ctrl_c(module, _inputs) -> None:
        nonlocal forwards
        forwards += module.training
        if module.training and forwards == at_forward:
            signal.raise_signal(signal.SIGINT)

    binary_layers(broken.parts.model)[0][1].register_forward_pre_hook(ctrl_c)
    with pytest.raises(TrainingStopped):
        broken.fit()
    run = tmp_path / "broken"
    saved = saved_position(run)
    resumed = Trainer(config("broken"), run_dir=run, quiet=True).fit()
    assert_continued(run, saved, total, resumed)
    a, b = final_state(tmp_path / "straight"), final_state(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pa, pb = (load_file(tmp_path / n / "last.safetensors") for n in ("straight", "broken"))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    return saved


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
            penalty = float(trainer.parts.sign_penalty.scale.tensor)
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
    saved = ctrl_c_then_resume_equals_straight(config, tmp_path, STEPS + 3, total)
    assert saved == {"epoch": 2, "step_in_epoch": 3, "global_step": STEPS + 3}  # in the ramp


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


def scheduled_lrs(cfg: TrainConfig, steps: int, stage: int = 2, spe: int = 4) -> list[float]:
    """The learning rate of each of a stage's first `steps` updates, `spe` steps an epoch."""
    from recu_cli.training.optim import build_scheduler

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.base_lr)
    sched = build_scheduler(opt, cfg, steps_per_epoch=spe, stage=stage)
    seen = []
    for k in range(steps):
        sched.step_update(k)
        seen.append(opt.param_groups[0]["lr"])
    return seen


# cosines from a peak of 8e-3 over one and two epochs of 4 steps: lr(k) = peak/2 (1 + cos(pi
# k / n)), by hand; the second half of the longer one mirrors its first (cos(pi - x) = -cos x)
ONE_EPOCH = [8e-3, 6.828427124746190e-3, 4e-3, 1.171572875253810e-3]
TWO_EPOCHS = [8e-3, 7.695518130045147e-3, 6.828427124746190e-3, 5.530733729460359e-3, 4e-3]
TWO_EPOCHS += [8e-3 - v for v in reversed(TWO_EPOCHS[1:4])]


def test_stage2_short_cycles_by_hand() -> None:
    """--stage2-short-cycles over a 3-epoch stage 2 of 4 steps an epoch: K one-epoch
    cosines lr(k) = peak/2 (1 + cos(pi k / 4)), then one cosine over the rest; stage 1
    keeps its one cosine; steps past the stage stay at --min-lr."""
    peak = 8e-3
    epoch, two_epochs = ONE_EPOCH, TWO_EPOCHS
    lrs = scheduled_lrs

    def cfg(**kw) -> TrainConfig:
        return TrainConfig(model="m", data="d", epochs=4, stage1_epochs=1, lr=peak, **kw)

    approx = partial(pytest.approx, rel=1e-12, abs=1e-15)
    assert lrs(cfg(stage2_short_cycles=2), 13) == approx([*epoch, *epoch, *epoch, 0.0])
    assert lrs(cfg(stage2_short_cycles=1), 13) == approx([*epoch, *two_epochs, 0.0])
    assert lrs(cfg(stage2_short_cycles=5), 12) == approx(epoch * 3)  # no more than it has
    one = lrs(cfg(stage2_short_cycles=0), 12, spe=4)  # one cosine over the 12 steps
    assert one[6] == pytest.approx(4e-3, rel=1e-12) and one[4] > one[6] > one[8] > 0
    # stage 1 (2 epochs here) keeps its one cosine: no restart after its first epoch
    two_stage1 = TrainConfig(model="m", data="d", epochs=4, stage1_epochs=2, lr=peak,
                             stage2_short_cycles=1)  # fmt: skip
    assert lrs(two_stage1, 9, stage=1) == approx([*two_epochs, 0.0])
    one_stage = TrainConfig(model="m", data="d", epochs=2, stage1_epochs=0, lr=peak,
                            stage2_short_cycles=1)  # fmt: skip
    assert lrs(one_stage, 4, spe=2) == approx(epoch)  # no switch: one cosine over the run
    cut = cfg(stage2_short_cycles=2, max_steps=4 + 6)  # stage 2 cut after 6 of its steps
    assert lrs(cut, 7) == approx([*epoch, 8e-3, 4e-3, 0.0])  # the cut cycle ends at the cut


def test_finetune_anneals_stage_two_s_first_epoch_on_its_own() -> None:
    """The default since issue 27's twelfth round: a 6-epoch finetune run's stage 2 is a
    one-epoch cosine from its peak (--lr 8e-3) to 0, then one over its last two epochs;
    `paper` has none, and a run saved before the lever resumes with none."""
    cfg = TrainConfig(model="m", data="d", epochs=6)
    assert (cfg.base_lr, cfg.stage1_epochs, cfg.short_cycles_in_use) == (8e-3, 3, 1)
    approx = partial(pytest.approx, rel=1e-12, abs=1e-15)
    assert scheduled_lrs(cfg, 13) == approx([*ONE_EPOCH, *TWO_EPOCHS, 0.0])
    assert TrainConfig(model="m", data="d", recipe="paper").stage2_short_cycles == 0
    saved = cfg.to_dict()
    del saved["stage2_short_cycles"]
    assert TrainConfig.from_dict(saved).stage2_short_cycles == 0


def test_stage2_short_cycles_take_a_warm_up_of_less_than_their_epoch() -> None:
    """A warm-up opens the first one-epoch cosine (which still ends with its epoch); one of
    a whole epoch or more would fill it, and is refused."""
    from recu_cli.errors import RecuError

    def cfg(**kw) -> TrainConfig:
        return TrainConfig(model="m", data="d", epochs=6, stage1_epochs=2, lr=8e-3, **kw)

    cfg(stage2_short_cycles=2).validate()
    cfg(stage2_short_cycles=1, warmup_epochs=0.5).validate()
    for warm_up in (1.0, 2.0):
        with pytest.raises(RecuError, match=r"fills stage 2's first one-epoch cosine"):
            cfg(stage2_short_cycles=1, warmup_epochs=warm_up).validate()
    cfg(stage2_short_cycles=0, warmup_epochs=1.0).validate()  # one cosine: any warm-up
    TrainConfig(model="m", data="d", epochs=2, stage1_epochs=1, stage2_short_cycles=1,
                warmup_epochs=1.0).validate()  # a 1-epoch stage 2 is its one cosine  # fmt: skip
    TrainConfig(model="m", data="d", epochs=6, stage1_epochs=0, stage2_short_cycles=1,
                warmup_epochs=1.0).validate()  # one stage: no short cycles  # fmt: skip
    seen = scheduled_lrs(cfg(stage2_short_cycles=1, warmup_epochs=0.5), 6)
    # by hand: warm-up from 1e-6 over 2 steps, the cosine over the other 2 (8e-3, 4e-3),
    # then the next cycle at the peak, with no warm-up of its own
    want = [1e-6, 1e-6 + (8e-3 - 1e-6) / 2, 8e-3, 4e-3, 8e-3]
    assert seen[:5] == pytest.approx(want, rel=1e-12) and seen[5] < 8e-3


def test_stage2_short_cycles_restart_each_epoch_in_a_run_and_resume_to_the_bit(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """A real run of 1 + 2 epochs with --stage2-short-cycles 1: the learning rates its
    steps see restart at each stage-2 epoch; Ctrl-C in the second cycle and --resume gives the
    weights and packed file of a run never stopped."""
    total = 3 * STEPS

    def config(name: str) -> TrainConfig:
        return finetune_config(
            small_cifar, resnet20_weights, tmp_path, name, epochs=3, stage1_epochs=1,
            stage2_short_cycles=1,
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
    saved = ctrl_c_then_resume_equals_straight(config, tmp_path, 2 * STEPS + 2, total)
    assert saved == {"epoch": 3, "step_in_epoch": 2, "global_step": 2 * STEPS + 2}
