"""Issue 26, tried as a hostile user would: outputs that are not regular files, folders
that are not recu's, --experiment paths, crafted packed files (re-signed per format.md
section 4.1, so they pass the checksum and reach the check under test), a full disk.

Each test asserts one error line, its exit code, and that nothing else changed on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import save as serialize

from recu_cli.errors import RecuError
from tests.conftest import REPO, RESNET20_WEIGHTS, link_tree, require_shared
from tests.test_analyze_info import make_packed
from tests.test_cli_models import assert_one_line_error, run_cli

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


# ---------------------------------------------------------------- helpers


def tree(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` (links not followed): its kind, and its bytes' digest
    for regular files or its device number for devices: 'nothing else changed'."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            what: tuple = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        elif stat.S_ISLNK(st.st_mode):
            what = ("link", os.readlink(p))
        else:
            what = (stat.S_IFMT(st.st_mode), st.st_rdev)
        out[str(p.relative_to(folder))] = what
    return out


def resign(src: Path, dst: Path, meta: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of a packed file with metadata values / tensors replaced and a new valid
    checksum, computed from docs/format.md section 4.1 (not with recu's code)."""
    with safe_open(str(src), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "checksum"}
    data = load_file(str(src))
    metadata.update(
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in (meta or {}).items()}
    )
    data.update(tensors or {})
    first = serialize(data, metadata)
    n = int.from_bytes(first[:8], "little")
    header = json.loads(first[8 : 8 + n])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode("ascii") + first[8 + n :]).hexdigest()
    dst.write_bytes(serialize(data, {**metadata, "checksum": "sha256:" + digest}))
    return dst


def edited(src: Path, dst: Path, key: str, fn) -> Path:
    """Re-signed copy with one JSON metadata value changed in place by `fn`."""
    with safe_open(str(src), "pt") as f:
        value = json.loads(f.metadata()[key])
    fn(value)
    return resign(src, dst, {key: value})


def fifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("named pipes need a POSIX system")
    os.mkfifo(path)
    return path


def char_device(path: Path) -> Path:
    """A node like /dev/null (major 1, minor 3) in a temporary folder: only root may."""
    if not ROOT:
        pytest.skip("creating a character device needs root")
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError as e:
        pytest.skip(f"mknod refused here ({e.strerror})")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One tiny converted model (random init, no shared data), the source of every crafted
    file of this module."""
    return make_packed(tmp_path_factory.mktemp("base") / "base.safetensors")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Real CIFAR-10 JPEGs: 4 training and 2 validation images per class."""
    return link_tree(tmp_path_factory.mktemp("tiny"), {"train": 4, "val": 2})


def binarize_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        "binarize", "resnet20", "--weights", str(RESNET20_WEIGHTS), "--data", str(data),
        "-o", str(out), "--experiment", name, "--recipe", "paper", "-b", "8", "-j", "0",
        "--no-step0-eval", "--quiet", *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------- 1. only regular files


@pytest.mark.parametrize("kind", ["fifo", "char device", "link to a fifo"])
@pytest.mark.parametrize("command", ["convert", "export", "analyze --plot"])
def test_an_output_that_is_not_a_regular_file_is_never_replaced(
    base, tmp_path, capsys, kind, command
):
    out = tmp_path / "out"
    out.mkdir()
    name = "model.onnx" if command == "export" else "model.png"
    if kind == "fifo":
        target = fifo(out / name)
    elif kind == "char device":
        target = char_device(out / name)
    else:
        fifo(out / "pipe")
        target = out / name
        target.symlink_to(out / "pipe")
    args = {
        "convert": ["convert", "resnet20", "-o", str(target)],
        "export": ["export", str(base), "-o", str(target)],
        "analyze --plot": ["analyze", str(base), "--plot", str(target)],
    }[command]
    before = tree(out)
    code, stdout, err = run_cli(args, capsys)
    expected = "character device" if kind == "char device" else "named pipe (FIFO)"
    assert_one_line_error(code, err, str(target), expected, "only regular files")
    assert "wrote" not in stdout
    assert tree(out) == before  # the node is still a node, nothing was added beside it


