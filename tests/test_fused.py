"""The xnor fast path: fused Bi-Real blocks and stem tail, and --fp-layers int8.

Every fused path must equal the float deploy form in NHWC bit for bit: odd channel counts
(64-bit words and 32-channel blocks straddled), stride 2, padding 0 and 1, activation
thresholds with exact ties, each activation, each ISA this CPU runs.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from recu_cli.blocks import BiRealBasicBlock
from recu_cli.errors import RecuError
from recu_cli.runtime import ext, to_runtime
from tests.test_runtime import batch_norm, binary_conv, needs_xnor, signed_input

pytestmark = needs_xnor
NHWC = torch.channels_last


def _act(kind: str, channels: int, seed: int) -> nn.Module:
    if kind == "prelu":
        act = nn.PReLU(channels)
        with torch.no_grad():
            act.weight.copy_(torch.randn(channels, generator=torch.Generator().manual_seed(seed)))
        return act
    if kind == "prelu1":
        return nn.PReLU(1, init=-0.3)
    return {"hardtanh": nn.Hardtanh(), "relu": nn.ReLU(), "identity": nn.Identity()}[kind]


def _block(cin: int, cout: int, k: int, stride: int, act: str, thresholds: bool, seed: int):
    pad = k // 2
    conv1 = binary_conv(cin, cout, k, stride, pad, 1, bias=seed % 2 == 1, seed=seed)
    conv2 = binary_conv(cout, cout, k, 1, pad, 1, seed=seed + 1)
    ds = None
    if stride != 1 or cin != cout:
        ds = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), batch_norm(cout, seed + 7))
    block = BiRealBasicBlock(conv1, batch_norm(cout, seed + 2), conv2, batch_norm(cout, seed + 3),
                             ds, "hardtanh")  # fmt: skip
    block.act1, block.act2 = _act(act, cout, seed + 4), _act(act, cout, seed + 5)
    if thresholds:
        g = torch.Generator().manual_seed(seed + 6)
        conv1.act_threshold = torch.randn(cin, generator=g).mul(0.3).round(decimals=1)
        conv2.act_threshold = torch.randn(cout, generator=g).mul(0.3).round(decimals=1)
    return block.eval()


def _ties(x: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
    """Put exact threshold values into the input, where x >= beta must give +1."""
    if values is None:
        return x
    x = x.clone()
    x[:, :, ::3, ::2] = values.view(1, -1, 1, 1)
    return x


BLOCKS = [  # (cin, cout, k, stride): 1x1 blocks have padding 0, 3x3 ones padding 1
    (37, 37, 3, 1),
    (37, 70, 3, 2),
    (64, 64, 3, 1),
    (65, 33, 1, 1),
    (16, 32, 1, 2),
]


ACTS = ["hardtanh", "prelu", "prelu1", "relu", "identity"]
# every shape with the default activation and thresholds; every activation, with and
# without thresholds, on the strided block with a conv shortcut and odd channel counts
CASES = [(s, "hardtanh", True) for s in BLOCKS] + [
    (BLOCKS[1], a, t) for a in ACTS for t in (False, True) if (a, t) != ("hardtanh", True)
]


@pytest.mark.parametrize(
    ("shape", "act", "thresholds"),
    CASES,
    ids=["c{}-{}_k{}_s{}".format(*s) + f"-{a}-{'beta' if t else 'zero'}" for s, a, t in CASES],
)
def test_fused_block_is_bit_identical_to_the_float_block(shape, act, thresholds) -> None:
    from recu_cli.runtime.fused import FusedBasicBlock

    cin, cout, k, stride = shape
    block = _block(cin, cout, k, stride, act, thresholds, seed=sum(shape))
    x = _ties(signed_input(2, cin, 9), block.conv1.act_threshold).contiguous(memory_format=NHWC)
    with torch.no_grad():
        ref = copy.deepcopy(block).to(memory_format=NHWC)(x)
        for isa in ext.supported_isas():
            fast = to_runtime(nn.Sequential(block), "xnor", channels_last=True)
            assert isinstance(fast[0], FusedBasicBlock), "the block was not fused"
            fast[0].conv1._isa_code = fast[0].conv2._isa_code = ext.isa_code(isa)
            out = fast(x)
            assert out.is_contiguous(memory_format=NHWC)
            assert torch.equal(out, ref), f"{isa}: max diff {(out - ref).abs().max():.3g}"


def test_fused_block_takes_nchw_input_and_keeps_python_shortcuts() -> None:
    from recu_cli.models.zoo import OptionAShortcut

    block = _block(16, 32, 3, 2, "hardtanh", True, seed=3)
    block.downsample = OptionAShortcut(8)  # no conv: the shortcut stays a Python module
    x = signed_input(3, 16, 10)
    with torch.no_grad():
        ref = copy.deepcopy(block).to(memory_format=NHWC)(x.contiguous(memory_format=NHWC))
        fast = to_runtime(nn.Sequential(block), "xnor", channels_last=True)
        assert torch.equal(fast(x), ref)  # NCHW input: the block computes in NHWC
        assert torch.equal(copy.deepcopy(fast)(x), ref)  # C++ objects rebuilt after a copy
        buf = io.BytesIO()
        torch.save(fast, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), ref)


def test_blocks_with_extra_layers_are_left_alone() -> None:
    from recu_cli.runtime.fused import FusedBasicBlock

    block = _block(16, 16, 3, 1, "hardtanh", False, seed=5)
    block.se = nn.Sigmoid()  # something between bn2 and the add: not fusable
    fast = to_runtime(nn.Sequential(block), "xnor", channels_last=True)
    assert not isinstance(fast[0], FusedBasicBlock)
    x = signed_input(1, 16, 8).contiguous(memory_format=NHWC)
    with torch.no_grad():
        assert torch.equal(fast(x), copy.deepcopy(block).to(memory_format=NHWC)(x))
    plain = to_runtime(nn.Sequential(_block(16, 16, 3, 1, "hardtanh", False, 6)), "xnor")
    assert not isinstance(plain[0], FusedBasicBlock)  # NCHW keeps the per-layer path


@pytest.mark.parametrize("act", ["hardtanh", "relu", "prelu", "identity"])
@pytest.mark.parametrize("pool", [(3, 2, 1), (2, 2, 0), None], ids=["p3s2", "p2s2", "nopool"])
def test_stem_tail_matches_bn_act_maxpool(act, pool) -> None:
    from recu_cli.runtime.fused import ActSpec, FusedStemTail

    c = 37
    bn, act_mod = batch_norm(c, 11), _act(act, c, 12)
    mp = nn.MaxPool2d(*pool) if pool else None
    x = torch.randn(2, c, 15, 13).contiguous(memory_format=NHWC)
    x[0, 3, 4, 5] = float("nan")  # max-pool propagates NaN
    with torch.no_grad():
        ref = act_mod(bn(x))
        ref = mp(ref) if mp else ref
        for isa in ext.supported_isas():
            tail = FusedStemTail(bn, ActSpec.of(act_mod, c), mp, ext.isa_code(isa))
            out = tail(x)
            assert torch.equal(out.isnan(), ref.isnan()), isa
            assert torch.equal(out.nan_to_num(), ref.nan_to_num()), isa


def _random_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.3, 0.3, generator=g)
    return model


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18", "resnet20"])
def test_whole_models_fuse_and_stay_bit_identical(name) -> None:
    from recu_cli.bnn import convert_model, to_deploy
    from recu_cli.models import create_model
    from recu_cli.runtime.fused import FusedBasicBlock, FusedStage, FusedStem, FusedStemTail

    model, spec = create_model(name)
    deploy = _random_stats(to_deploy(convert_model(model)[0]).eval())
    size = 32 if name == "resnet20" else 64
    x = torch.randn(3, 3, size, size).contiguous(memory_format=NHWC)
    with torch.no_grad():
        float_nhwc = copy.deepcopy(deploy).to(memory_format=NHWC)
        fast = to_runtime(deploy, "xnor", channels_last=True)
        assert torch.equal(fast(x), float_nhwc(x))  # batch of 3: the stem runs image by image
        assert torch.equal(fast(x[:1]), float_nhwc(x[:1]))
        assert torch.equal(copy.deepcopy(fast)(x), float_nhwc(x))  # C++ chains rebuilt
    kinds = [type(m) for m in fast.modules()]
    assert kinds.count(FusedBasicBlock) == (9 if name == "resnet20" else 8)
    # stages whose shortcuts all run in C++ become one chain; resnet20's option-A
    # shortcuts (layer2, layer3) stay Python modules, so those stages stay per block
    assert kinds.count(FusedStage) == (1 if name == "resnet20" else 4)
    assert kinds.count(FusedStemTail) == kinds.count(FusedStem) == 1
    assert fast.conv1.__class__ is FusedStem and fast.conv1._per_image == {(3, 3, size, size): True}


def test_converted_resnet20_fused_on_real_images(resnet20_weights) -> None:
    """Pretrained weights, calibrated thresholds, real images: same logits as the float model."""
    from recu_cli.bnn import convert_model, to_deploy
    from recu_cli.calibrate import calibrate_thresholds
    from recu_cli.convert_config import ConvertConfig
    from recu_cli.models import create_model
    from tests.conftest import cifar_batch

    images, _ = cifar_batch(100)
    model, _ = create_model("resnet20", weights=resnet20_weights)
    converted = convert_model(model, ConvertConfig(act_threshold="median"))[0]
    assert calibrate_thresholds(converted, images[:50]) == 18
    deploy = to_deploy(converted).eval()
    xin = images.contiguous(memory_format=NHWC)
    with torch.no_grad():
        ref = copy.deepcopy(deploy).to(memory_format=NHWC)(xin)
        out = to_runtime(deploy, "xnor", channels_last=True)(xin)
    assert torch.equal(out, ref)


def test_quantize_u8_rounds_like_torch() -> None:
    x = torch.randn(2, 5, 7, 9) * 4
    x.view(-1)[:6] = torch.tensor([0.5, 1.5, -0.5, 2.5, 1e6, -1e6]) * 0.03  # halfway points
    x = x.contiguous(memory_format=NHWC)
    want = torch.quantize_per_tensor(x, 0.03, 121, torch.quint8).int_repr()
    for isa in ext.supported_isas():
        got = ext.ops().quantize_u8(x, 0.03, 121, ext.isa_code(isa))
        assert got.dtype == torch.uint8 and got.is_contiguous(memory_format=NHWC)
        assert torch.equal(got, want), isa


def test_fp_layers_int8_is_close_and_calibrated(resnet20_weights) -> None:
    """int8 stem / shortcuts / classifier: not exact, but the BNN's predictions barely move."""
    from recu_cli.bnn import convert_model, to_deploy
    from recu_cli.models import create_model
    from recu_cli.runtime.fp_int8 import Int8Conv2d, Int8Linear
    from tests.conftest import cifar_batch

    images, labels = cifar_batch(200)
    model, _ = create_model("resnet20", weights=resnet20_weights)
    deploy = to_deploy(convert_model(model)[0]).eval()
    with torch.no_grad():
        exact = to_runtime(deploy, "xnor", channels_last=True)(images)
        fast = to_runtime(deploy, "xnor", channels_last=True, fp_layers="int8",
                          calibration=[images[100:]])  # fmt: skip
        out = fast(images[:100])
    kinds = [type(m) for m in fast.modules()]
    assert kinds.count(Int8Conv2d) == 1 and kinds.count(Int8Linear) == 1  # stem, classifier
    stem = fast.conv1.conv  # FusedStem(Int8Conv2d, tail)
    assert stem.x_scale * 255 >= float(images[100:].max() - images[100:].min()) * 0.999
    agree = (out.argmax(1) == exact[:100].argmax(1)).float().mean().item()
    # measured: 96 of these 100 predictions kept (the same with 32 or 50 calibration
    # images), 94 on an AVX512 Xeon, whose quantized kernels round otherwise; two images of
    # margin below that (a broken int8 path changes far more: the classes are 10)
    assert agree >= 0.92, f"int8 float layers changed {100 - 100 * agree:.0f}% of predictions"
    assert not torch.equal(out, exact[:100])  # it really runs in int8


