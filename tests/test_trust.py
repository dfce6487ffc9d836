"""Runs and files you can trust (issue 14), tried as a user would: the CLI in a
subprocess, real CIFAR-10 JPEGs, real signals, concurrent runs, damaged files."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import CIFAR, REPO, RESNET20_WEIGHTS, link_tree, require_shared
from tests.resume_checks import assert_continued, assert_fresh_run, saved_position
from tests.test_cli_models import assert_one_line_error, run_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "120"}
FAST = [
    "--recipe", "paper", "-b", "8", "--seed", "3", "--log-interval", "1", "--no-step0-eval",
]  # fmt: skip


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity, as strict parsers (JavaScript, Go) do."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recu_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or ENV,
        cwd=REPO,
    )


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI's main() in this process, for commands that stop before any training: the
    same error handling as `cli` without a process start (torch's import costs seconds)."""
    code, out, err = run_cli(list(args), capsys)
    return subprocess.CompletedProcess(["recu", *args], code, out, err)


def popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "recu_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=REPO,
    )


def one_line_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert proc.returncode == code, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error:") and "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file: 'nothing already written was lost or changed'."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


STEPS_PER_EPOCH = 40 // 8  # `tiny`: 40 training images in batches of 8 (FAST)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """4 training and 2 validation images per class: 5 steps of 8 per epoch."""
    return link_tree(tmp_path_factory.mktemp("tiny"), {"train": 4, "val": 2})


@pytest.fixture(scope="module")
def weights() -> Path:
    return require_shared(RESNET20_WEIGHTS)


def train_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        "binarize", "resnet20", "--weights", str(RESNET20_WEIGHTS), "--data", str(data),
        "-o", str(out), "--experiment", name, *FAST, *extra,
    ]  # fmt: skip


