"""--ema-decay (training/average.py): the average's decays and values by hand, its restart
at each stage, what a run validates and packs with it, exact resume inside it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from recu_cli.bnn import binary_layers
from recu_cli.pack.packed_file import parse
from recu_cli.pack.rebuild import latent_layers
from recu_cli.training import TrainConfig, Trainer
from recu_cli.training.average import WeightAverage
from tests.resume_checks import assert_fresh_run
from tests.test_recipe import finetune_config
from tests.test_switch import STEPS, ctrl_c_then_resume_equals_straight
from tests.test_train import small_cifar  # noqa: F401


def tiny() -> nn.Module:
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    model[1].running_mean.zero_()
    return model


def set_values(model: nn.Module, weight: float, mean: float) -> None:
    with torch.no_grad():
        model[0].weight.fill_(weight)
        model[1].running_mean.fill_(mean)


def test_decays_and_average_by_hand() -> None:
    """d_k = min(D, 1 - k^-P); update k: avg = d_k avg + (1 - d_k) live, for the weights
    and the BatchNorm statistics alike."""
    model = tiny()
    average = WeightAverage(model, decay=0.6, warmup_power=1.0)
    assert [average.decay_at(k) for k in (1, 2, 3, 4)] == pytest.approx([0.0, 0.5, 0.6, 0.6])
    seen = []
    for v in (1.0, 3.0, 5.0, 7.0):
        set_values(model, v, 10 * v)
        average.update(model)
        seen.append((average.module[0].weight.item(), average.module[1].running_mean.item()))
    # by hand: 1; .5*1 + .5*3 = 2; .6*2 + .4*5 = 3.2; .6*3.2 + .4*7 = 4.72
    want = [1.0, 2.0, 3.2, 4.72]
    assert [w for w, _ in seen] == pytest.approx(want, rel=1e-6)
    assert [m for _, m in seen] == pytest.approx([10 * w for w in want], rel=1e-6)
    shorter = WeightAverage(model, decay=0.999, warmup_power=0.5)
    # 1 - 2^-0.5, 1 - 3^-0.5: the warm-up, far below D
    assert shorter.decay_at(2) == pytest.approx(0.2928932188134524, rel=1e-12)
    assert shorter.decay_at(3) == pytest.approx(0.4226497308103742, rel=1e-12)


def test_restart_takes_the_live_model_and_the_next_update_copies_it() -> None:
    model = tiny()
    average = WeightAverage(model, decay=0.9, warmup_power=1.0)
    for v in (1.0, 2.0, 3.0):
        set_values(model, v, v)
        average.update(model)
    assert average.updates == 3 and average.module[0].weight.item() != 3.0
    set_values(model, 8.0, 8.0)
    average.restart(model)
    assert average.updates == 0 and average.module[0].weight.item() == 8.0
    set_values(model, 5.0, 5.0)
    average.update(model)  # d_1 = 0: the first update of a stage is the live model
    assert average.module[0].weight.item() == 5.0
    assert average.module[1].running_mean.item() == 5.0


def test_the_average_carries_no_forward_hook_of_the_live_model() -> None:
    """The feature taps hook the student; the average's validation must not feed them."""
    model = tiny().eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    average = WeightAverage(model, decay=0.9, warmup_power=1.0)
    average.module(torch.ones(2, 1))
    assert calls == []
    model(torch.ones(2, 1))
    assert calls == [1]


def ema_config(data: Path, weights: Path, out: Path, name: str, **kw) -> TrainConfig:
    settings = {"epochs": 2, "stage1_epochs": 1, "ema_decay": 0.9, "keep_latent": True, **kw}
    return finetune_config(data, weights, out, name, **settings)


def test_a_run_validates_and_packs_the_average_restarted_at_the_switch(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """1 + 1 epochs: the average restarts at the switch (stage 2's steps only), the packed
    file holds the average's latent weights, not the last step's, and summary.csv gives
    both models' top-1."""
    trainer = Trainer(ema_config(small_cifar, resnet20_weights, tmp_path, "run"), quiet=True)
    assert_fresh_run(tmp_path / "run", 2 * STEPS, trainer.fit())
    average = trainer.parts.average
    assert average is not None and average.updates == STEPS
    packed, _ = parse(tmp_path / "run" / "last.safetensors")
    stored = latent_layers(packed)
    live = dict(binary_layers(trainer.parts.model))
    averaged = dict(binary_layers(average.module))
    assert stored.keys() == live.keys()
    for name, layer in stored.items():
        assert torch.equal(layer.weight, averaged[name].weight), name
    assert any(not torch.equal(stored[n].weight, live[n].weight) for n in stored)
    assert all(float(layer.tau) == float(live[n].tau) for n, layer in averaged.items())
    rows = list(csv.DictReader((tmp_path / "run" / "summary.csv").open()))
    assert [r["stage"] for r in rows] == ["1", "2"]
    for row in rows:
        assert 0 <= float(row["val_top1_live"]) <= 100 and row["val_top1"] != ""
    assert any(r["val_top1"] != r["val_top1_live"] for r in rows)


def test_without_the_average_the_live_top1_is_the_packed_ones(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    cfg = ema_config(small_cifar, resnet20_weights, tmp_path, "plain", ema_decay=0.0)
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()
    assert trainer.parts.average is None
    rows = list(csv.DictReader((tmp_path / "plain" / "summary.csv").open()))
    assert all(r["val_top1"] == r["val_top1_live"] for r in rows)


def test_ctrl_c_inside_the_averaged_stage_resumes_to_the_bit(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """Ctrl-C three steps into stage 2, then --resume: the average, the weights, the
    packed file and every summary row equal those of a run never stopped."""

    def config(name: str) -> TrainConfig:
        return ema_config(small_cifar, resnet20_weights, tmp_path, name)

    straight = Trainer(config("straight"), quiet=True)
    straight.fit()
    ctrl_c_then_resume_equals_straight(config, tmp_path, STEPS + 3, 2 * STEPS)
    a, b = (
        torch.load(tmp_path / n / "resume.pt", map_location="cpu", weights_only=True)["average"]
        for n in ("straight", "broken")
    )
    assert a["updates"] == b["updates"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    rows = [(tmp_path / n / "summary.csv").read_text() for n in ("straight", "broken")]
    cut = [[line.split(",")[:8] for line in text.splitlines()] for text in rows]
    assert cut[0] == cut[1]  # epoch .. val_loss: the averaged top-1 of both epochs


def test_runs_saved_before_the_average_resume_without_it() -> None:
    cfg = TrainConfig.from_dict({"model": "resnet20", "data": "d", "recipe": "finetune"})
    assert cfg.ema_decay == 0.0
    assert TrainConfig(model="m", data="d", recipe="paper").ema_decay == 0.0