def test_atomic_writes_replace_regular_files_and_follow_links(tmp_path):
    from recu_cli.atomic import write_bytes

    (tmp_path / "real.bin").write_bytes(b"old")
    (tmp_path / "link.bin").symlink_to(tmp_path / "real.bin")
    write_bytes(tmp_path / "link.bin", b"new")  # the link stays, the file it names is replaced
    assert (tmp_path / "link.bin").is_symlink() and (tmp_path / "real.bin").read_bytes() == b"new"
    write_bytes(tmp_path / "fresh.bin", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.bin", "link.bin", "real.bin"]


def test_a_fifo_in_a_resumed_run_folder_is_not_replaced(tmp_path, capsys):
    """The run folder's own files go through the same rule (here: the lock)."""
    run = tmp_path / "run"
    run.mkdir()
    fifo(run / ".lock")
    before = tree(tmp_path)
    from recu_cli.training.runlock import RunLock

    with pytest.raises(RecuError, match="named pipe") as e:
        RunLock(run).acquire()
    assert e.value.exit_code == 2
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- 2. folders that are not ours


def test_a_fresh_run_never_writes_into_a_folder_that_is_not_a_recu_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "summary.csv").write_text("precious\n")
    (runs / "locked").mkdir()  # a .lock beside a file a killed start never writes
    (runs / "locked" / ".lock").write_text("1\n")
    (runs / "locked" / "notes.txt").write_text("mine\n")
    (runs / "piped").mkdir()  # a recu name, but not a regular file
    (runs / "piped" / ".lock").write_text("1\n")
    fifo(runs / "piped" / "train.log")
    before = tree(tmp_path)
    for name, listed in (("mine", "summary.csv"), ("locked", "notes.txt"), ("piped", "train.log")):
        args = binarize_args(Path("demo"), runs, name, "--max-steps", "2")
        code, _, err = run_cli(args, capsys)
        assert_one_line_error(
            code, err, str(runs / name), "not a recu run folder", listed, "--experiment", "--resume"
        )
    assert tree(tmp_path) == before  # not even a .lock


def test_the_leftovers_of_a_killed_start_are_taken_over(tiny, tmp_path, capsys):
    """What a start killed before its first resume point leaves (its .lock, config.json,
    train.log, a temporary file): the same command starts again in that folder."""
    require_shared(RESNET20_WEIGHTS)
    run = tmp_path / "runs" / "early"
    run.mkdir(parents=True)
    (run / ".lock").write_text("999999\n")
    (run / "config.json").write_text('{"train": {}}')
    (run / "train.log").write_text("2025-01-01 00:00:00 start: recu 0.1.0, pid 999999: ...\n")
    (run / "resume.pt.999999.tmp").write_bytes(b"half")
    code, _, err = run_cli(
        binarize_args(tiny, tmp_path / "runs", "early", "--max-steps", "2"), capsys
    )
    assert code == 0, err
    assert (run / "resume.pt").is_file() and not list(run.glob("*.tmp"))
    assert (run / "train.log").read_text().count("start: recu") == 2