def model_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "resume.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = model_state(a), model_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def wait_for(proc: subprocess.Popen, pattern: str) -> list[str]:
    """Read stderr lines until one contains `pattern`; returns the lines read."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if pattern in line:
            return seen
    raise AssertionError(f"'{pattern}' never appeared:\n{''.join(seen)[-3000:]}")


# ---------------------------------------------------------------- 1. one run per folder


def test_second_run_in_a_busy_folder_is_refused_and_changes_nothing(tiny, weights, tmp_path):
    first = popen(*train_args(tiny, tmp_path, "shared", "--epochs", "2", "-j", "0"))
    try:
        wait_for(first, "epoch 1 step 1/")
        first.send_signal(signal.SIGSTOP)  # hold run 1 mid-epoch while run 2 starts
        assert first.poll() is None, "run 1 ended before it could be held"
        run = tmp_path / "shared"
        config_before = (run / "config.json").read_bytes()
        second = cli(*train_args(tiny, tmp_path, "shared", "--epochs", "1", "-j", "0", "--quiet"))
        first.send_signal(signal.SIGCONT)
        line = one_line_error(second, 1, str(run), f"process {first.pid}", "in use")
        assert "--experiment" in line
        assert (run / "config.json").read_bytes() == config_before
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-2000:]
    log = (run / "train.log").read_text()
    assert log.count("start: recu") == 1 and f"pid {first.pid}" in log
    assert str(second.args) not in log and "in use" not in log  # run 2 wrote nothing there
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert not list(run.glob("*.tmp"))


def test_lock_of_a_killed_run_is_taken_over(tiny, weights, tmp_path):
    proc = popen(*train_args(tiny, tmp_path, "killed", "--epochs", "1", "-j", "0"))
    wait_for(proc, "epoch 1 step 2/")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    run = tmp_path / "killed"
    assert (run / ".lock").read_text().strip() == str(proc.pid)  # the dead owner's pid
    resumed = cli("binarize", "--resume", str(run), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "in use" not in resumed.stderr


# ---------------------------------------------------------------- 2. honest --resume


@pytest.fixture(scope="module")
def finished_run(tiny, weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    proc = cli(*train_args(tiny, out, "run", "--epochs", "1", "-j", "0", "--quiet"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "run"


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        ([], ["has finished", "--epochs"]),
        (["--lr", "0.1"], ["--lr", "would change the result", "start a new run"]),
        (["--seed", "1", "--tau-max", "0.95"], ["--seed", "--tau-max"]),
        (["--max-steps", "50"], ["--max-steps", "without a step limit"]),
        (["--epochs", "1", "--workers", "1"], ["has finished"]),
        (["--seed", "3", "--opt", "adam"], ["has finished"]),  # the run's own values: accepted
        (["-o", "elsewhere"], ["--output", "start a new run"]),
    ],
)
def test_resume_refuses_what_it_cannot_honour(finished_run, extra, fragments, capsys):
    before = snapshot(finished_run)
    code, _, err = run_cli(["binarize", "--resume", str(finished_run), *extra], capsys)
    assert_one_line_error(code, err, *fragments)
    assert snapshot(finished_run) == before


def test_resume_with_more_epochs_trains_on_and_records_it(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    saved = saved_position(run)
    assert saved == {"epoch": 2, "step_in_epoch": 0, "global_step": STEPS_PER_EPOCH}
    proc = cli("binarize", "--resume", str(run), "--epochs", "2", "-j", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = strict_loads(proc.stdout)
    assert_continued(run, saved, 2 * STEPS_PER_EPOCH, result)  # epoch 2 only
    assert result["epochs"] == 2 and result["config"]["epochs"] == 2
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert cfg["epochs"] == 2 and cfg["workers"] == 1
    log = (run / "train.log").read_text()
    changed = next(ln for ln in log.splitlines() if "settings changed on resume:" in ln)
    assert "--epochs 1 -> 2" in changed and "--workers 0 -> 1" in changed
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # the documented schedule rule: tau continues as in a run started with 2 epochs
    e = 2.718281828459045
    assert float(rows[1]["tau"]) == pytest.approx(0.85 + 0.14 * (e**0.5 - 1) / (e - 1), abs=1e-5)
    assert log.rstrip().splitlines()[-1].split(" ", 2)[2].startswith("done: 2 epochs")


# ---------------------------------------------------------------- 3. bad images


def bad_tree(root: Path, split: str) -> dict[str, Path]:
    """Three broken .jpg files in `split`/ next to the real ones."""
    good = sorted((CIFAR / split / "cat").iterdir())[0].read_bytes()
    cls = root / split / "cat"
    files = {
        "empty": cls / "zz_empty.jpg",
        "text": cls / "zz_text.jpg",
        "truncated": cls / "zz_truncated.jpg",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    files["truncated"].write_bytes(good[: len(good) // 2])
    return files


@pytest.mark.parametrize("data_path", ["pil", "resident"])
def test_bad_training_images_are_skipped_by_name_even_with_workers(tmp_path, weights, data_path):
    data = link_tree(tmp_path / "data", {"train": 3, "val": 2})
    files = bad_tree(data, "train")  # 33 images: 3 batches of 11 see every one
    proc = cli(*train_args(data, tmp_path, "run", "--epochs", "1", "-b", "11", "-j", "2",
                           "--data-path", data_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: skipped")]
    assert len(warnings) == 3
    for path in files.values():
        assert sum(str(path) in w for w in warnings) == 1, proc.stderr
    assert any("empty file" in w for w in warnings) and any("truncated" in w for w in warnings)
    rows = list(csv.DictReader((tmp_path / "run" / "summary.csv").open()))
    assert rows[0]["skipped_images"] == "3"
    assert "3 unreadable training images skipped" in proc.stdout
    log = (tmp_path / "run" / "train.log").read_text()
    assert all(str(p) in log for p in files.values())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["data_path"] == config["data_path"]["path"] == data_path
    assert f"data: {data_path}:" in proc.stderr


def test_strict_data_stops_at_the_first_bad_image_with_one_line(tmp_path, weights):
    data = link_tree(tmp_path / "data", {"train": 4, "val": 2})
    files = bad_tree(data, "train")
    proc = cli(*train_args(data, tmp_path, "run", "--epochs", "1", "-j", "2", "--strict-data",
                           "--data-path", "resident"))  # fmt: skip
    assert proc.returncode == 1
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert any(str(p) in line[0] for p in files.values()) and "--resume" in line[0]
    assert "error: unreadable image" in (tmp_path / "run" / "train.log").read_text()


def test_bad_validation_image_stops_before_training(tmp_path, weights, capsys):
    data = link_tree(tmp_path / "data", {"train": 4, "val": 2})
    files = bad_tree(data, "val")
    out = tmp_path / "out"
    proc = in_process(capsys, *train_args(data, out, "run", "--epochs", "1", "-j", "2"))
    line = one_line_error(proc, 2, "unreadable image", "3 bad files")
    assert any(str(p) in line for p in files.values())
    assert not out.exists() or not any(out.iterdir())  # no run folder left behind
    # before step 0 and training, not after an epoch: the error line is all of stderr
    # (one_line_error), where the step-0 line and, with FAST's --log-interval 1, every
    # step would be echoed (a time bound would say less, and depend on the machine)
    args = ["eval", "resnet20", "--weights", str(RESNET20_WEIGHTS), "--data", str(data)]
    line = one_line_error(in_process(capsys, *args), 2, "unreadable image")
    assert any(str(p) in line for p in files.values())


# ---------------------------------------------------------------- 4. resume points, kills


def test_kill_inside_epoch_one_resumes_to_the_bit(tiny, weights, tmp_path):
    # on the resident path (the PIL path is resumed in test_train.py)
    resident = ("--data-path", "resident")
    straight = cli(*train_args(tiny, tmp_path, "straight", "--epochs", "1", "-j", "0", "-q",
                               *resident))  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-2000:]
    straight_dir = tmp_path / "straight"
    assert_fresh_run(tmp_path / "straight", STEPS_PER_EPOCH)
    # the same run, killed (no chance to save anything) inside epoch 1 after a resume
    # point written every 2 steps
    args = train_args(tiny, tmp_path, "killed", "--epochs", "1", "-j", "0", *resident)
    proc = popen(*args, "--checkpoint-interval", "2")
    wait_for(proc, "epoch 1 step 3/")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    run = tmp_path / "killed"
    assert not (run / "summary.csv").exists()
    saved = saved_position(run)
    assert saved["step_in_epoch"] in (2, 3)  # the step-2 point (or a later one)
    resumed = cli("binarize", "--resume", str(run), "--json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_continued(run, saved, STEPS_PER_EPOCH, strict_loads(resumed.stdout))
    assert_same_weights(tmp_path / "straight", run)
    # and the same random state, so an extension (--resume --epochs N) or a model that
    # draws from it (dropout) continues alike: a resume draws no extra loader seed
    rng = [torch.load(r / "resume.pt", weights_only=True)["rng_torch"] for r in (straight_dir, run)]
    assert torch.equal(*rng)


ATTEMPTS = 3  # a kill that must land in a window of milliseconds: tries before failing


def test_kill_before_the_first_resume_point_says_so(tmp_path, weights, capsys):
    # a larger val/ makes step 0 (two evaluations) last long enough to be caught
    data = link_tree(tmp_path / "data", {"train": 4, "val": 60})
    for attempt in range(ATTEMPTS):
        out = tmp_path / f"out{attempt}"
        proc = popen(
            "binarize", "resnet20", "--weights", str(RESNET20_WEIGHTS), "--data", str(data),
            "-o", str(out), "--experiment", "early", "--recipe", "paper", "-b", "8", "-j", "0",
        )  # fmt: skip
        run = out / "early"
        deadline = time.monotonic() + 120
        while not (run / "config.json").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if (run / "config.json").exists() and not (run / "resume.pt").exists():
            break  # killed inside step 0
    else:
        pytest.fail(f"step 0 finished before the kill landed in all {ATTEMPTS} tries")
    before = snapshot(run)
    proc = in_process(capsys, "binarize", "--resume", str(run))
    one_line_error(proc, 2, "stopped before its first resume point", "start it again")
    assert snapshot(run) == before


def kill_while_writing(run: Path, target: str, args: list[str]) -> bool:
    """Start a run and SIGKILL it the moment a temporary file of `target` appears (for
    resume.pt: a write after the first one, so that the point left holds >= 1 step);
    False when the run ended without one being seen."""
    proc = popen(*args)
    first = None
    try:
        while proc.poll() is None:
            names = [p.name for p in run.iterdir()] if run.is_dir() else []
            if first is None and "resume.pt" in names:
                first = (run / "resume.pt").stat().st_ino  # the start-of-training point
            writing = any(n.startswith(target + ".") and n.endswith(".tmp") for n in names)
            replaced = target != "resume.pt" or (
                first is not None and (run / "resume.pt").stat().st_ino != first
            )
            if first is not None and writing and replaced:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                return True
        return False
    finally:
        proc.kill()
        proc.communicate(timeout=60)


def test_sigkill_during_checkpoint_writes_loses_nothing(tiny, weights, tmp_path, capsys):
    """Kill the moment a temporary checkpoint file appears (resume.pt every step; the
    packed files at epoch ends); the folder must always resume to the same weights."""
    straight = cli(*train_args(tiny, tmp_path, "straight", "--epochs", "2", "-j", "0", "-q"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert_fresh_run(tmp_path / "straight", 2 * STEPS_PER_EPOCH)
    for target in ("resume.pt", "last.safetensors", "best.safetensors"):
        for attempt in range(ATTEMPTS):
            name = f"kill-{target.split('.')[0]}-{attempt}"
            run = tmp_path / name
            args = train_args(tiny, tmp_path, name, "--epochs", "2", "-j", "0", "-q")
            if kill_while_writing(run, target, [*args, "--checkpoint-interval", "1",
                                                "--keep-latent"]):  # fmt: skip
                break
        else:
            pytest.fail(f"no write of {target} was caught in the act in {ATTEMPTS} runs")
        for packed in run.glob("*.safetensors"):  # what is there is whole and verified
            assert in_process(capsys, "info", str(packed)).returncode == 0
        saved = saved_position(run)
        resumed = cli("binarize", "--resume", str(run), "--keep-latent", "--seed", "3", "--json")
        assert resumed.returncode == 0, (target, resumed.stderr[-2000:])
        assert_continued(run, saved, 2 * STEPS_PER_EPOCH, strict_loads(resumed.stdout))
        assert not list(run.glob("*.tmp"))
        assert_same_weights(tmp_path / "straight", run)


def test_interrupt_and_done_lines_in_train_log(tiny, weights, tmp_path):
    proc = popen(*train_args(tiny, tmp_path, "int", "--epochs", "1", "-j", "0"))
    wait_for(proc, "epoch 1 step 2/")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = (tmp_path / "int" / "train.log").read_text().splitlines()
    assert "start: recu" in lines[0]
    assert "interrupted:" in lines[-1] and "resume point saved" in lines[-1]


# ---------------------------------------------------------------- 5. integrity


@pytest.fixture(scope="module")
def packed(finished_run) -> Path:
    return finished_run / "last.safetensors"


def header_of(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), 8 + n


def test_checksum_follows_the_documented_spec(packed):
    """An independent implementation of docs/format.md's checksum agrees with the file."""
    header, start = header_of(packed)
    stored = header["__metadata__"].pop("checksum")
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    h = hashlib.sha256(canonical.encode("ascii") + packed.read_bytes()[start:])
    assert stored == "sha256:" + h.hexdigest()


