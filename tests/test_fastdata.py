"""The fast data paths (recu_cli/fastdata) against the PIL path, on the CPU: the same
augmentation (bit for bit for a given crop and flip; uniform crops and flips), batches that
depend only on (seed, epoch, index), unreadable images named and counted, the decoded-data
cache rebuilt when its tree or its file changes, and the GPU path's arithmetic (decode,
crop-and-resize, colour jitter, prefetch thread) checked where it runs on the CPU."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from recu_cli.data import build_data, build_transform
from recu_cli.errors import RecuError
from recu_cli.fastdata import cache
from recu_cli.fastdata import choice as choice_mod
from recu_cli.fastdata.choice import _decoded, choose
from recu_cli.fastdata.decode import Decoded
from recu_cli.fastdata.jpeg import (
    Assembler,
    Decoder,
    JpegFiles,
    JpegLoader,
    collate_raw,
    color_jitter,
)
from recu_cli.fastdata.plans import jpeg_eval_plan, jpeg_train_plan, small_plan
from recu_cli.fastdata.prefetch import Prefetcher
from recu_cli.fastdata.resample import crop_box, crop_resize, resize_center_box
from recu_cli.fastdata.resident import ResidentSet, ResidentTrainLoader, ResidentValLoader, augment
from recu_cli.imagecheck import BadItem, collate
from recu_cli.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from recu_cli.training.sampling import EpochBatchSampler, SeededItems
from tests.conftest import link_tree
from tests.test_trust import bad_tree

CPU = torch.device("cpu")
SMALL = ModelSpec("resnet20", "timm", 10, (3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, "bilinear", 1.0)
LARGE = ModelSpec("resnet18", "timm", 10, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, "bicubic",
                  0.95)  # fmt: skip
CHI2_DF8_P001 = 26.12  # chi-square with 8 degrees of freedom: exceeded with probability 0.001


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """8 training and 2 validation CIFAR-10 JPEGs per class, linked."""
    return link_tree(tmp_path_factory.mktemp("fast"), {"train": 8, "val": 2})


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))


def quiet(*_a, **_k) -> None:
    pass


# ---------------------------------------------------------------- resident: same augmentation


def test_resident_crop_and_flip_equal_the_pil_transform_bit_for_bit(tree) -> None:
    """Each PIL-path training tensor is exactly one of the 81 crops x 2 flips the resident
    path can make of the same image; validation tensors are equal outright."""
    data = build_data(str(tree), SMALL)
    decoded, _ = _decoded(data.train, small_plan(data.train.transform, True), (3, 32, 32), 0,
                          quiet)  # fmt: skip
    rset = ResidentSet(decoded, CPU, SMALL.mean, SMALL.std)
    grid = torch.tensor([[i, j, f] for i in range(9) for j in range(9) for f in (0, 1)])
    seen = set()
    for k, index in enumerate((0, 17, 33, 58, 79)):
        candidates = rset.normalise(augment(rset.images, torch.full((162,), index), grid, 4))
        for seed in range(6):
            torch.manual_seed(1000 * k + seed)
            pil, _ = data.train[index]
            hits = [c for c in range(162) if torch.equal(candidates[c], pil)]
            assert len(hits) == 1, (index, seed, hits)
            seen.add(hits[0])
    assert len(seen) > 20  # many different crops and both flips were met
    assert {grid[h, 2].item() for h in seen} == {0, 1}
    val_decoded, _ = _decoded(data.val, small_plan(data.val.transform, False), (3, 32, 32), 0,
                              quiet)  # fmt: skip
    val_set = ResidentSet(val_decoded, CPU, SMALL.mean, SMALL.std)
    images, targets = next(iter(ResidentValLoader(val_set, 20)))
    expected = collate([data.val[i] for i in range(20)])
    assert torch.equal(images, expected[0]) and torch.equal(targets, expected[1])


class Coordinates(Dataset):
    """n 32x32 images whose red channel is row + 1 and green channel column + 1: a crop's
    offsets and flip can be read back from the augmented image."""

    def __init__(self, n: int, transform=None) -> None:
        ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
        self.image = torch.stack([ys + 1, xs + 1, torch.zeros_like(ys)]).to(torch.uint8)
        self.n = n
        self.transform = transform
        self.targets = [0] * n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img = Image.fromarray(self.image.permute(1, 2, 0).numpy())
        return self.transform(img), 0


def offsets_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flip) of crops of Coordinates images, from uint8-valued [B, 3, 32, 32]."""
    mid = x[:, :, 16, :]  # row 16 of any crop lies inside the image (pad 4)
    top = x[:, 0, 16, 16] - 13
    flip = mid[:, 1, 17] < mid[:, 1, 16]
    left = torch.where(flip, mid[:, 1, 16] - 12, mid[:, 1, 16] - 13)
    return top.long(), left.long(), flip


