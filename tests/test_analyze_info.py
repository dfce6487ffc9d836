"""`recu analyze`, `recu info`, `recu eval` on packed files, bad files, and loader fuzzing."""

from __future__ import annotations

import atexit
import functools
import io
import json
import math
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from recu_cli import pack
from recu_cli.bnn import convert_model
from recu_cli.cli import main
from recu_cli.convert_config import ConvertConfig
from recu_cli.errors import RecuError
from recu_cli.models import create_model
from recu_cli.report.analysis import analyze, render_analysis
from recu_cli.report.info import summarize
from recu_cli.report.plots import require_matplotlib
from recu_cli.stats import model_stats
from tests.conftest import require_module


def make_packed(path: Path, *, latent: bool = False, noise: float = 0.0, seed: int = 0) -> Path:
    """A packed resnet20 (random init: no shared data needed), optionally perturbed."""
    torch.manual_seed(seed)
    config = ConvertConfig(tau=0.85)
    model, spec = create_model("resnet20")
    model, _ = convert_model(model, config)
    if noise:
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "tau"):
                    m.weight.add_(noise * torch.randn_like(m.weight))
    pack.save(path, model, spec, config, keep_latent=latent, stats=model_stats(model))
    return path


def rewrite(
    src: Path,
    dst: Path,
    meta: dict[str, str] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Copy a packed file with some metadata values / tensors replaced (a hand edit)."""
    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata())
    data = load_file(str(src))
    metadata.update(meta or {})
    data.update(tensors or {})
    save_file(data, str(dst), metadata=metadata)
    return dst


def edit_json(src: Path, dst: Path, key: str, fn) -> Path:
    with safe_open(str(src), "pt") as f:
        value = json.loads(f.metadata()[key])
    fn(value)
    return rewrite(src, dst, {key: json.dumps(value)})


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("packed")
    return {
        "old": make_packed(d / "old.safetensors", latent=True),
        "new": make_packed(d / "new.safetensors", noise=0.05),
        "plain_old": make_packed(d / "plain_old.safetensors"),
    }


# ---------------------------------------------------------------- analyze


def test_analyze_json(files, capsys) -> None:
    code, out, err = run_cli(["analyze", str(files["new"]), "--json"], capsys)
    assert code == 0 and not err
    r = json.loads(out)
    assert r["model"] == "resnet20" and r["entropy_unit"] == "bits"
    assert len(r["layers"]) == 18 and r["totals"]["weights"] == 267_264
    assert 0.25 < r["totals"]["dead_share"] < 0.40  # ~2(1 - 0.85) for Laplace-like weights
    assert r["compare"] is None


def test_analyze_compare_splits_tail_and_core(files, capsys) -> None:
    args = ["analyze", str(files["new"]), "--compare", str(files["old"]), "--json"]
    code, out, _ = run_cli(args, capsys)
    c = json.loads(out)["compare"]
    assert code == 0 and c["tail_from"] == str(files["old"])
    t = c["totals"]
    assert t["n"] == 267_264 and t["tail_n"] + t["core_n"] == t["n"]
    assert 0 < t["overall"] < 0.5
    assert t["tail"] < t["core"]  # dead (tail) weights flip less: the point of ReCU
    # the same rates as flip_rates on the unpacked signs
    old_s = pack.read_signs(pack.read(files["old"]))
    new_s = pack.read_signs(pack.read(files["new"]))
    flips = sum(int((old_s[k] != new_s[k]).sum()) for k in old_s)
    assert t["flips"] == flips


def test_analyze_compare_without_latent_says_na(files, capsys) -> None:
    args = ["analyze", str(files["new"]), "--compare", str(files["plain_old"])]
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and "flip %" in out and "n/a" in out
    r = analyze(files["new"], files["plain_old"])
    assert r["compare"]["totals"]["tail"] is None and r["compare"]["tail_from"] is None


def test_analyze_table_and_histograms(files, capsys) -> None:
    code, out, _ = run_cli(["analyze", str(files["new"]), "--hist", "2"], capsys)
    assert code == 0
    assert "layer3.2.conv2" in out and "most dead" in out and "least dead" in out
    assert any(ch in out for ch in "▁▂▃▄▅▆▇█")


def test_analyze_plot(files, tmp_path, capsys) -> None:
    require_module("matplotlib", "plot")
    png = tmp_path / "fig" / "a.png"
    args = ["analyze", str(files["new"]), "--compare", str(files["old"]), "--plot", str(png)]
    code, _, _ = run_cli(args, capsys)
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_line(files, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    code, out, err = run_cli(
        ["analyze", str(files["new"]), "--plot", str(tmp_path / "x.png")], capsys
    )
    # cli.main prints messages as rich markup, which eats "[plot]" until it escapes them
    assert code == 2 and err.strip().count("\n") == 0 and "pip install 'recu" in err
    assert os.listdir(tmp_path) == []
    with pytest.raises(RecuError, match=re.escape("pip install 'recu[plot]'")):
        require_matplotlib()


# ---------------------------------------------------------------- info


def test_info_resnet20_by_hand(files, capsys) -> None:
    code, out, _ = run_cli(["info", str(files["plain_old"]), "--json"], capsys)
    assert code == 0
    s = json.loads(out)
    t = s["totals"]
    assert t["file_bytes"] == files["plain_old"].stat().st_size
    assert t["binary_weights"] == 267_264 and t["binary_bytes"] == 267_264 // 8
    # 16 channels at 32x32: 16*16*9 * 1024 = 2,359,296 MACs per 3x3 conv, etc.
    assert t["bops"] == 6 * 2_359_296 + 2 * (1_179_648 + 5 * 2_359_296)
    assert t["flops"] == 16 * 3 * 9 * 1024 + 64 * 10  # stem + classifier
    assert t["ops"] == pytest.approx(t["bops"] / 64 + t["flops"])
    assert t["compression"] == pytest.approx(t["float32_bytes"] / t["file_bytes"])
    assert t["float32_bytes"] == 4 * (t["binary_weights"] + t["full_precision_values"])
    assert sum(r["bytes"] for r in s["layers"]) + t["header_bytes"] == t["file_bytes"]
    code, out, _ = run_cli(["info", str(files["plain_old"])], capsys)
    assert code == 0 and "compression" in out and "BinaryConv2d" in out


def test_info_counts_latent_separately(files) -> None:
    t = summarize(files["old"])["totals"]
    assert t["latent_bytes"] == 4 * 267_264
    assert t["deploy_bytes"] == t["file_bytes"] - t["latent_bytes"]


def _slow_summary(path: Path, monkeypatch) -> dict:
    """`summarize` as for a file without module records: from the rebuilt tree."""
    with monkeypatch.context() as m:
        m.setattr(pack, "checksum_matches", lambda *_: False)
        return summarize(path)


def test_info_records_are_what_the_rebuilt_tree_gives(files, tmp_path, monkeypatch) -> None:
    """The records a new file stores (minor 1) are exactly what `info` computes from the
    tree rebuilt from the recipe, so both paths print the same, for recu's zoo and a timm
    ResNet with a max-pool, 1x1 shortcuts and global pooling."""
    config = ConvertConfig(activation="prelu", act_threshold="learned")
    model, spec = create_model("test_resnet", num_classes=7)
    model, _ = convert_model(model, config)
    timm_file = tmp_path / "timm.safetensors"
    pack.save(timm_file, model, spec, config, stats=model_stats(model), keep_latent=True)
    for path in (files["plain_old"], files["old"], timm_file):
        packed = pack.read(path)
        assert packed.format_minor == pack.schema.FORMAT_MINOR == 1
        rebuilt = pack.module_records(pack.skeleton(packed), packed.spec.input_size, packed.tensors)
        assert packed.modules == rebuilt
        assert {r["name"] for r in packed.modules} == {n.rpartition(".")[0] for n in packed.tensors}
        assert summarize(path) == _slow_summary(path, monkeypatch)
    from recu_cli.binarize.layers import BinaryConv2d

    types = {r["name"]: r["type"] for r in pack.read(timm_file).modules}
    assert types["fc"] == "Linear" and BinaryConv2d.__name__ in types.values()
    assert BinaryConv2d.__name__ == pack.schema.BINARY_TYPE  # the class load() builds


def test_info_of_the_version_1_fixture_rebuilds_the_tree() -> None:
    from tests.conftest import REPO

    old = REPO / "tests" / "data" / "packed-v1-resnet20.safetensors"
    assert pack.read(old).modules is None
    t = summarize(old)["totals"]
    assert t["bops"] == 6 * 2_359_296 + 2 * (1_179_648 + 5 * 2_359_296)


def _with_meta(src: Path, dst: Path, edits: dict[str, str | None]) -> Path:
    """A copy of a packed file with metadata values replaced (None: removed) and a
    checksum that matches again: what a careful forger writes."""
    from safetensors.torch import save as serialize

    from recu_cli.checksum import with_checksum

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    meta.pop("checksum")
    for k, v in edits.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    dst.write_bytes(with_checksum(serialize, load_file(str(src)), meta))
    return dst


def _module_cases(records: list[dict]) -> dict[str, object]:
    def edit(i: int, **kw) -> list[dict]:
        out = [dict(r) for r in records]
        out[i].update(kw)
        return out

    conv = next(i for i, r in enumerate(records) if r["type"] == "BinaryConv2d")
    bn = next(i for i, r in enumerate(records) if r["type"] == "BatchNorm2d")
    return {
        "not a list": {"name": "conv1"},
        "a record is a string": ["conv1", *records[1:]],
        "extra key": edit(0, code="import os"),
        "missing key": [{k: v for k, v in records[0].items() if k != "macs"}, *records[1:]],
        "name not a string": edit(0, name=3),
        "type not an identifier": edit(0, type="os.system('x')"),
        "type empty": edit(0, type=""),
        "output of a string": edit(0, output="16x32x32"),
        "output with a zero": edit(0, output=[16, 0, 32]),
        "output with a bool": edit(0, output=[True, 32, 32]),
        "output too long": edit(0, output=[1] * 9),
        "macs negative": edit(0, macs=-1),
        "macs a float": edit(0, macs=1.5),
        "macs huge": edit(0, macs=1 << 70),
        "macs without output": edit(bn, macs=5),
        "output without macs": edit(0, macs=None),
        "listed twice": [*records, records[0]],
        "a module missing": records[1:],
        "a module too many": [
            *records,
            {"name": "ghost", "type": "X", "output": None, "macs": None},
        ],
        "binary layer of another type": edit(conv, type="Conv2d"),
        "binary layer with other MACs": edit(conv, macs=records[conv]["macs"] + 1),
        "binary layer with other channels": edit(conv, output=[17, 32, 32]),
        "too many records": [records[0]] * (pack.schema.MAX_MODULES + 1),
    }


def test_module_records_are_checked_as_untrusted_input(files, tmp_path, capsys) -> None:
    """Hostile 'modules' values behind a matching checksum: one line naming the damage,
    from the reader, `info` and `load`; nothing torch-free crashes."""
    src = files["plain_old"]
    records = pack.read(src).modules
    cases = {k: json.dumps(v) for k, v in _module_cases(records).items()}
    cases |= {"not JSON": "[{", "records missing": None}
    for what, value in cases.items():
        path = _with_meta(src, tmp_path / "bad.safetensors", {"modules": value})
        with pytest.raises(RecuError, match="is damaged") as e:
            pack.read(path, verify=False, known=None)
        assert "modules" in str(e.value) or "module record" in str(e.value), (what, e.value)
        code, out, err = run_cli(["info", str(path)], capsys)
        assert code == 2 and out == "" and err.strip().count("\n") == 0, (what, err)
    for minor in ("x", "-1", "1.5", "9999999"):
        path = _with_meta(src, tmp_path / "minor.safetensors", {"format_minor": minor})
        with pytest.raises(RecuError, match="format_minor"):
            pack.read(path, verify=False, known=None)
    later = _with_meta(src, tmp_path / "later.safetensors", {"format_minor": "7"})
    assert summarize(later) == summarize(src) | {"file": str(later)}  # minor: only additions


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_module_records_behind_a_matching_checksum(data) -> None:
    """Random edits inside 'modules' of a file whose checksum matches (so `info` takes the
    records' path): reading and summarizing work or raise one RecuError line."""
    folder, meta, _ = _fuzz_base()
    records = json.loads(meta["modules"])
    i = data.draw(st.integers(0, len(records) - 1))
    key = data.draw(st.sampled_from(["name", "type", "output", "macs"]))
    records[i][key] = data.draw(JSON)
    path = _with_meta(folder / "src.safetensors", folder / "fuzz-modules.safetensors",
                      {"modules": json.dumps(records)})  # fmt: skip
    for fn in (pack.read, summarize):
        try:
            fn(path)
        except RecuError as e:
            assert "\n" not in str(e)


# ---------------------------------------------------------------- eval / convert


def test_convert_then_eval_packed(
    cifar_dir: Path, resnet20_weights: Path, tmp_path, capsys
) -> None:
    from torchvision import datasets

    from recu_cli.bnn import to_deploy
    from recu_cli.data import build_transform
    from tests.conftest import link_tree

    data = link_tree(tmp_path / "data", {"val": 5})  # 5 real images of each class
    out = tmp_path / "r20.safetensors"
    args = ["convert", "resnet20", "--weights", str(resnet20_weights), "-o", str(out),
            "--tau", "0.9", "--json"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert pack.read(out).tau == pytest.approx(0.9)
    args = ["eval", str(out), "--data", str(data), "-b", "50", "-j", "0", "--device", "cpu",
            "--json"]  # fmt: skip
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    r = json.loads(stdout)
    # the same images through the converted model built here from the weights, not from
    # the file: as many right answers
    model, spec = create_model("resnet20", weights=resnet20_weights)
    model = to_deploy(convert_model(model, ConvertConfig(tau=0.9))[0]).eval()
    val = datasets.ImageFolder(str(data / "val"), transform=build_transform(spec, False))
    xs, ys = zip(*(val[i] for i in range(len(val))), strict=True)
    with torch.no_grad():
        right = int((model(torch.stack(xs)).argmax(1) == torch.tensor(ys)).sum())
    assert r["images"] == 50 and r["top1"] == pytest.approx(100 * right / 50)
    assert 0 < right < 50  # the check bites: neither all right nor all wrong


# ---------------------------------------------------------------- bad files


def _bad_files(src: Path, d: Path) -> dict[str, tuple[Path, str]]:
    raw = src.read_bytes()
    (d / "empty.safetensors").write_bytes(b"")
    (d / "random.safetensors").write_bytes(random.Random(0).randbytes(4096))
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    timm_model = timm.create_model("test_resnet")
    save_file(timm_model.state_dict(), str(d / "plain.safetensors"), metadata={"format": "pt"})

    def shape(v):
        v[0]["shape"] = [16, 16, 3, 2]

    def model(v):
        v["name"] = "resnet_does_not_exist"

    def classes(v):
        v["num_classes"] = 100

    bn = "layer1.0.bn1.weight"
    return {
        "empty": (d / "empty.safetensors", "empty"),
        "random": (d / "random.safetensors", "not a safetensors file"),
        "truncated": (d / "truncated.safetensors", "truncated"),
        "plain": (d / "plain.safetensors", "not a recu packed file"),
        "magic": (
            rewrite(src, d / "magic.safetensors", {"format": "recu-pack"}),
            "not a recu packed file",
        ),
        "version": (
            rewrite(src, d / "version.safetensors", {"format_version": "99"}),
            "upgrade recu",
        ),
        "json": (rewrite(src, d / "json.safetensors", {"recipe": "{'tau': 1"}), "not valid JSON"),
        "shape": (edit_json(src, d / "shape.safetensors", "layers", shape), "shape"),
        "tensor": (
            rewrite(src, d / "tensor.safetensors", tensors={bn: torch.ones(17)}),
            "layer1.0.bn1.weight",
        ),
        "model": (edit_json(src, d / "model.safetensors", "model", model), "not registered"),
        "classes": (edit_json(src, d / "classes.safetensors", "model", classes), "linear"),
    }


@pytest.fixture(scope="module")
def bad(files, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return _bad_files(files["plain_old"], tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "random",
        "truncated",
        "plain",
        "magic",
        "version",
        "json",
        "shape",
        "tensor",
        "model",
        "classes",
    ],
)
@pytest.mark.parametrize("command", [["info"], ["analyze"], ["eval", "--data", "demo"]])
def test_bad_file_is_one_clear_line(bad, case: str, command: list[str], capsys) -> None:
    path, expected = bad[case]
    before = sorted(os.listdir(path.parent))
    code, out, err = run_cli([command[0], str(path), *command[1:]], capsys)
    assert code == 2, err
    assert err.strip().count("\n") == 0 and err.startswith("error:"), err
    assert expected in err, err
    assert out == ""
    assert sorted(os.listdir(path.parent)) == before


def test_missing_file(tmp_path, capsys) -> None:
    code, _, err = run_cli(["info", str(tmp_path / "nope.safetensors")], capsys)
    assert code == 2 and "file not found" in err and err.strip().count("\n") == 0
    assert os.listdir(tmp_path) == []


def test_load_api_raises_recu_error(bad) -> None:
    for path, expected in bad.values():
        with pytest.raises(RecuError, match=expected.split("(")[0]):
            pack.load(path)


# ---------------------------------------------------------------- fuzzing

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)
KEYS = [
    "format",
    "format_version",
    "recu_version",
    "model",
    "recipe",
    "encoding",
    "layers",
    "tau",
    "storage",
    "stats",
    "training",
    "history",
]


@functools.cache
def _fuzz_base() -> tuple[Path, dict[str, str], dict[str, torch.Tensor]]:
    """One valid packed file (made once, removed at exit): folder, metadata, tensors."""
    folder = Path(tempfile.mkdtemp(prefix="recu-fuzz-"))
    atexit.register(shutil.rmtree, folder, True)
    src = make_packed(folder / "src.safetensors")
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    return folder, meta, load_file(str(src))


@functools.cache
def _base_state() -> dict[str, torch.Tensor]:
    """The deploy model's state of the unedited file: what any accepted edit must load."""
    folder, meta, tensors = _fuzz_base()
    path = folder / "base.safetensors"
    _write(path, tensors, meta)
    return pack.load(path).state_dict()


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """The edited file with a checksum that matches the edit: the checksum is no signature
    (docs/format.md 4.1), anyone can write a valid one, so the readers behind it must hold
    on their own. (With the stale checksum every edit would stop at the checksum check.)"""
    from safetensors.torch import save

    from recu_cli.checksum import with_checksum

    path.write_bytes(with_checksum(save, tensors, meta))


def _try_everything(meta: dict[str, str]) -> None:
    """Loading, reading, analyzing and summarizing either work or raise a one-line
    RecuError; what they accept holds only finite numbers and the file's own weights."""
    folder, _, tensors = _fuzz_base()
    path = folder / "fuzz.safetensors"
    _write(path, tensors, meta)
    got = {}
    for fn in (pack.load, pack.read_spec, summarize, analyze):  # analyze: all of pack.read
        try:
            got[fn.__name__] = fn(path)
        except RecuError as e:
            assert "\n" not in str(e)
    if "load" in got:
        state = got["load"].state_dict()
        base = _base_state()
        assert state.keys() == base.keys()
        assert all(torch.equal(state[k], base[k]) for k in base)
        with torch.no_grad():
            assert torch.isfinite(got["load"](torch.zeros(1, 3, 32, 32))).all()
    if "summarize" in got:
        json.dumps(got["summarize"], allow_nan=False)  # recu info --json: finite numbers
    if "analyze" in got:
        result = got["analyze"]
        checked = {k: result[k] for k in ("tau", "recipe", "layers", "totals")}
        json.dumps(checked, allow_nan=False)  # the validated statistics: finite
        render_analysis(Console(file=io.StringIO(), width=120), result)


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(key=st.sampled_from(KEYS), value=st.one_of(st.text(max_size=40), JSON.map(json.dumps)))
def test_fuzz_replace_metadata_value(key: str, value: str) -> None:
    _try_everything({**_fuzz_base()[1], key: value})


@FUZZ
@given(key=st.sampled_from(KEYS[3:]), data=st.data())
def test_fuzz_edit_inside_metadata_json(key: str, data) -> None:
    doc = json.loads(_fuzz_base()[1][key])
    if not isinstance(doc, (dict, list)) or not doc:
        doc = data.draw(JSON)
    else:
        node = doc
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            k = data.draw(st.sampled_from(keys))
            child = node[k]
            if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
                node = child
                continue
            node[k] = data.draw(JSON)
            break
    _try_everything({**_fuzz_base()[1], key: json.dumps(doc)})


def test_a_number_as_storage_float_dtype_stays_out_of_info_json() -> None:
    """Found by the fuzz above in CI: 'storage' whose float_dtype is Infinity reached
    `recu info --json` as a non-finite number; now the file is refused as damaged."""
    base = _fuzz_base()[1]
    storage = {**json.loads(base["storage"]), "float_dtype": math.inf}
    _try_everything({**base, "storage": json.dumps(storage)})


@FUZZ
@given(drop=st.sets(st.sampled_from(KEYS), min_size=1, max_size=3))
def test_fuzz_missing_metadata_keys(drop: set[str]) -> None:
    _try_everything({k: v for k, v in _fuzz_base()[1].items() if k not in drop})


# numbers a writer never puts there: NaN, the infinities, the largest and negative values
ODD_NUMBER = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, -1, -0.0, 2**70])
NUMBER = st.one_of(ODD_NUMBER, st.floats(), st.integers(-(2**70), 2**70))


