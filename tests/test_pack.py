"""The packed format: bit layout, sizes, and save -> load round trips on real data."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from recu_cli import pack
from recu_cli.binarize.layers import BinaryConv2d
from recu_cli.bnn import binary_layers, convert_model, set_tau
from recu_cli.convert_config import ConvertConfig
from recu_cli.models import create_model
from recu_cli.report.info import summarize
from recu_cli.stats import model_stats

# ---------------------------------------------------------------- bit layout


def test_bit_layout_by_hand() -> None:
    # one output channel, 10 weights: + - - - - - - + | + -  -> 0b10000001, 0b10_000000
    row = torch.tensor([1.0, -1, -1, -1, -1, -1, -1, 1, 1, -1])
    two = torch.stack([row, -row]).view(2, 10, 1, 1)
    bits = pack.pack_signs(two)
    assert bits.dtype == torch.uint8 and bits.shape == (2, 2)
    assert bits.tolist() == [[0x81, 0x80], [0x7E, 0x40]]  # pad bits are 0 on every row
    assert torch.equal(pack.unpack_signs(bits, (2, 10, 1, 1)), two)


def test_sign_zero_packs_as_plus_one() -> None:
    w = torch.tensor([0.0, -0.0, -1.0, 2.0]).view(1, 1, 2, 2)
    assert pack.pack_signs(w).tolist() == [[0b1101_0000]]


def test_nonzero_padding_bits_are_rejected() -> None:
    with pytest.raises(ValueError, match="padding"):
        pack.unpack_signs(torch.tensor([[0xFF, 0xFF]], dtype=torch.uint8), (1, 10, 1, 1))


@pytest.mark.parametrize("k", [1, 7, 8, 9, 27, 64, 576])
def test_pack_round_trip_random(k: int) -> None:
    torch.manual_seed(k)
    w = torch.randn(5, k, 1, 1).sign()
    w[w == 0] = 1
    bits = pack.pack_signs(w)
    assert bits.shape == (5, math.ceil(k / 8))
    assert torch.equal(pack.unpack_signs(bits, w.shape), w)


# ---------------------------------------------------------------- round trips


class _FirstImages(Dataset):
    """The first n images of every class folder (sorted), without walking whole trees."""

    def __init__(self, root: Path, n_per_class: int) -> None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.items = [
            (root / c / f, y)
            for y, c in enumerate(classes)
            for f in sorted(os.listdir(root / c))[:n_per_class]
        ]
        self.tf = transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, y = self.items[i]
        with Image.open(path) as im:
            return self.tf(im.convert("RGB")), y


def _images(root: Path, n_per_class: int) -> DataLoader:
    return DataLoader(_FirstImages(root, n_per_class), batch_size=40, num_workers=0)


def _train_a_little(model: nn.Module, loader: DataLoader, steps: int) -> None:
    """A few real SGD steps, so BN statistics, alpha and the latent weights all move."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def _assert_same_outputs(trained: nn.Module, loaded: nn.Module, loader: DataLoader) -> None:
    with torch.no_grad():
        for x, _ in loader:
            a, b = trained(x), loaded(x)
            assert torch.equal(a.argmax(1), b.argmax(1))
            rel = (a - b).abs().max() / a.abs().max()
            assert rel <= 1e-5, f"logits differ by {float(rel):.2e} relative"


@pytest.mark.parametrize(
    ("name", "pretrained", "steps"), [("resnet20", True, 3), ("resnet18", False, 2)]
)
def test_round_trip_after_training(
    name: str, pretrained: bool, steps: int, cifar_dir: Path, request, tmp_path
) -> None:
    """Real weights (resnet20) or timm's init (resnet18), real SGD steps, real images."""
    data = cifar_dir
    w = request.getfixturevalue("resnet20_weights") if pretrained else None
    torch.manual_seed(0)
    config = ConvertConfig(tau=0.9)
    model, spec = create_model(name, num_classes=10, weights=w)
    model, _ = convert_model(model, config)
    first = next(iter(binary_layers(model)))[1]
    alpha0 = first.alpha.detach().clone()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    mean0 = bn.running_mean.clone()
    _train_a_little(model, _images(data / "train", 8), steps)
    assert not torch.equal(first.alpha, alpha0) and not torch.equal(bn.running_mean, mean0)
    set_tau(model, 0.95)

    history = [{"epoch": 0, "tau": 0.9, "top1": 12.5}, {"epoch": 1, "tau": 0.95, "top1": 20.0}]
    out = tmp_path / "sub" / f"{name}.safetensors"
    summary = pack.save(
        out,
        model,
        spec,
        config,
        training={"steps": steps},
        history=history,
        stats=model_stats(model),
    )
    assert sorted(os.listdir(out.parent)) == [out.name]  # no .tmp left behind
    assert summary["bytes"] == out.stat().st_size

    loaded = pack.load(out)
    assert not loaded.training
    assert sum(isinstance(m, BinaryConv2d) for m in loaded.modules()) == summary["binary_layers"]
    _assert_same_outputs(model, loaded, _images(data / "val", 4))

    info = pack.read(out)
    assert info.tau == pytest.approx(0.95)
    assert info.history == history and info.training == {"steps": steps}
    assert pack.read_spec(out) == spec
    assert [s["name"] for s in info.stats] == [n for n, _ in binary_layers(model)]