def flipped(src: Path, dst: Path, offset: int, mask: int) -> Path:
    raw = bytearray(src.read_bytes())
    raw[offset] ^= mask
    dst.write_bytes(bytes(raw))
    return dst


def test_bit_flips_are_caught_with_one_line(packed, tiny, tmp_path, capsys, monkeypatch):
    header, start = header_of(packed)
    var = header["layer1.0.bn1.running_var"]["data_offsets"][0]
    bits = header["layer2.0.conv1.weight_bits"]["data_offsets"][0]
    cases = {
        "data": flipped(packed, tmp_path / "data.safetensors", start + bits + 5, 0x04),
        "var": flipped(packed, tmp_path / "var.safetensors", start + var + 3, 0x80),
    }
    raw = packed.read_bytes()
    text = raw[8:start].decode()
    i = text.index('\\"dead_share\\":0.') + len('\\"dead_share\\":0.')
    digit = text[i]
    edited = text[:i] + ("1" if digit != "1" else "2") + text[i + 1 :]  # same length
    cases["stats"] = tmp_path / "stats.safetensors"
    cases["stats"].write_bytes(raw[:8] + edited.encode() + raw[start:])
    for case, path in cases.items():
        before = path.read_bytes()
        for command in (["info", str(path)], ["eval", str(path), "--data", str(tiny)]):
            code, _, err = run_cli(command, capsys)
            assert_one_line_error(code, err, str(path), "checksum does not match")
        assert path.read_bytes() == before, case
    # without the checksum check, a negative BatchNorm variance is still refused
    monkeypatch.setenv("RECU_SKIP_CHECKSUM", "1")
    code, _, err = run_cli(["eval", str(cases["var"]), "--data", str(tiny)], capsys)
    assert_one_line_error(code, err, "layer1.0.bn1.running_var", "BatchNorm variance")


