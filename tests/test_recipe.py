"""The short fine-tune recipe: thresholds, calibration, two stages, feature distillation,
parameter groups, recipes by name, format version 2, step-0 numbers."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from recu_cli.binarize.layers import BinaryConv2d, ReCUConv2d
from recu_cli.bnn import binary_layers, convert_model, to_deploy
from recu_cli.calibrate import calibrate_thresholds, one_sided_share, sign_balance
from recu_cli.convert_config import ConvertConfig
from recu_cli.models import create_model
from recu_cli.stats import model_stats
from recu_cli.training import TrainConfig, Trainer, param_groups
from recu_cli.training.distill import attention_loss, attention_map, feature_points
from tests.resume_checks import assert_continued, assert_fresh_run, saved_position
from tests.test_cli_models import assert_one_line_error, run_cli
from tests.test_runtime import ENGINES_HERE, signed_input
from tests.test_train import final_state, small_cifar  # noqa: F401 - fixture

DATA = Path(__file__).parent / "data"


def one_by_one(latent: float, threshold: bool = True) -> ReCUConv2d:
    layer = ReCUConv2d(
        1, 1, 1, standardize=False, clamp=False, rescale_activations=False,
        act_threshold=threshold,
    )  # fmt: skip
    with torch.no_grad():
        layer.weight.fill_(latent)
        layer.alpha.fill_(1.0)
    return layer


def test_threshold_forward_and_gradient_by_hand() -> None:
    layer = one_by_one(0.7)
    with torch.no_grad():
        layer.act_threshold.fill_(0.5)
    x = torch.tensor([0.2, 0.9, -0.4, 0.5]).view(1, 1, 1, 4).requires_grad_(True)
    out = layer(x)
    # x - beta = [-0.3, 0.4, -0.9, 0.0] -> sign [-1, +1, -1, +1] (sign(0) = +1), w = +1
    assert out.flatten().tolist() == [-1.0, 1.0, -1.0, 1.0]
    (out.flatten() * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    # ApproxSign: grad * max(0, 2 - 2|x - beta|) = [1*1.4, 2*1.2, 3*0.2, 4*2.0]
    want = torch.tensor([1.4, 2.4, 0.6, 8.0])
    assert torch.allclose(x.grad.flatten(), want, atol=1e-6)
    assert layer.act_threshold.grad.item() == pytest.approx(-want.sum().item(), abs=1e-5)
    deploy = BinaryConv2d.from_recu(layer.eval())
    assert torch.equal(deploy(x.detach()), layer(x.detach()))


def test_no_threshold_is_the_paper_layer() -> None:
    a, b = one_by_one(0.7, threshold=False), one_by_one(0.7)
    x = torch.randn(2, 1, 3, 3)
    assert a.act_threshold is None and "act_threshold" not in a.state_dict()
    assert torch.equal(a(x), b(x))  # a zero threshold changes nothing


def test_calibration_balances_a_one_sided_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        ReCUConv2d(3, 4, 3, padding=1, act_threshold=True),
        nn.BatchNorm2d(4),
        ReCUConv2d(4, 5, 3, padding=1, act_threshold=True),
    ).eval()
    images = torch.rand(16, 3, 8, 8) + 0.5  # every value positive: sign() is constant +1
    before = sign_balance(model, images)
    assert torch.equal(before["0"], torch.ones(3))
    assert one_sided_share({"0": before["0"]}) == 1.0
    assert calibrate_thresholds(model, images) == 2
    want = images.transpose(0, 1).reshape(3, -1).median(dim=1).values
    assert torch.equal(model[0].act_threshold.detach(), want)
    # the second layer was calibrated on what the calibrated first layer gives it
    second_in = model[1](model[0](images)).detach()
    want2 = second_in.transpose(0, 1).reshape(4, -1).median(dim=1).values
    assert torch.allclose(model[2].act_threshold.detach(), want2)
    after = sign_balance(model, images)
    assert torch.all((after["0"] - 0.5).abs() < 0.01), after["0"]  # continuous input
    # binary-conv outputs are few distinct values: ties at the median go to +1
    assert torch.all((after["2"] >= 0.5) & (after["2"] < 0.6)), after["2"]
    assert one_sided_share(after) == 0.0


def test_stage_one_uses_real_centred_weights_and_the_switch_sets_alpha() -> None:
    torch.manual_seed(1)
    layer = ReCUConv2d(4, 6, 3, padding=1, act_threshold=True).eval()
    x = torch.randn(2, 4, 5, 5)
    layer.binarize_weights = False
    w0 = layer.weight - layer.weight.mean(dim=(1, 2, 3), keepdim=True)
    xb = torch.where(layer.shifted_input(x) >= 0, 1.0, -1.0)
    ref = nn.functional.conv2d(xb, w0, None, 1, 1)
    assert torch.allclose(layer(x), ref, atol=1e-6)
    layer.binarize_weights = True
    layer.reset_alpha_from_latent()
    assert torch.allclose(layer.alpha.flatten(), w0.abs().mean(dim=(1, 2, 3)))
    wb = torch.where(w0 >= 0, 1.0, -1.0)
    binary = nn.functional.conv2d(xb, wb, None, 1, 1) * layer.alpha
    assert torch.allclose(layer(x), binary, atol=1e-6)


def test_parameter_groups_split_latents_fp_weights_and_the_rest() -> None:
    model, _ = create_model("resnet20", num_classes=10)
    model, _ = convert_model(model, ConvertConfig(activation="prelu", act_threshold="median"))
    groups = param_groups(model, 1e-3, 1e-5, other_lr_scale=4.0, other_weight_decay=0.0)
    latent = {id(m.weight) for _, m in binary_layers(model)}
    assert {id(p) for p in groups[0]["params"]} == latent
    assert groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 1e-5
    assert groups[1]["lr"] == groups[2]["lr"] == 4e-3
    assert [p.ndim for p in groups[1]["params"]] == [4, 2]  # stem conv, classifier
    names = {id(p): n for n, p in model.named_parameters()}
    rest = {names[id(p)].rsplit(".", 1)[-1] for p in groups[2]["params"]}
    assert rest == {"weight", "bias", "alpha", "act_threshold"}  # BN/PReLU weights, ...
    assert groups[2]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_attention_loss_and_matched_points() -> None:
    f = torch.randn(2, 3, 4, 4)
    assert attention_loss([f], [f]).item() == 0.0
    assert torch.allclose(attention_map(f).norm(dim=1), torch.ones(2))
    # by hand: sample 0 of the student has channels [1, 2] and [3, 0] at two positions, so
    # mean_c F^2 = [5, 2] and A = [5, 2] / sqrt(29); the teacher's [0, 1], [0, -1] give
    # A = [0, 1]. Sample 1 is the same in both (distance 0); a second point, identical too.
    s = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]], [[[1.0, 1.0]], [[2.0, 0.5]]]])
    t = torch.tensor([[[[0.0, 1.0]], [[0.0, -1.0]]], [[[1.0, 1.0]], [[2.0, 0.5]]]])
    assert attention_map(s)[0].tolist() == pytest.approx([5 / 29**0.5, 2 / 29**0.5])
    assert attention_map(t)[0].tolist() == pytest.approx([0.0, 1.0])
    d = math.sqrt(25 / 29 + (2 / 29**0.5 - 1) ** 2)
    assert attention_loss([s, f], [t, f]).item() == pytest.approx(d / 2, rel=1e-6)
    r20, _ = create_model("resnet20", num_classes=10)
    r56, _ = create_model("resnet56", num_classes=10)
    student, _ = convert_model(create_model("resnet20", num_classes=10)[0])
    assert feature_points(student, r20) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert feature_points(student, r56) == ["layer1", "layer2", "layer3"]


def test_logit_distillation_by_hand_and_the_recipes_temperature() -> None:
    """Soft labels at temperature T, scaled by T^2 (distill.py), as the training loss uses
    them: teacher logits [2 ln 2, 0] and student logits [0, 2 ln 3]. At T = 2 the teacher's
    softmax is [2/3, 1/3] and the student's log-softmax ln[1/4, 3/4]; at T = 1, [4/5, 1/5]
    against ln[1/10, 9/10]."""
    from types import SimpleNamespace

    from recu_cli.training.distill import distillation_loss
    from recu_cli.training.steps import forward_loss

    teacher = torch.tensor([[2 * math.log(2), 0.0]])
    student = torch.tensor([[0.0, 2 * math.log(3)]])
    t2 = -(2 / 3 * math.log(1 / 4) + 1 / 3 * math.log(3 / 4)) * 4
    t1 = -(0.8 * math.log(0.1) + 0.2 * math.log(0.9))
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(t2, rel=1e-6)
    assert distillation_loss(student, teacher, 1.0).item() == pytest.approx(t1, rel=1e-6)
    # the run's loss reads the run's temperature: the finetune recipe's 2, the paper's 1
    finetune = TrainConfig(model="m", data="d")
    paper = TrainConfig(model="m", data="d", recipe="paper")
    assert (finetune.kd_temperature, paper.kd_temperature) == (2.0, 1.0)
    assert TrainConfig(model="m", data="d", kd_temperature=4.0).kd_temperature == 4.0
    fixed = SimpleNamespace(
        ddp_model=lambda x: student, teacher=lambda x: teacher, features=None,
        amp_dtype=None, device=torch.device("cpu"), sign_penalty=None,
    )  # fmt: skip
    labels = torch.tensor([1])
    for cfg, expected in ((finetune, t2), (paper, t1)):
        loss = forward_loss(cfg, fixed, torch.zeros(1, 3, 2, 2), labels)
        assert loss.item() == pytest.approx(expected, rel=1e-6)


def thresholded_resnet20(weights: Path, images: torch.Tensor) -> nn.Module:
    model, _ = create_model("resnet20", weights=weights)
    model, _ = convert_model(model, ConvertConfig(activation="prelu", act_threshold="median"))
    calibrate_thresholds(model, images)
    return model.eval()


def test_packed_round_trip_with_thresholds_and_runtime_engines(resnet20_weights, tmp_path) -> None:
    from recu_cli import pack
    from recu_cli.runtime import to_runtime
    from tests.conftest import cifar_batch

    images, _ = cifar_batch(64)
    model = thresholded_resnet20(resnet20_weights, images)
    thr = {n: m.act_threshold.detach().clone() for n, m in binary_layers(model)}
    assert all(bool((t != 0).any()) for t in thr.values())
    spec = create_model("resnet20")[1]
    path = tmp_path / "t.safetensors"
    config = ConvertConfig(activation="prelu", act_threshold="median")
    pack.save(path, model, spec, config, stats=model_stats(model))
    raw = load_file(path)
    for name, t in thr.items():
        assert torch.equal(raw[f"{name}.act_threshold"], t)
    assert pack.read(path).format_version == 2
    loaded = pack.load(path)
    with torch.no_grad():
        ref = to_deploy(model)(images)
        assert torch.equal(loaded(images), ref)
        for engine in ENGINES_HERE:
            assert torch.equal(to_runtime(loaded, engine)(images), ref), engine


def test_runtime_conv_with_thresholds_is_exact_on_odd_shapes() -> None:
    from recu_cli.runtime import fast_conv
    from tests.test_runtime import batch_norm, binary_conv

    for cin, cout, stride, pad in ((37, 65, 2, 1), (5, 7, 1, 0), (64, 64, 1, 1)):
        layer = binary_conv(cin, cout, 3, stride, pad, 1)
        layer.register_buffer("act_threshold", torch.randn(cin) * 0.5)
        x = signed_input(2, cin, 9)
        x[:, :, 0, 0] = layer.act_threshold  # exact ties: x == beta must give +1
        bn = batch_norm(cout)
        with torch.no_grad():
            ref = bn(layer(x))
            for engine in ENGINES_HERE:
                assert torch.equal(fast_conv(layer, engine, bn)(x), ref), (engine, cin, cout)


def test_version_1_file_still_loads(capsys) -> None:
    from recu_cli import pack

    path = DATA / "packed-v1-resnet20.safetensors"
    packed = pack.read(path)
    assert packed.format_version == 1 and packed.recipe.act_threshold == "zero"
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = pack.load(path)(x)
    want = load_file(DATA / "packed-v1-resnet20.logits.safetensors")["logits"]
    # the binary layers are exact; the float stem and classifier round by the CPU's kernels
    # (bit-equal where the fixture was written, 1.2e-6 apart on an AVX512 Xeon)
    torch.testing.assert_close(logits, want, rtol=0.0, atol=1e-5)
    assert torch.equal(logits.argmax(1), want.argmax(1))
    code, out, _ = run_cli(["info", str(path), "--json"], capsys)
    assert code == 0 and json.loads(out)


def test_convert_dry_run_reports_step0(capsys, small_cifar, resnet20_weights) -> None:  # noqa: F811
    code, out, err = run_cli(
        ["convert", "resnet20", "--weights", str(resnet20_weights), "--data", str(small_cifar),
         "--dry-run", "--json", "-j", "0"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    step0 = json.loads(out)["step0"]
    # the pretrained network on small_cifar's 60 val images, counted here
    from torchvision import datasets

    from recu_cli.data import build_transform

    model, spec = create_model("resnet20", weights=resnet20_weights)
    val = datasets.ImageFolder(str(small_cifar / "val"), transform=build_transform(spec, False))
    xs, ys = zip(*(val[i] for i in range(len(val))), strict=True)
    with torch.no_grad():
        right = int((model.eval()(torch.stack(xs)).argmax(1) == torch.tensor(ys)).sum())
    assert step0["fp_top1"] == pytest.approx(100 * right / len(ys)) and right > 0.6 * len(ys)
    for key in ("before", "after"):
        assert 0 <= step0[key]["one_sided_share"] <= 1
    assert step0["after"]["one_sided_share"] < step0["before"]["one_sided_share"]


def finetune_config(data: Path, weights: Path, out: Path, name: str, **kw) -> TrainConfig:
    from recu_cli.recipes import recipe_settings

    settings = recipe_settings("finetune", kw.get("epochs", 2))
    conv = settings.pop("convert")
    base = dict(
        model="resnet20", data=str(data), weights=str(weights), batch_size=16, workers=0,
        output=str(out), experiment=name, log_interval=0, seed=3, step0_eval=False,
        calib_images=64, convert=ConvertConfig(**conv).to_dict(),
    )  # fmt: skip
    return TrainConfig(**{**base, **settings, **kw})


def test_two_stage_run_resumes_exactly_across_the_boundary(
    capsys,
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    straight = finetune_config(small_cifar, resnet20_weights, tmp_path, "straight", epochs=2)
    assert straight.stage1_epochs == 1 and straight.feature_kd > 0
    trainer = Trainer(straight, quiet=True)
    result = trainer.fit()
    total = 2 * trainer.steps_per_epoch
    assert trainer.steps_per_epoch == 120 // 16  # small_cifar's 120 training images
    assert_fresh_run(tmp_path / "straight", total, result)
    rows = list(csv.DictReader((tmp_path / "straight" / "summary.csv").open()))
    assert [r["stage"] for r in rows] == ["1", "2"]
    assert float(rows[1]["tau"]) == pytest.approx(0.85)  # the schedule spans stage 2
    share = {k: result["step0"][k]["one_sided_share"] for k in ("before", "after")}
    assert share["after"] < share["before"]
    # stopped exactly at the stage boundary (the end of epoch 1), then resumed
    broken = finetune_config(
        small_cifar, resnet20_weights, tmp_path, "broken", epochs=2,
        max_steps=trainer.steps_per_epoch,
    )  # fmt: skip
    Trainer(broken, quiet=True).fit()
    run = tmp_path / "broken"
    assert not (run / "last.safetensors").exists()  # stage 1 has nothing to pack
    saved = saved_position(run)
    assert saved == {"epoch": 2, "step_in_epoch": 0, "global_step": trainer.steps_per_epoch}
    resumed = Trainer(TrainConfig(**{**broken.__dict__, "max_steps": None}), run_dir=run,
                      quiet=True).fit()  # fmt: skip
    assert_continued(run, saved, total, resumed)
    a, b = final_state(tmp_path / "straight"), final_state(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigint_inside_stage_two_resumes_to_the_bit(
    capsys,
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    import re
    import signal
    import subprocess
    import sys

    from tests.test_train import same_threads_env

    args = [
        "binarize", "resnet20", "--weights", str(resnet20_weights), "--data", str(small_cifar),
        "--epochs", "2", "-b", "16", "--seed", "5", "--log-interval", "1", "--no-step0-eval",
        "--calib-images", "32", "-o", str(tmp_path),
    ]  # fmt: skip
    code, out, err = run_cli([*args, "-j", "0", "--experiment", "straight", "--json"], capsys)
    assert code == 0, err
    total = 2 * (120 // 16)  # small_cifar's 120 training images in batches of 16
    assert_fresh_run(tmp_path / "straight", total, json.loads(out))
    proc = subprocess.Popen(
        [sys.executable, "-m", "recu_cli", *args, "-j", "1", "--experiment", "broken"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=same_threads_env(),  # float sums depend on the thread count
    )  # fmt: skip
    for line in proc.stderr:
        if re.search(r"epoch 2 step 3/", line):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    saved = saved_position(tmp_path / "broken")
    assert saved["epoch"] == 2 and saved["step_in_epoch"] >= 3  # Ctrl-C after step 3
    code, out, err = run_cli(["binarize", "--resume", str(tmp_path / "broken"), "--json"], capsys)
    assert code == 0, err
    assert_continued(tmp_path / "broken", saved, total, json.loads(out))
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "broken")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pa, pb = (load_file(tmp_path / n / "last.safetensors") for n in ("straight", "broken"))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_stage_switch_changes_exactly_what_it_says(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    cfg = finetune_config(
        small_cifar, resnet20_weights, tmp_path, "switch", epochs=2, switch_moments="reset"
    )
    trainer = Trainer(cfg, quiet=True)
    assert trainer.state.stage == 1
    assert all(not m.binarize_weights for _, m in binary_layers(trainer.parts.model))
    trainer.parts.optimizer.state[next(trainer.parts.model.parameters())]["x"] = torch.zeros(1)
    with torch.no_grad():
        for _, m in binary_layers(trainer.parts.model):
            m.alpha.fill_(1.0)  # as if stage 1 had moved them
    before = {k: v.clone() for k, v in trainer.parts.model.state_dict().items()}
    trainer.state.pos.epoch, trainer.state.pos.global_step = 1, trainer.steps_per_epoch
    trainer.loop.enter_stage(2, switching=True)
    after = trainer.parts.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.alpha" for n, _ in binary_layers(trainer.parts.model)}
    assert all(m.binarize_weights for _, m in binary_layers(trainer.parts.model))
    assert len(trainer.parts.optimizer.state) == 0
    assert trainer.parts.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.base_lr)


def test_switch_moments_keep_carries_adams_state_into_stage_two(
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    cfg = finetune_config(small_cifar, resnet20_weights, tmp_path, "keep", epochs=2)
    assert cfg.switch_moments == "keep"  # the finetune recipe's, since issue 27
    trainer = Trainer(cfg, quiet=True)
    first = next(trainer.parts.model.parameters())
    trainer.parts.optimizer.state[first]["exp_avg"] = torch.ones(3)
    trainer.state.pos.epoch, trainer.state.pos.global_step = 1, trainer.steps_per_epoch
    trainer.loop.enter_stage(2, switching=True)
    assert torch.equal(trainer.parts.optimizer.state[first]["exp_avg"], torch.ones(3))
    assert all(m.binarize_weights for _, m in binary_layers(trainer.parts.model))


def test_autocast_bf16_steps_of_the_recipe_on_cpu(
    capsys,
    small_cifar,  # noqa: F811
    resnet20_weights,
    tmp_path,
) -> None:
    """The mixed-precision path (CPU bf16 autocast = the CUDA bf16 code) trains and packs."""
    code, out, err = run_cli(
        ["binarize", "resnet20", "--weights", str(resnet20_weights), "--data", str(small_cifar),
         "--epochs", "2", "--max-steps", "10", "-b", "16", "-j", "0", "--amp",
         "--no-step0-eval", "--calib-images", "32", "-o", str(tmp_path), "--experiment", "amp",
         "--log-interval", "1", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    log = (tmp_path / "amp" / "train.log").read_text()
    losses = [float(x.split()[0]) for x in log.split(" loss ")[1:]]
    assert len(losses) >= 10 and all(math.isfinite(v) for v in losses)
    assert "bf16 autocast" in log
    # what bf16 training packed is the model its (fp32) validation measured
    from tests.test_train import packed_top1

    result = json.loads(out)
    assert packed_top1(Path(result["last"]), str(small_cifar), capsys) == pytest.approx(
        result["final"]["val_top1"]
    )


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--epochs", "4", "--stage1-epochs", "4"], "--stage1-epochs"),
        (["--feature-kd", "-1"], "--feature-kd"),
        (["--other-lr-scale", "-2"], "--other-lr-scale"),
        (["--act-threshold", "mean"], "--act-threshold"),
        (["--recipe", "fast"], "--recipe"),
        (["--teacher", "none", "--feature-kd", "1"], "--feature-kd"),
    ],
)
def test_bad_recipe_values(capsys, extra, fragment, tmp_path) -> None:
    code, _, err = run_cli(
        ["binarize", "resnet20", "--data", "demo", "-o", str(tmp_path), *extra], capsys
    )
    assert_one_line_error(code, err, fragment)
    assert not any(tmp_path.iterdir())


def test_main_job_binarizes_the_shipped_pretrained_demo_model(capsys, tmp_path) -> None:
    """`recu binarize resnet20 --data demo` starts from the shipped full-precision weights."""
    from recu_cli.demo import DEMO_WEIGHTS

    assert DEMO_WEIGHTS.is_file() and DEMO_WEIGHTS.stat().st_size < 1_100_000
    code, out, err = run_cli(
        ["binarize", "resnet20", "--data", "demo", "--epochs", "2", "-j", "0",
         "-o", str(tmp_path), "--experiment", "demo", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["weights"] == str(DEMO_WEIGHTS)
    step0 = result["step0"]
    assert step0["fp_top1"] > 75  # a trained network, not a random one
    assert step0["before"]["top1"] < 30 and step0["after"]["one_sided_share"] == 0.0
    rows = list(csv.DictReader((tmp_path / "demo" / "summary.csv").open()))
    assert [r["stage"] for r in rows] == ["1", "2"]
    # one epoch (31 steps) per stage recovers most of the network (71 % here, 70 % at
    # --kd-temperature 1). Not fewer stage-2 steps: a stage 2 cut to 5 steps by --max-steps
    # is measured mid-restart (12-33 % depending on the thread count)
    assert result["final"]["val_top1"] > step0["before"]["top1"] + 30


def test_a_larger_max_steps_on_resume_starts_stage_two_where_the_run_stands(
    capsys, tmp_path
) -> None:
    """A run cut by --max-steps inside stage 1 and resumed with a larger --max-steps enters
    stage 2 at its own step: stage 2's warm-up-free cosine starts there. (It used to be
    placed at stage 2's nominal first step, 25 steps ahead: lr -24, NaN two steps later.)"""
    run = tmp_path / "cut"
    args = ["binarize", "resnet20", "--data", "demo", "--epochs", "2", "-o", str(tmp_path),
            "--experiment", "cut", "--log-interval", "1", "-q", "--no-step0-eval"]  # fmt: skip
    code, _, err = run_cli([*args, "--max-steps", "6"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["binarize", "--resume", str(run), "--max-steps", "12", "-q"], capsys)
    assert code == 0, err
    assert [r["stage"] for r in csv.DictReader((run / "summary.csv").open())] == ["1", "2"]
    log = (run / "train.log").read_text()
    lrs = [float(x) for x in re.findall(r"epoch 2 step \d+/\d+ loss \S+ lr (\S+)", log)]
    peak = 8e-3  # the finetune recipe's lr
    # 6 steps of stage 2: lr(t) = peak (1 + cos(pi t / 6)) / 2 after step t = 1..6
    want = [peak * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(1, 7)]
    assert lrs == pytest.approx(want, rel=5e-3, abs=1e-9), lrs