def test_keep_latent_restores_the_training_layers(tmp_path) -> None:
    torch.manual_seed(1)
    config = ConvertConfig(tau=0.85)
    model, spec = create_model("resnet20")
    model, _ = convert_model(model, config)
    path = tmp_path / "latent.safetensors"
    summary = pack.save(path, model, spec, config, keep_latent=True, stats=model_stats(model))
    packed = pack.read(path)
    assert packed.has_latent and summary["latent_values"] == summary["binary_weights"]
    restored = pack.latent_layers(packed)
    signs = pack.read_signs(packed)
    for name, layer in binary_layers(model):
        assert torch.equal(restored[name].dead_mask(), layer.dead_mask())
        assert torch.equal(restored[name].binary_weight(), signs[name])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), pack.load(path)(x))


# ---------------------------------------------------------------- sizes


def test_resnet18_imagenet_sizes(tmp_path) -> None:
    """1 bit per binary weight; ResNet-18 (1000 classes) in <= 4.4 MB, <= 2.9 MB with half."""
    torch.manual_seed(2)
    config = ConvertConfig(tau=0.85)
    model, spec = create_model("resnet18", num_classes=1000)
    model, _ = convert_model(model, config)
    layers = binary_layers(model)

    full = pack.save(tmp_path / "r18.safetensors", model, spec, config, stats=model_stats(model))
    half = pack.save(
        tmp_path / "r18-half.safetensors", model, spec, config, half=True, stats=model_stats(model)
    )
    assert full["binary_weights"] == 10_985_472
    rows = [(m.out_channels, m.weight[0].numel()) for _, m in layers]
    assert full["binary_bytes"] == sum(o * math.ceil(k / 8) for o, k in rows)
    assert full["binary_bytes"] <= full["binary_weights"] / 8 + sum(o for o, _ in rows)
    assert 0.70e6 <= full["full_precision_values"] <= 0.74e6
    assert full["bytes"] <= 4.4e6
    assert half["bytes"] <= 2.9e6

    info = summarize(tmp_path / "r18.safetensors")["totals"]
    assert info["file_bytes"] == full["bytes"]
    assert info["bits_per_binary_weight"] == pytest.approx(1.0, abs=1e-3)
    assert info["float32_bytes"] == pytest.approx(46.8e6, rel=2e-3)
    assert info["bops"] == pytest.approx(1.676e9, rel=1e-3)  # Bi-Real ResNet-18: 1.68e9 BOPs
    print(
        f"\nresnet18/1000: {full['bytes']:,} B fp32, {half['bytes']:,} B half, "
        f"{info['float32_bytes']:,} B float32-equivalent, OPs {info['ops']:.4g}"
    )

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model.eval()(x), pack.load(tmp_path / "r18.safetensors")(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_save_is_atomic_and_replaces(tmp_path) -> None:
    config = ConvertConfig()
    model, spec = create_model("resnet20")
    model, _ = convert_model(model, config)
    path = tmp_path / "a" / "b" / "m.safetensors"
    pack.save(path, model, spec, config, stats=model_stats(model))
    first = path.read_bytes()
    pack.save(path, model, spec, config, half=True, stats=model_stats(model))
    assert path.read_bytes() != first and sorted(os.listdir(path.parent)) == ["m.safetensors"]


def test_load_leaves_rng_alone_and_cpu_rebuild_path_agrees(tmp_path, monkeypatch) -> None:
    torch.manual_seed(3)
    config = ConvertConfig(tau=0.85, activation="prelu")
    model, spec = create_model("resnet20")
    model, _ = convert_model(model, config)
    path = tmp_path / "m.safetensors"
    pack.save(path, model, spec, config, stats=model_stats(model))
    x = torch.randn(2, 3, 32, 32)
    state = torch.get_rng_state()
    fast = pack.load(path)
    assert torch.equal(torch.get_rng_state(), state)
    # models with non-persistent buffers are rebuilt on the CPU instead of from meta
    monkeypatch.setattr(pack.rebuild, "_materializable", lambda _m: False)
    slow = pack.load(path)
    with torch.no_grad():
        ref = model.eval()(x)
        assert torch.equal(fast(x), ref) and torch.equal(slow(x), ref)