# ---------------------------------------------------------------- 3. --experiment is a name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../../x", "path separator"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        (".", "is '.'"),
        ("..", "is '..'"),
        ("", "is empty"),
        ("x\ny", "control character"),
        (" x", "space"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_experiment_is_one_folder_name_inside_the_output(tmp_path, capsys, name, why):
    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    before = tree(tmp_path)
    code, _, err = run_cli(binarize_args(Path("demo"), out, name, "--max-steps", "2"), capsys)
    assert_one_line_error(code, err, "--experiment", why, "one run folder inside --output")
    assert tree(tmp_path) == before  # nothing in -o, nothing beside or above it


# ---------------------------------------------------------------- 4, 7. crafted model specs


SPEC_CASES = {
    "huge": ({"input_size": [3, 16384, 16384]}, "16384x16384 is outside 8..1024"),
    "large": ({"input_size": [3, 4096, 4096]}, "4096x4096 is outside 8..1024"),
    "tiny": ({"input_size": [3, 4, 4]}, "4x4 is outside 8..1024"),
    "grey": ({"input_size": [1, 32, 32]}, "input_size has 1 channels"),
    "wide": ({"input_size": [16384, 32, 32]}, "input_size has 16384 channels"),
    "mean": ({"mean": [1e308, 0.4, 0.4]}, "mean"),
    "std": ({"std": [1e-300, 0.2, 0.2]}, "std"),
    "interp": ({"interpolation": "evil"}, "interpolation is not one of"),
    "crop": ({"crop_pct": 1e-300}, "crop_pct"),
}


@pytest.fixture(scope="module")
def crafted_specs(base, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("specs")
    return {
        case: edited(base, d / f"{case}.safetensors", "model", lambda v, c=change: v.update(c))
        for case, (change, _) in SPEC_CASES.items()
    }


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_crafted_model_specs_are_refused_at_read(crafted_specs, case, capsys):
    path = crafted_specs[case]
    before = tree(path.parent)
    commands = [["info", str(path)], ["analyze", str(path), "--json"]]
    if case in ("huge", "wide", "std"):  # the commands that allocated or divided
        commands += [
            ["eval", str(path), "--data", "demo", "--json"],
            ["bench", str(path), "--batch", "1"],
            ["export", str(path), "-o", str(path.with_suffix(".onnx"))],
        ]
    for args in commands:
        code, out, err = run_cli(args, capsys)
        assert_one_line_error(code, err, str(path), "metadata 'model'", SPEC_CASES[case][1])
        assert out == ""
    assert tree(path.parent) == before


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["export", "{base}", "-o", "{out}/x.onnx", "--verify-batch", "100000"], "at most 32768"),
        (["bench", "{base}", "--batch", "1,100000"], "--batch 100000 is too large"),
        (["bench", "{base}", "--img-size", "16384"], "--img-size"),
    ],
)
def test_batches_that_would_take_gigabytes_are_refused_first(
    base, tmp_path, capsys, args, fragment
):
    args = [a.format(base=base, out=tmp_path) for a in args]
    code, out, err = run_cli(args, capsys)
    assert_one_line_error(code, err, fragment)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 7. silent wrong results


def test_overflowing_weights_are_an_error_not_ten_percent(base, tiny, tmp_path, capsys):
    """A classifier weight of 3e38 in a packed file, a BatchNorm weight of 3e38 in a float
    checkpoint (--weights): logits overflow; the error names the first layer that did."""
    state = load_file(str(base))
    huge = torch.full_like(state["linear.weight"], 3e38)
    packed = resign(base, tmp_path / "packed.safetensors", tensors={"linear.weight": huge})
    from recu_cli.models import create_model

    fp = create_model("resnet20")[0].state_dict()
    fp["layer3.2.bn2.weight"] = torch.full_like(fp["layer3.2.bn2.weight"], 3e38)
    save_file({k: v.contiguous() for k, v in fp.items()}, str(tmp_path / "fp.safetensors"))
    before = tree(tmp_path)
    for args, layer in (
        ([str(packed)], "'linear' (Linear)"),
        (["resnet20", "--weights", str(tmp_path / "fp.safetensors")], "'layer3.2.bn2'"),
    ):
        code, out, err = run_cli(["eval", *args, "--data", str(tiny), "--json"], capsys)
        assert_one_line_error(code, err, "evaluation stopped at batch 1", "NaN or infinite",
                              layer, "no accuracy")  # fmt: skip
        assert out == ""
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- 8. full disk


@contextlib.contextmanager
def no_room(folder: Path, size: int):
    """A folder that takes no file over `size` bytes: a tmpfs of that size mounted there
    (root), else this process's file size limit (RLIMIT_FSIZE) while the block runs.
    Yields the words the error line must start with."""
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    if ROOT and subprocess.run(mount, capture_output=True).returncode == 0:
        try:
            yield f"no space left on device tmpfs (tmpfs, mounted on {folder})"
        finally:  # lazily if busy: a mount must never outlive the test
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(folder)], check=False)
        return
    resource = pytest.importorskip("resource", reason="no tmpfs and no file size limit here")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield f"file size limit reached ({size:,} bytes, ulimit -f)"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_names_the_file_and_the_filesystem(base, tiny, tmp_path, capsys):
    require_shared(RESNET20_WEIGHTS)
    with no_room(tmp_path / "full", 64 << 10) as words:  # a packed resnet20 is 85 kB
        target = tmp_path / "full" / "model.safetensors"
        code, out, err = run_cli(["convert", "resnet20", "-o", str(target)], capsys)
        assert_one_line_error(code, err, words, f"while writing {target}", exit_code=1)
        assert tree(tmp_path / "full") == {}
        # another library writing (matplotlib), the same rule
        plot = tmp_path / "full" / "p.png"
        code, _, err = run_cli(["analyze", str(base), "--plot", str(plot)], capsys)
        assert_one_line_error(code, err, words, f"while writing {plot}", exit_code=1)
        assert tree(tmp_path / "full") == {}
    with no_room(tmp_path / "full2", 1 << 20) as words:  # config.json fits, resume.pt not
        args = binarize_args(tiny, tmp_path / "full2", "run", "--max-steps", "2")
        code, _, err = run_cli(args, capsys)
        written = f"while writing {tmp_path / 'full2' / 'run' / 'resume.pt'}"
        assert_one_line_error(code, err, words, written, exit_code=1)
        assert "inline_container" not in err
        assert tree(tmp_path / "full2") == {}  # the run folder this start created is gone


