"""The stage switch (training/switch.py): stage 1's binarization penalty and stage 2's
weight ramp, their formulas by hand, their schedules in a real run, exact resume across
both."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from recu_cli.binarize.layers import ReCUConv2d
from recu_cli.binarize.weights import sign_gap
from recu_cli.bnn import binary_layers
from recu_cli.training import Trainer
from recu_cli.training.switch import model_sign_gap, penalty_share, ramp_mix
from tests.resume_checks import assert_continued, assert_fresh_run, saved_position
from tests.test_cli_models import run_cli
from tests.test_recipe import finetune_config
from tests.test_train import final_state, same_threads_env, small_cifar  # noqa: F401

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
    """Penalty weight and weight blend as each training step sees them, read inside the
    forward of a real run; the penalty lowers the gap that binarizing costs."""
    cfg = finetune_config(
        small_cifar, resnet20_weights, tmp_path, "sched", epochs=3, stage1_epochs=1,
        binarize_penalty=40.0, binarize_ramp=0.5,
    )  # fmt: skip
    trainer = Trainer(cfg, quiet=True)
    layer = binary_layers(trainer.parts.model)[0][1]
    seen: list[tuple[float, float]] = []

    def record(module, _inputs) -> None:
        if module.training:
            penalty = float(trainer.parts.sign_penalty.scale)
            seen.append((penalty, float(module.weight_mix)))

    layer.register_forward_pre_hook(record)
    trainer.fit()
    ramp = round(0.5 * STEPS)  # 4 steps
    want_stage1 = [(40.0 * (k + 1) / STEPS, 0.0) for k in range(STEPS)]
    want_stage2 = [(0.0, min(1.0, (k + 1) / ramp)) for k in range(2 * STEPS)]
    want = want_stage1 + want_stage2
    assert len(seen) == len(want)
    for got, expected in zip(seen, want, strict=True):
        assert got == pytest.approx(expected, rel=1e-6), (got, expected)
    assert all(m._weight_mix == 1.0 for _, m in binary_layers(trainer.parts.model))
    rows = list(csv.DictReader((trainer.run_dir / "summary.csv").open()))
    assert [r["stage"] for r in rows] == ["1", "2", "2"]
    assert all(0.0 <= float(r["sign_gap"]) < 1.0 for r in rows)
    plain = finetune_config(
        small_cifar, resnet20_weights, tmp_path, "plain", epochs=3, stage1_epochs=1
    )
    Trainer(plain, quiet=True).fit()
    plain_rows = list(csv.DictReader((tmp_path / "plain" / "summary.csv").open()))
    # after stage 1, the penalized run's weights lose less to binarization
    assert float(rows[0]["sign_gap"]) < float(plain_rows[0]["sign_gap"]) - 0.01


def test_sigint_inside_the_ramp_after_a_penalized_stage_resumes_to_the_bit(
    capsys,
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    args = [
        "binarize", "resnet20", "--weights", str(resnet20_weights), "--data", str(small_cifar),
        "--epochs", "2", "-b", "16", "--seed", "5", "--log-interval", "1", "--no-step0-eval",
        "--calib-images", "32", "-o", str(tmp_path), "--binarize-penalty", "10",
        "--binarize-ramp", "1",
    ]  # fmt: skip
    code, out, err = run_cli([*args, "-j", "0", "--experiment", "straight", "--json"], capsys)
    assert code == 0, err
    total = 2 * STEPS
    assert_fresh_run(tmp_path / "straight", total, json.loads(out))
    config = json.loads((tmp_path / "straight" / "config.json").read_text())["train"]
    assert (config["binarize_penalty"], config["binarize_ramp"]) == (10.0, 1.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "recu_cli", *args, "-j", "1", "--experiment", "broken"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=same_threads_env(),
    )  # fmt: skip
    for line in proc.stderr:
        if re.search(r"epoch 2 step 3/", line):  # the ramp spans all of epoch 2
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    saved = saved_position(tmp_path / "broken")
    assert saved["epoch"] == 2 and 3 <= saved["step_in_epoch"] < STEPS  # inside the ramp
    code, out, err = run_cli(["binarize", "--resume", str(tmp_path / "broken"), "--json"], capsys)
    assert code == 0, err
    assert_continued(tmp_path / "broken", saved, total, json.loads(out))
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "broken")
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