def test_fp_layers_bad_input() -> None:
    block = nn.Sequential(_block(16, 16, 3, 1, "hardtanh", False, seed=9))
    with pytest.raises(RecuError, match="calibration"):
        to_runtime(block, "xnor", channels_last=True, fp_layers="int8")
    with pytest.raises(RecuError, match="--fp-layers must be one of"):
        to_runtime(block, "xnor", fp_layers="fp16")


def test_eval_runtime_cli_nhwc_and_int8_float_layers(tmp_path, capsys, resnet20_weights) -> None:
    """`recu eval --runtime xnor` (the NHWC fast path) gives the torch model's numbers in
    the same layout; --fp-layers int8 runs, calibrated, and only with a runtime engine."""
    import json

    from recu_cli.data import build_data, calibration_images
    from recu_cli.pack import load, read_spec
    from tests.conftest import link_tree
    from tests.test_cli_models import assert_one_line_error, run_cli

    data = link_tree(tmp_path / "data", {"train": 4, "val": 10})  # real images, every class
    packed = tmp_path / "r20.safetensors"
    code, _, err = run_cli(
        ["convert", "resnet20", "--weights", str(resnet20_weights), "-o", str(packed)], capsys
    )
    assert code == 0, err
    common = ["--data", str(data), "-b", "100", "-j", "0", "--json"]

    def top1(*extra: str) -> dict:
        code, out, err = run_cli(["eval", str(packed), *common, *extra], capsys)
        assert code == 0, err
        return json.loads(out)

    torch_nhwc = top1("--channels-last")
    fast = top1("--runtime", "xnor")
    assert fast["top1"] == torch_nhwc["top1"] and fast["loss"] == torch_nhwc["loss"]
    int8 = top1("--runtime", "xnor", "--fp-layers", "int8", "--calib-images", "32")
    # the same: the runtime built here on the 32 training images eval says it calibrates on
    spec = read_spec(packed)
    bundle = build_data(str(data), spec, train=True)
    calibration = list(calibration_images(bundle, 32, seed=0).split(64))
    model = to_runtime(load(packed), "xnor", channels_last=True, fp_layers="int8",
                       calibration=calibration)  # fmt: skip
    xs, ys = zip(*(bundle.val[i] for i in range(len(bundle.val))), strict=True)
    with torch.no_grad():
        logits = model(torch.stack(xs).contiguous(memory_format=NHWC))
    right = int((logits.argmax(1) == torch.tensor(ys)).sum())
    assert int8["images"] == 100 and int8["top1"] == pytest.approx(100 * right / len(ys))
    loss = nn.functional.cross_entropy(logits, torch.tensor(ys)).item()
    assert int8["loss"] == pytest.approx(loss, rel=1e-5)
    assert int8["loss"] != fast["loss"]  # int8 float layers really ran
    code, _, err = run_cli(["eval", str(packed), *common, "--fp-layers", "int8"], capsys)
    assert_one_line_error(code, err, "--fp-layers applies to --runtime")
    code, _, err = run_cli(["eval", str(packed), *common, "--runtime", "xnor",
                            "--fp-layers", "fp16"], capsys)  # fmt: skip
    assert_one_line_error(code, err, "--fp-layers must be one of")


def test_bench_json_reports_fp_layers_and_the_nhwc_default(capsys) -> None:
    import json

    from tests.test_cli_models import run_cli

    args = ["bench", "resnet20", "--json", "--threads", "1", "--batch", "2", "--engine", "xnor",
            "--min-time", "0.01", "--min-runs", "3"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    exact = json.loads(out)
    assert exact["channels_last"] is True and exact["fp_layers"] == "exact"
    assert exact["results"][0]["identical_outputs"] is True
    code, out, err = run_cli([*args, "--fp-layers", "int8"], capsys)
    assert code == 0, err
    int8 = json.loads(out)
    assert int8["fp_layers"] == "int8"
    row = int8["results"][0]
    assert row["bit_exact"] is True  # the binary layers stay integer-exact
    assert row["identical_outputs"] is False and row["max_rel_diff"] > 0  # the rest is int8