def chi2_uniform(values: torch.Tensor, k: int) -> float:
    counts = torch.bincount(values, minlength=k).double()
    expected = values.numel() / k
    return float(((counts - expected) ** 2 / expected).sum())


def test_crops_and_flips_are_uniform_on_both_paths() -> None:
    n = 900
    tf = build_transform(SMALL, train=True)
    pil_items = SeededItems(Coordinates(n, tf), seed=3)
    mean = torch.tensor(SMALL.mean).view(1, 3, 1, 1)
    std = torch.tensor(SMALL.std).view(1, 3, 1, 1)
    pil = torch.stack([pil_items[i][0] for i in range(n)])
    pil = (pil * std + mean).mul(255).round()
    rset = ResidentSet(
        Decoded(Coordinates(n).image.expand(n, -1, -1, -1).contiguous(), torch.zeros(n).long()),
        CPU, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
    )  # fmt: skip
    sampler = EpochBatchSampler(n, 100, seed=3)
    resident = torch.cat([b[0] for b in ResidentTrainLoader(rset, sampler, 3, 4)]).mul(255).round()
    for name, images in (("pil", pil), ("resident", resident)):
        top, left, flip = offsets_of(images)
        assert top.min() >= 0 and top.max() <= 8 and left.min() >= 0 and left.max() <= 8, name
        assert chi2_uniform(top, 9) < CHI2_DF8_P001, name
        assert chi2_uniform(left, 9) < CHI2_DF8_P001, name
        assert abs(int(flip.sum()) - n / 2) < 4 * math.sqrt(n / 4), name