# ---------------------------------------------------------------- 9. smaller items


LAYER_CASES = {
    "stride": ({"stride": [-1, -1]}, "invalid stride"),
    "padding": ({"padding": [1_000_000_000, 1]}, "invalid padding"),
    "dilation": ({"dilation": [0, 1]}, "invalid dilation"),
    "groups": ({"groups": 0}, "invalid groups"),
    "bytes_per_row": ({"bytes_per_row": 17}, "invalid bytes_per_row"),
    "bits_per_row": ({"bits_per_row": 143}, "invalid bits_per_row"),
    "alpha_mode": ({"alpha_mode": "evil"}, "invalid alpha_mode"),
    "other_stride": ({"stride": [2, 2]}, "stride [2, 2] in the metadata but the recipe builds"),
    "other_bias": ({"bias": True}, "bias True in the metadata but the recipe builds False"),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_records_out_of_bounds_are_refused(base, tmp_path, capsys, case):
    change, fragment = LAYER_CASES[case]
    path = edited(base, tmp_path / f"{case}.safetensors", "layers", lambda v: v[0].update(change))
    before = tree(tmp_path)
    commands = [["eval", str(path), "--data", "demo", "--max-batches", "1"]]
    if not case.startswith("other_"):
        # bounds are checked at read; a well-formed value that differs from what the recipe
        # builds is found where the model is built (`recu info` of a format-minor-1 file
        # reads its module records and builds nothing: it prints no stride or bias)
        commands.insert(0, ["info", str(path)])
    for args in commands:
        code, out, err = run_cli(args, capsys)
        assert_one_line_error(code, err, str(path), "layer1.0.conv1", fragment)
    assert tree(tmp_path) == before


def test_deeply_nested_metadata_is_refused_at_read(base, tmp_path, capsys):
    nested: object = 1
    for _ in range(900):
        nested = [nested]
    path = resign(base, tmp_path / "deep.safetensors", {"training": {"notes": nested}})
    for args in (["info", str(path)], ["analyze", str(path), "--json"]):
        code, out, err = run_cli(args, capsys)
        assert_one_line_error(code, err, str(path), "'training' is nested deeper than 32 levels")
        assert "RecursionError" not in err


@pytest.mark.parametrize(
    ("name", "fmt", "fragment"),
    [
        ("x.onnx", "pt2", "name the output x.pt2"),
        ("x.pt2", "onnx", "name the output x.onnx"),
        ("x.pt2", "qonnx", "name the output x.onnx"),
    ],
)
def test_export_refuses_a_name_that_says_another_format(
    base, tmp_path, capsys, name, fmt, fragment
):
    code, _, err = run_cli(["export", str(base), "-o", str(tmp_path / name), "-f", fmt], capsys)
    assert_one_line_error(code, err, f"--format {fmt}", fragment)
    assert list(tmp_path.iterdir()) == []


def test_docs_name_only_commands_that_exist():
    """`recu calibrate` was mentioned once and never existed: every command line in the
    docs and the README (a fenced line or an inline code span starting `recu WORD`) names
    a registered command."""
    import typer

    from recu_cli.app import app

    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    named = set()
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for block in re.findall(r"```.*?```", text, re.S):
            named |= {(path.name, w) for w in re.findall(r"^\s*(?:\$\s*)?recu ([a-z][\w-]*)",
                                                          block, re.M)}  # fmt: skip
        inline = re.sub(r"```.*?```", "", text, flags=re.S)
        named |= {(path.name, w) for w in re.findall(r"`recu ([a-z][\w-]*)", inline)}
    assert {w for _, w in named} >= {"binarize", "convert", "eval", "export"}  # it reads them
    unknown = sorted((f, w) for f, w in named if w not in commands)
    assert not unknown, unknown