def test_file_without_checksum_loads_with_a_note():
    old = REPO / "tests" / "data" / "packed-v1-resnet20.safetensors"
    proc = cli("info", str(old), "--json")
    assert proc.returncode == 0
    strict_loads(proc.stdout)
    assert "has no checksum" in proc.stderr and str(old) in proc.stderr


def test_packed_files_follow_the_umask(finished_run):
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("last.safetensors", "best.safetensors", "config.json", "summary.csv"):
        assert stat.S_IMODE((finished_run / name).stat().st_mode) == 0o666 & ~mask, name


# ---------------------------------------------------------------- 6. strict JSON


def test_eval_with_overflowing_logits_is_an_error_not_json(tiny, weights, tmp_path):
    """Logits that overflow are no accuracy (issue 26: a silent 10% with loss null was)."""
    from safetensors.torch import save_file

    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state["linear.weight"] = torch.full_like(state["linear.weight"], 3e38)  # logits overflow
    path = tmp_path / "overflow.safetensors"
    save_file(state, str(path))
    proc = cli("eval", "resnet20", "--weights", str(path), "--data", str(tiny), "--json")
    one_line_error(proc, 2, "NaN or infinite", "'linear' (Linear)")
    assert proc.stdout == ""


def test_binarize_json_is_strict_when_no_binary_epoch_ran(tiny, weights, tmp_path):
    args = train_args(tiny, tmp_path, "s1", "-j", "0", "--max-steps", "1", "--json")
    args[args.index("paper")] = "finetune"  # two stages: stops in stage 1, no best yet
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = strict_loads(proc.stdout)
    assert result["best_top1"] is None and result["last"] is None