def test_resident_batches_depend_only_on_seed_epoch_and_index() -> None:
    """A loader built afresh and started at batch 3 (a resumed run) gives the batches the
    uninterrupted one gave; in another epoch each image gets another crop or flip."""
    n = 64
    g = torch.Generator().manual_seed(0)
    decoded = Decoded(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                      torch.arange(n) % 10)  # fmt: skip

    def epoch_batches(epoch: int, start: int) -> tuple[list[int], list]:
        sampler = EpochBatchSampler(n, 8, seed=5)
        sampler.set_epoch(epoch, start)
        rset = ResidentSet(decoded, CPU, SMALL.mean, SMALL.std)
        order = [j % n for b in sampler for j in b]
        return order, list(ResidentTrainLoader(rset, sampler, 5, 4))

    _, whole = epoch_batches(1, 0)
    _, resumed = epoch_batches(1, 3)
    assert len(whole) == 8 and len(resumed) == 5
    for a, b in zip(whole[3:], resumed, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    by_index = []
    for epoch in (1, 2):
        order, batches = epoch_batches(epoch, 0)
        by_index.append(dict(zip(order, torch.cat([b[0] for b in batches]), strict=True)))
    same = sum(torch.equal(by_index[0][i], by_index[1][i]) for i in range(n))
    assert same < 6  # 1 in 162 expected


# ---------------------------------------------------------------- unreadable images, cache


def test_unreadable_images_are_named_once_per_epoch_and_kept_by_the_cache(tmp_path) -> None:
    data_dir = link_tree(tmp_path / "data", {"train": 3, "val": 1})
    files = bad_tree(data_dir, "train")  # 33 images, 3 of them unreadable
    data = build_data(str(data_dir), SMALL)
    plan = small_plan(data.train.transform, True)
    notes: list[str] = []
    decoded, status = _decoded(data.train, plan, (3, 32, 32), 0, notes.append)
    assert status == "decoded and cached" and not notes
    reasons = {Path(p).name: why for p, why in decoded.bad.values()}
    assert reasons == {
        "zz_empty.jpg": "empty file, 0 bytes",
        "zz_text.jpg": "not an image file PIL can read",
        "zz_truncated.jpg": "truncated image",
    }
    again, status = _decoded(data.train, plan, (3, 32, 32), 0, notes.append)
    assert status == "cache hit" and again.bad == decoded.bad
    sampler = EpochBatchSampler(33, 11, seed=0)
    loader = ResidentTrainLoader(ResidentSet(again, CPU, SMALL.mean, SMALL.std), sampler, 0, 4)
    batches = list(loader)
    skipped = [item.path for b in batches for item in b.bad]
    assert sorted(skipped) == sorted(str(p) for p in files.values())
    assert sum(b[0].shape[0] for b in batches) == 30 and all(
        b[0].shape[0] == b[1].shape[0] for b in batches
    )


def test_cache_is_rebuilt_when_a_file_changes_or_the_cache_is_damaged(tmp_path) -> None:
    data_dir = link_tree(tmp_path / "data", {"train": 2, "val": 1})
    data = build_data(str(data_dir), SMALL)
    plan = small_plan(data.train.transform, True)
    shape = (3, 32, 32)
    notes: list[str] = []
    first, status = _decoded(data.train, plan, shape, 0, notes.append)
    assert status == "decoded and cached"
    second, status = _decoded(data.train, plan, shape, 0, notes.append)
    assert status == "cache hit" and torch.equal(first.images, second.images)
    # a file replaced by another image: the tree's key changes, that image is decoded anew
    victim, donor = Path(data.train.samples[0][0]), Path(data.train.samples[5][0])
    content = donor.read_bytes()
    victim.unlink()
    victim.write_bytes(content)
    third, status = _decoded(data.train, plan, shape, 0, notes.append)
    assert status == "tree changed: decoded and cached"
    assert torch.equal(third.images[0], first.images[5])
    assert not torch.equal(third.images[0], first.images[0])
    entry = next((tmp_path / "cache" / "decoded").glob("*.safetensors"))
    assert len(list(entry.parent.iterdir())) == 1  # one entry per tree, overwritten
    # one flipped byte in the tensor data: caught by the SHA-256, rebuilt, never used
    raw = bytearray(entry.read_bytes())
    raw[-100] ^= 0xFF
    entry.write_bytes(bytes(raw))
    fourth, status = _decoded(data.train, plan, shape, 0, notes.append)
    assert status == "decoded again and cached" and torch.equal(fourth.images, third.images)
    assert len(notes) == 1 and "SHA-256 mismatch" in notes[0] and str(entry) in notes[0]
    for damage in (raw[: len(raw) // 2], b"not a safetensors file"):
        entry.write_bytes(bytes(damage))
        again, status = _decoded(data.train, plan, shape, 0, notes.append)
        assert status == "decoded again and cached" and torch.equal(again.images, third.images)
    assert cache.load(entry, cache.content_key(data_dir / "train", data.train.samples,
                                               "other steps"), shape)[1] == "changed"  # fmt: skip


# ---------------------------------------------------------------- which path, and why


def make_loaders(sampler):
    def train(ds, collate_fn):
        return DataLoader(SeededItems(ds, 0), batch_sampler=sampler, collate_fn=collate_fn)

    def val(ds, collate_fn):
        return DataLoader(ds, batch_size=16, collate_fn=collate_fn)

    return train, val


def pick(requested: str, data, spec: ModelSpec):
    sampler = EpochBatchSampler(len(data.train), 8, seed=0)
    train, val = make_loaders(sampler)
    return choose(requested, CPU, data, spec, 0, sampler, 16, None, 0, train, val, quiet)


def test_auto_takes_the_resident_path_only_where_it_applies(tree, monkeypatch) -> None:
    small = pick("auto", build_data(str(tree), SMALL), SMALL)
    assert small.choice.path == "resident" and isinstance(small.train, ResidentTrainLoader)
    assert "80 + 20 validation images" in small.choice.line
    large = pick("auto", build_data(str(tree), LARGE), LARGE)
    assert large.choice.path == "pil" and large.train is None
    assert "224 px inputs" in large.choice.why and "gpu-decode is for CUDA" in large.choice.why
    with pytest.raises(RecuError, match="--data-path resident: 224 px inputs"):
        pick("resident", build_data(str(tree), LARGE), LARGE)
    monkeypatch.setattr(choice_mod, "resident_budget", lambda device: 1000)
    over = pick("auto", build_data(str(tree), SMALL), SMALL)
    assert over.choice.path == "pil" and "more than its budget of 0 MB" in over.choice.why
    assert pick("pil", build_data(str(tree), SMALL), SMALL).choice.why == "--data-path pil"


def test_images_of_other_sizes_keep_the_pil_path(tmp_path) -> None:
    """A 40x32 image resized to shorter side 32 is 32x40: no single tensor holds the set."""
    data_dir = link_tree(tmp_path / "data", {"train": 1, "val": 1})
    Image.new("RGB", (40, 32), (10, 200, 30)).save(data_dir / "train" / "cat" / "wide.jpg")
    data = build_data(str(data_dir), SMALL)
    auto = pick("auto", data, SMALL)
    assert auto.choice.path == "pil" and "different sizes" in auto.choice.why
    with pytest.raises(RecuError, match="--data-path resident: images decode to"):
        pick("resident", data, SMALL)


# ---------------------------------------------------------------- the GPU path, on the CPU


def test_gpu_path_draws_the_pil_paths_crops_flips_and_jitter(tree) -> None:
    """Under the same per-image seeds the GPU path's images (decoded by PIL in the workers
    on the CPU) are the PIL path's up to resampling rounding; another seed is far off."""
    data = build_data(str(tree), LARGE)
    plan = jpeg_train_plan(data.train.transform)
    assert plan.interpolation == "bicubic" and plan.jitter is not None and plan.flip == 0.5
    assemble = Assembler(plan, CPU, Decoder(CPU))
    picks = [80 * 3 + i for i in range(0, 80, 10)]  # epoch 3
    pil = collate([SeededItems(data.train, 5)[i] for i in picks])
    same = assemble(collate_raw([SeededItems(JpegFiles(data.train.samples, plan, False), 5)[i]
                                 for i in picks]))  # fmt: skip
    other = assemble(collate_raw([SeededItems(JpegFiles(data.train.samples, plan, False), 6)[i]
                                  for i in picks]))  # fmt: skip
    assert torch.equal(same[1], pil[1])
    assert (same[0] - pil[0]).abs().amax(dim=(1, 2, 3)).max() < 0.15  # ~8 of 255 grey levels
    assert (other[0] - pil[0]).abs().amax(dim=(1, 2, 3)).min() > 1.0
    val_plan = jpeg_eval_plan(data.val.transform)
    assert (val_plan.resize, val_plan.size) == (235, 224)
    val = Assembler(val_plan, CPU, Decoder(CPU))(
        collate_raw([JpegFiles(data.val.samples, val_plan, False)[i] for i in range(8)])
    )
    expected = collate([data.val[i] for i in range(8)])
    assert (val[0] - expected[0]).abs().mean() < 0.01 and (val[0] - expected[0]).abs().max() < 0.15


@pytest.mark.parametrize("kind", ["bilinear", "bicubic"])
def test_crop_resize_is_pils_resized_crop_within_rounding(kind) -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    g = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (3, 24, 18), generator=g, dtype=torch.uint8)
    img = F.resize(small, [150, 111], antialias=True)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    mode = InterpolationMode(kind)
    crops = [(10, 5, 100, 80), (0, 0, 150, 111), (40, 30, 20, 30)]
    boxes = torch.tensor([crop_box(*c, 64) for c in crops] + [resize_center_box(150, 111, 72, 64)])
    flips = torch.tensor([False, True, False, False])
    out = crop_resize(img.expand(4, -1, -1, -1), boxes, 64, kind, flips)
    refs = [F.resized_crop(pil, *c, [64, 64], mode) for c in crops]
    refs[1] = F.hflip(refs[1])
    refs.append(F.center_crop(F.resize(pil, 72, mode), 64))
    for k, ref in enumerate(refs):
        diff = (out[k] - F.pil_to_tensor(ref).float()).abs()
        assert diff.max() <= 1.5 and diff.mean() < 0.5, (kind, k)  # PIL rounds each pass


def test_color_jitter_is_torchvisions_per_image() -> None:
    from torchvision.transforms import functional as F

    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=g)
    factors = torch.tensor([[0.6, 1.4, 1.0], [1.3, 0.7, 0.65], [1.0, 1.0, 1.39], [0.8, 1.2, 0.9]])
    orders = torch.stack([torch.randperm(4, generator=g) for _ in range(4)])
    out = color_jitter(x, factors, orders)
    steps = {0: F.adjust_brightness, 1: F.adjust_contrast, 2: F.adjust_saturation}
    for k in range(4):
        ref = x[k]
        for op in orders[k].tolist():
            if op in steps:
                ref = steps[op](ref, float(factors[k, op]))
        torch.testing.assert_close(out[k], ref, atol=1e-6, rtol=1e-5)


def test_gpu_path_names_unreadable_images(tmp_path) -> None:
    """Found by the workers (empty, not an image, truncated) or by the decoder (a JPEG
    whose scan is garbage: the batched decode fails, then that image alone): BadItems."""
    data_dir = link_tree(tmp_path / "data", {"train": 1, "val": 1})
    files = bad_tree(data_dir, "train")
    good = Path(sorted(Path(data_dir / "train" / "dog").iterdir())[0]).read_bytes()
    corrupt = data_dir / "train" / "dog" / "zz_corrupt.jpg"
    corrupt.write_bytes(good[:300] + bytes(range(256)) * 2 + b"\xff\xd9")
    data = build_data(str(data_dir), LARGE)
    plan = jpeg_train_plan(data.train.transform)
    items = SeededItems(JpegFiles(data.train.samples, plan, gpu_decode=True), 0)
    got = [items[i] for i in range(len(items))]
    bad = {Path(it.path).name: it.reason for it in got if isinstance(it, BadItem)}
    assert bad == {
        "zz_empty.jpg": "empty file, 0 bytes",
        "zz_text.jpg": "not an image file PIL can read",
        "zz_truncated.jpg": "truncated image",
    }
    assert all(it.jpeg for it in got if not isinstance(it, BadItem))  # whole JPEGs: bytes
    batch = Assembler(plan, CPU, Decoder(CPU))(collate_raw(got))  # decode_jpeg on the CPU
    assert batch[0].shape == (10, 3, 224, 224) and batch[1].shape == (10,)
    named = {b.path: b.reason for b in batch.bad}
    assert sorted(named) == sorted(str(p) for p in [*files.values(), corrupt])
    assert named[str(corrupt)].startswith("OSError")


def test_prefetcher_keeps_order_hands_on_errors_and_stops() -> None:
    made = []

    def make(i: int) -> torch.Tensor:
        made.append(i)
        if i == 7:
            raise ValueError("seven")
        return torch.full((2,), float(i))

    out = list(Prefetcher(range(5), make, CPU))
    assert [int(t[0]) for t in out] == [0, 1, 2, 3, 4]
    failing = Prefetcher(range(10), make, CPU)
    with pytest.raises(ValueError, match="seven"):
        for _ in failing:
            pass
    made.clear()
    endless = Prefetcher(iter(int, 1), lambda i: torch.zeros(1), CPU, depth=2)  # never ends
    next(endless)
    endless.close()
    time.sleep(0.2)
    assert not endless.thread.is_alive()


def test_gpu_path_loader_in_a_thread_equals_in_line(tree) -> None:
    data = build_data(str(tree), LARGE)
    plan = jpeg_eval_plan(data.val.transform)
    loader = DataLoader(JpegFiles(data.val.samples, plan, False), batch_size=8,
                        collate_fn=collate_raw)  # fmt: skip
    assemble = Assembler(plan, CPU, Decoder(CPU))
    inline = list(JpegLoader(loader, assemble, threaded=False))
    threaded = JpegLoader(loader, assemble, threaded=True)
    got = list(threaded)
    assert len(got) == len(inline) == 3
    for a, b in zip(inline, got, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    it = iter(threaded)  # abandoned after one batch, as an epoch cut short by --max-steps
    next(it)
    assert len(list(threaded)) == 3 and threaded._current is None


def test_runs_from_before_data_paths_resume_on_pil(tmp_path) -> None:
    """A run folder whose config.json predates --data-path trained on PIL workers: its
    resume stays there (auto would pick another path and another augmentation)."""
    import json

    from recu_cli.training.config import TrainConfig
    from recu_cli.training.run_folder import load_run_config

    (tmp_path / "resume.pt").write_bytes(b"")
    settings = TrainConfig(model="resnet20", data="demo").to_dict()
    del settings["data_path"]
    (tmp_path / "config.json").write_text(json.dumps({"train": settings}))
    assert load_run_config(tmp_path).data_path == "pil"
    settings["data_path"] = "resident"
    (tmp_path / "config.json").write_text(json.dumps({"train": settings}))
    assert load_run_config(tmp_path).data_path == "resident"
