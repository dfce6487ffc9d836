"""--ema-decay (training/average.py): the average's decays and values by hand, its restart
at each stage, what a run validates and packs with it, exact resume inside it; --ema-memory
lr: the memory that follows the learning rate, by hand and in a run."""

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
from recu_cli.training.optim import lr_share
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


def test_a_memory_that_follows_the_learning_rate_by_hand() -> None:
    """--ema-memory lr: keep_k = max(0, 1 - (1 - d_k) / r_k), r_k the rate's share of its
    peak; at the full rate the plain decay, at a small one the live weights."""
    model = tiny()
    average = WeightAverage(model, decay=0.6, warmup_power=1.0, follow_lr=True)
    # d_2 = 0.5: r = 1 -> 0.5; r = 0.8 -> 1 - 0.5 / 0.8 = 0.375; r = 0.5 -> 0; r = 0.4 -> 0
    assert average.keep_at(2, 1.0) == pytest.approx(0.5)
    assert average.keep_at(2, 0.8) == pytest.approx(0.375)
    assert average.keep_at(2, 0.5) == 0.0 and average.keep_at(2, 0.4) == 0.0
    assert average.keep_at(3, 0.0) == 0.0  # a rate of zero: the live weights
    # d_3 = d_4 = 0.6 (the cap): r = 0.8 -> 1 - 0.4 / 0.8 = 0.5
    assert average.keep_at(4, 0.8) == pytest.approx(0.5)
    assert WeightAverage(model, 0.6, 1.0).keep_at(2, 0.8) == pytest.approx(0.5)  # fixed
    seen = []
    for v, share in ((1.0, 1.0), (3.0, 0.8), (5.0, 0.8), (7.0, 0.3)):
        set_values(model, v, 10 * v)
        average.update(model, share)
        seen.append((average.module[0].weight.item(), average.module[1].running_mean.item()))
    # by hand: 1 (copied); .375*1 + .625*3 = 2.25; .5*2.25 + .5*5 = 3.625; 7 (keep 0)
    want = [1.0, 2.25, 3.625, 7.0]
    assert [w for w, _ in seen] == pytest.approx(want, rel=1e-6)
    assert [m for _, m in seen] == pytest.approx([10 * w for w in want], rel=1e-6)
    assert seen[-1] == (7.0, 70.0)  # keep 0 is the live weights to the bit


def test_the_lr_share_is_the_rate_over_its_stage_peak() -> None:
    weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([{"params": [weight], "lr": 0.03}])
    assert lr_share(optimizer) == 1.0  # no scheduler yet: the rate is its own peak
    optimizer.param_groups[0]["initial_lr"] = 0.04
    assert lr_share(optimizer) == pytest.approx(0.75)
    optimizer.param_groups[0]["lr"] = 0.05  # above the peak (a warm-up overshoot): 1
    assert lr_share(optimizer) == 1.0


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
    settings = {
        "epochs": 2, "stage1_epochs": 1, "ema_decay": 0.9, "ema_memory": "fixed",
        "keep_latent": True, **kw,
    }  # fmt: skip
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


def test_a_run_feeds_each_update_the_rate_of_its_step_and_ends_on_the_live_weights(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
    monkeypatch,
) -> None:
    """--ema-memory lr in a 1 + 1 run: each stage's first update sees its step's rate, the
    peak (share 1, not the next step's), the shares fall with the cosine, and where the
    cosine reaches zero the packed model is the last step's weights."""
    shares: list[tuple[int, float]] = []
    real_update = WeightAverage.update

    def spy(self, model, lr_share: float = 1.0) -> None:
        shares.append((self.updates + 1, lr_share))
        real_update(self, model, lr_share)

    monkeypatch.setattr(WeightAverage, "update", spy)
    cfg = ema_config(small_cifar, resnet20_weights, tmp_path, "lr", ema_memory="lr")
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()
    assert [k for k, _ in shares] == [*range(1, STEPS + 1)] * 2
    for stage in (shares[:STEPS], shares[STEPS:]):
        values = [share for _, share in stage]
        assert values[0] == 1.0 and values == sorted(values, reverse=True), values
        assert 0 < values[-1] < 0.1  # the cosine's last step, not yet zero
    rows = list(csv.DictReader((tmp_path / "lr" / "summary.csv").open()))
    assert all(r["val_top1"] == r["val_top1_live"] for r in rows)  # keep 0 at the end
    packed, _ = parse(tmp_path / "lr" / "last.safetensors")
    live = dict(binary_layers(trainer.parts.model))
    for name, layer in latent_layers(packed).items():
        assert torch.equal(layer.weight, live[name].weight), name


def test_ctrl_c_inside_a_stage_resumes_the_lr_following_average_to_the_bit(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """With --min-lr above zero the average never becomes the live weights, so the packed
    file at the end shows every update's rate: Ctrl-C three steps into stage 2, --resume,
    and the average and the packed file equal those of a run never stopped."""

    def config(name: str) -> TrainConfig:
        kw = {"ema_memory": "lr", "min_lr": 4e-3, "ema_decay": 0.99}
        return ema_config(small_cifar, resnet20_weights, tmp_path, name, **kw)

    straight = Trainer(config("straight"), quiet=True)
    straight.fit()
    live = dict(binary_layers(straight.parts.model))
    packed, _ = parse(tmp_path / "straight" / "last.safetensors")
    stored = latent_layers(packed)
    assert any(not torch.equal(stored[n].weight, live[n].weight) for n in stored)
    ctrl_c_then_resume_equals_straight(config, tmp_path, STEPS + 3, 2 * STEPS)
    a, b = (
        torch.load(tmp_path / n / "resume.pt", map_location="cpu", weights_only=True)["average"]
        for n in ("straight", "broken")
    )
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_runs_saved_before_the_average_resume_without_it() -> None:
    cfg = TrainConfig.from_dict({"model": "resnet20", "data": "d", "recipe": "finetune"})
    assert cfg.ema_decay == 0.0 and cfg.ema_memory == "fixed"
    assert TrainConfig(model="m", data="d", recipe="paper").ema_decay == 0.0


def test_finetune_packs_an_average_that_follows_the_rate_and_paper_the_last_step() -> None:
    """Issue 27's eighth round: the finetune default; the authors' recipe has no average."""
    cfg = TrainConfig(model="m", data="d")
    assert (cfg.ema_decay, cfg.ema_memory, cfg.ema_warmup_power) == (0.999, "lr", 0.75)
    assert TrainConfig(model="m", data="d", recipe="paper").ema_decay == 0.0