# ---------------------------------------------------------------- 7. output, 8. weights


def test_output_problems_are_one_line_and_leave_nothing(tiny, weights, tmp_path, capsys):
    proc = in_process(capsys, *train_args(tiny, Path("/dev/null"), "run", "--epochs", "1"))
    one_line_error(proc, 2, "/dev/null/run", "a file is in the way")
    unwritable = Path("/proc/recu-test") if os.geteuid() == 0 else tmp_path / "ro" / "x"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
    proc = in_process(capsys, *train_args(tiny, unwritable, "run", "--epochs", "1"))
    one_line_error(proc, 2, "cannot create run folder", "--output")
    out = tmp_path / "out"
    out.mkdir()
    args = train_args(tiny, out, "run", "--epochs", "1", "--teacher", "resnt20")
    proc = in_process(capsys, *args)
    one_line_error(proc, 2, "--teacher", "did you mean resnet20")
    assert list(out.iterdir()) == []  # the failed start left no run folder


def test_weights_loader_says_what_the_file_is(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cases = {
        "random.pth": (os.urandom(4096), "not a PyTorch or safetensors checkpoint"),
        "text.pth": (b"hello, not a checkpoint\n", "not a PyTorch or safetensors checkpoint"),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"w": torch.ones(2), "evil": Evil()}, tmp_path / "evil.pth")
    cases["evil.pth"] = (b"", "contains Python objects besides tensors, refused for safety")
    full = (tmp_path / "evil.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(full[: len(full) // 2])
    cases["cut.pth"] = (b"", "damaged PyTorch checkpoint")
    for name, (_, fragment) in cases.items():
        args = ["convert", "resnet20", "--weights", str(tmp_path / name), "--dry-run"]
        code, _, err = run_cli(args, capsys)
        assert_one_line_error(code, err, str(tmp_path / name), fragment)
        assert "re-save" not in err or name == "evil.pth"
    assert not marker.exists()


# ---------------------------------------------------------------- 9. smaller items


def test_smaller_items(tmp_path, capsys):
    demo = ["binarize", "resnet20", "--data", "demo", "-o", str(tmp_path)]
    code, _, err = run_cli([*demo, "--tau-min", "1.5"], capsys)
    assert_one_line_error(code, err, "--tau-min")
    code, _, err = run_cli(["convert", "resnet20", "--dry-run", "--keep", "layer9.*"], capsys)
    assert_one_line_error(code, err, "--keep 'layer9.*' matches no conv layer")
    code, _, err = run_cli([*demo, "--keep", "nope"], capsys)
    assert_one_line_error(code, err, "--keep 'nope'")
    code, _, err = run_cli([*demo, "--checkpoint-interval", "soon"], capsys)
    assert_one_line_error(code, err, "--checkpoint-interval")
    assert list(tmp_path.iterdir()) == []
    helptext = cli("binarize", "--help").stdout  # a process: the width of a real terminal
    assert "<bool>" not in helptext
    for flag in ("--epochs", "--device", "--seed", "--teacher-weights", "--channels-last"):
        row = next(ln for ln in helptext.splitlines() if f"{flag} " in ln)
        assert len(row.split(flag, 1)[1].strip(" │")) > 12, row  # a help text, not blank