def test_a_nan_in_a_statistics_shape_is_refused() -> None:
    """Found by the number fuzz below when run with its checksum check switched off: a NaN
    in a layer's statistics `shape` passed the readers and broke `recu info --json`."""
    _, meta, _ = _fuzz_base()
    doc = json.loads(meta["stats"])
    doc[0]["shape"][0] = float("nan")
    _try_everything({**meta, "stats": json.dumps(doc)})


def test_a_b_hat_whose_square_underflows_is_shown_as_n_a() -> None:
    """Found by the number fuzz: b_hat = 7.4e-165 (finite, positive) squared is 0, and the
    QE / b_hat^2 column of `recu analyze` divided by zero; a histogram range as small
    would divide by zero in the histogram lines."""
    _, meta, _ = _fuzz_base()
    doc = json.loads(meta["stats"])
    doc[0]["b_hat"] = 7.431029993083556e-165
    _try_everything({**meta, "stats": json.dumps(doc)})
    doc[0]["hist"]["range"] = 5e-324  # 2 R / bins = 0: the terminal histogram's step
    _try_everything({**meta, "stats": json.dumps(doc)})
    for key, value in (("q", -1e308), ("dead_share", 1e308)):  # infinite sums and columns
        doc = json.loads(meta["stats"])
        doc[0][key] = value
        _try_everything({**meta, "stats": json.dumps(doc)})


@settings(FUZZ, max_examples=30)
@given(key=st.sampled_from(["tau", "stats", "layers", "model", "recipe"]), data=st.data())
def test_fuzz_numbers_inside_metadata(key: str, data) -> None:
    """One number of the metadata replaced (a hand edit, a buggy writer): numbers are where
    a reader that trusts the file computes nonsense, so this walks down to one (each level's
    child at random, as the edit test above) and puts an odd number there."""
    doc = json.loads(_fuzz_base()[1][key])

    def is_number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def has_number(x) -> bool:
        if isinstance(x, dict):
            return any(has_number(v) for v in x.values())
        if isinstance(x, list):
            return any(has_number(v) for v in x)
        return is_number(x)

    value = data.draw(NUMBER)
    if is_number(doc):
        doc = value
    else:
        node = doc
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            k = data.draw(st.sampled_from([k for k in keys if has_number(node[k])]))
            if is_number(node[k]):
                node[k] = value
                break
            node = node[k]
    _try_everything({**_fuzz_base()[1], key: json.dumps(doc)})
