"""The compiled step's check against the eager step (training/step_check.py): its
arithmetic by hand, and a run whose compiler freezes the latent weights in stage 2 (the
fault of the first H200 run, made on purpose through a torch.compile backend) going on
eagerly from that stage's first batch, with the eager run's result."""

from __future__ import annotations

import math

import pytest
import torch

from recu_cli.bnn import binary_layers
from recu_cli.training.step_check import MAX_NORM_RATIO, compare, cosine_and_ratio
from tests.test_compile import run_to_end
from tests.test_train import small_cifar  # noqa: F401 - fixture


def test_cosine_and_ratio_by_hand() -> None:
    # eager (3, 4): norm 5; compiled (0, 10): norm 10, dot 40, cosine 40 / 50 = 0.8
    cos, ratio = cosine_and_ratio(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 10.0]))
    assert (cos, ratio) == pytest.approx((0.8, 2.0))
    assert cosine_and_ratio(torch.zeros(3), torch.zeros(3)) == (1.0, 1.0)
    assert cosine_and_ratio(torch.ones(2), torch.zeros(2)) == (0.0, 0.0)  # frozen
    assert cosine_and_ratio(torch.zeros(2), torch.ones(2))[1] == math.inf


def test_compare_bounds_each_latent_weights_gradient_norm() -> None:
    names = ["a.weight", "b.weight", "bn.bias"]
    eager = [torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0])]
    # a: 2x its norm, the bound itself (ok); b: 0.6x; bn.bias 100x (not a latent weight)
    compiled = [torch.tensor([0.0, 10.0]), torch.tensor([0.0, 0.6]), torch.tensor([100.0])]
    agreement = compare(names, eager, compiled, {"a.weight", "b.weight"})
    assert agreement.lowest == pytest.approx((0.6, "b.weight"))
    assert agreement.highest[1] == "a.weight" and agreement.highest[0] == pytest.approx(2.0)
    assert agreement.ok
    # the whole: dot 4 * 10 + 1 * 100 = 140 over norms sqrt(27) and sqrt(10100.36)
    assert agreement.cosine == pytest.approx(140 / math.sqrt(27 * 10100.36))
    compiled[1] = torch.zeros(2)  # b frozen
    assert not compare(names, eager, compiled, {"a.weight", "b.weight"}).ok
    compiled[1] = torch.tensor([0.0, 0.6])
    compiled[0] = torch.tensor([0.0, 10.0 * 1.01])  # a just above 2x
    assert MAX_NORM_RATIO == 2.0
    assert not compare(names, eager, compiled, {"a.weight", "b.weight"}).ok
    # no latent weights: the whole gradient's norm
    only_bn = compare(["bn.bias"], eager[2:], [torch.tensor([1.5])], set())
    assert only_bn.lowest == pytest.approx((1.5, "all parameters")) and only_bn.ok


def test_compile_auto_is_on_for_one_cuda_process_only() -> None:
    from recu_cli.training.optim import compile_enabled

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_enabled("auto", cuda) and not compile_enabled("auto", cpu)
    assert not compile_enabled("auto", cuda, distributed=True)  # torchrun: eager
    assert compile_enabled("on", cpu) and compile_enabled("on", cuda, distributed=True)
    assert not compile_enabled("off", cuda)


def frozen_in_stage_two(model: torch.nn.Module):
    """A torch.compile backend that runs the traced graph as it is, except once the weights
    are binary: then no gradient reaches the latent weights (those inputs detached)."""
    layers = [m for _, m in binary_layers(model)]
    latent = {id(m.weight) for m in layers}

    def backend(gm, example_inputs):
        def run(*args):
            if layers[0]._weight_mix == 1.0:
                args = tuple(a.detach() if id(a) in latent else a for a in args)
            return gm(*args)

        return run

    return backend


def test_a_compiler_that_freezes_stage_two_is_caught_and_the_run_goes_on_eagerly(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """Stage 1 compiled (checked: the faulty backend is right there), stage 2's check finds
    every latent weight's gradient at 0x and the rest of the run is eager; with the
    CPU stand-in of the CUDA graph captured in stage 1 and dropped at the switch. Stage 2
    then moves every latent weight, which the faulty compiled step would have left where
    they were (the eager run's numbers are not expected to the bit: dynamo's graph, run
    with eager kernels, rounds a few operations differently)."""
    from recu_cli.training import TrainConfig
    from recu_cli.training.fast_step import EagerRunner, FastStep

    cfg = TrainConfig(
        model="resnet20", data=str(small_cifar), weights=str(resnet20_weights), epochs=2,
        stage1_epochs=1, batch_size=24, workers=0, output=str(tmp_path), experiment="faulty",
        log_interval=0, step0_eval=False, teacher="none", feature_kd=0.0, seed=4,
    )  # fmt: skip
    steps: list[FastStep] = []
    at_switch: dict[str, torch.Tensor] = {}

    def faulty(trainer):
        model = trainer.parts.model
        backend = frozen_in_stage_two(model)

        def snapshot(module, _inputs) -> None:
            if module.training and module._weight_mix == 1.0 and not at_switch:
                at_switch.update({n: m.weight.detach().clone() for n, m in binary_layers(model)})

        binary_layers(model)[0][1].register_forward_pre_hook(snapshot)
        steps.append(
            FastStep(
                trainer.cfg,
                trainer.info,
                trainer.parts,
                trainer.run.log,
                runner=EagerRunner,
                backend=backend,
            )  # fmt: skip
        )
        return steps[0]

    model, _, rows = run_to_end(cfg, faulty)
    (step,) = steps
    assert step.mode == "eager" and step.runner is None and not step.compiled
    log = (tmp_path / "faulty" / "train.log").read_text()
    # (the step is made after the run entered stage 1, so its first check names the run's)
    assert "compiled step checked against the eager step on the run's first batch" in log
    assert (
        "note: the compiled step's gradients differ from the eager step's on stage 2's "
        "first batch (latent-weight gradient norms 0.000x"
    ) in log
    assert "training continues eagerly" in log
    assert "training step: compiled + replayed step (CPU), warm-up" in log  # stage 1's graph
    assert [r["stage"] for r in rows] == ["1", "2"]
    assert len(at_switch) == 18
    for name, before in at_switch.items():
        assert not torch.equal(model[f"{name}.weight"], before), name  # stage 2 trained it
