"""--stage2-feature-kd-scale: the attention loss weighed per stage, by hand, in a real run,
and across an interrupted one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from recu_cli.bnn import binary_layers
from recu_cli.errors import RecuError
from recu_cli.training import TrainConfig, Trainer
from recu_cli.training.distill import attention_loss
from recu_cli.training.steps import forward_loss
from tests.test_compile import recipe_model, step_parts
from tests.test_recipe import finetune_config
from tests.test_switch import STEPS, ctrl_c_then_resume_equals_straight
from tests.test_train import small_cifar  # noqa: F401


def test_each_stage_takes_its_weight() -> None:
    cfg = TrainConfig(model="resnet20", data="demo")  # finetune: 6, then half of it
    assert (cfg.attention_weight(1), cfg.attention_weight(2)) == (6.0, 3.0)
    cfg = TrainConfig(model="resnet20", data="demo", feature_kd=3.0, stage2_feature_kd_scale=1.0)
    assert (cfg.attention_weight(1), cfg.attention_weight(2)) == (3.0, 3.0)
    # one stage (the paper's binary weights from step 0): --feature-kd, unscaled
    one = TrainConfig(
        model="resnet20", data="demo", recipe="paper", feature_kd=2.0, stage2_feature_kd_scale=0.5
    )
    assert one.attention_weight(2) == 2.0


def test_no_teacher_needs_only_feature_kd_zero() -> None:
    """The scale multiplies --feature-kd: `--teacher none --feature-kd 0` is enough."""
    TrainConfig(model="resnet20", data="demo", teacher="none", feature_kd=0.0).validate()
    with pytest.raises(RecuError, match="needs a teacher"):
        TrainConfig(model="resnet20", data="demo", teacher="none").validate()


def test_a_run_saved_before_the_scale_resumes_with_one() -> None:
    """A run's config.json without the key trained stage 2 at --feature-kd's weight."""
    saved = TrainConfig(model="resnet20", data="demo", feature_kd=6.0).to_dict()
    del saved["stage2_feature_kd_scale"]
    cfg = TrainConfig.from_dict(saved)
    assert (cfg.attention_weight(1), cfg.attention_weight(2)) == (6.0, 6.0)


def test_a_run_weighs_the_attention_loss_per_stage(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """The weight each training forward sees: --feature-kd through stage 1, the stage-2
    weight from the switch on; and the loss it builds is the rest plus weight times the
    attention loss of that forward's taps."""
    cfg = finetune_config(
        small_cifar, resnet20_weights, tmp_path, "per-stage", epochs=2, feature_kd=2.0,
        stage2_feature_kd_scale=0.25,
    )  # fmt: skip
    trainer = Trainer(cfg, quiet=True)
    parts = trainer.parts
    seen: list[float] = []

    def record(module, _inputs) -> None:
        if module.training:
            seen.append(float(parts.attention_weight.tensor))

    binary_layers(parts.model)[0][1].register_forward_pre_hook(record)
    trainer.fit()
    assert seen == [2.0] * STEPS + [0.5] * STEPS

    # the loss of one batch at two weights differs by their difference times the
    # attention loss of the taps (taken here from a forward of the same model)
    parts.model.train()
    images, targets = next(iter(parts.train_loader))
    state = {k: v.clone() for k, v in parts.model.state_dict().items()}
    with torch.no_grad():
        parts.attention_weight.set(0.5)
        low = forward_loss(cfg, parts, images, targets)
        parts.attention_weight.set(2.0)
        high = forward_loss(cfg, parts, images, targets)
        parts.model.load_state_dict(state)  # BatchNorm's running statistics: unchanged
        parts.model(images), parts.teacher(images)
        student, teacher = (tap.take() for tap in parts.features)
        at = attention_loss(student, teacher)
    assert at > 0
    assert float(high - low) == pytest.approx(1.5 * float(at), rel=1e-4)


def test_ctrl_c_in_stage_two_resumes_with_its_weight_to_the_bit(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """Ctrl-C at stage 2's third step, then --resume (which enters stage 2 without a
    switch): the same weights and packed file as a run never stopped (that the weight
    reaches the step is the per-stage test's)."""

    def config(name: str) -> TrainConfig:
        return finetune_config(
            small_cifar, resnet20_weights, tmp_path, name, epochs=2,
            stage2_feature_kd_scale=0.5,
        )  # fmt: skip

    Trainer(config("straight"), quiet=True).fit()
    saved = ctrl_c_then_resume_equals_straight(config, tmp_path, STEPS + 3, 2 * STEPS)
    assert saved == {"epoch": 2, "step_in_epoch": 3, "global_step": STEPS + 3}


def test_a_compiled_loss_reads_the_new_weight_without_recompiling() -> None:
    """The compiled loss (what --compile runs, captured as a CUDA graph on a GPU) reads the
    weight as a tensor: after the switch's in-place change it gives the eager loss at the
    new weight, from the same graph."""
    from torch._dynamo.testing import CompileCounter

    model, teacher = recipe_model("resnet20", "finetune")
    parts = step_parts(model, teacher, taps=True)
    cfg = SimpleNamespace(kd_temperature=2.0, kd_weight=1.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 7, 3, 0])
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda x, y: forward_loss(cfg, parts, x, y, cache=False), backend=counter, fullgraph=True
    )
    with torch.no_grad():
        for weight in (6.0, 3.0, 0.0):
            parts.attention_weight.set(weight)
            eager = forward_loss(cfg, parts, x, y)
            assert torch.allclose(compiled(x, y), eager, rtol=1e-5), weight
    assert counter.frame_count == 1
