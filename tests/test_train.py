"""`recu binarize` end to end on real CIFAR-10 images (a small class-balanced subset)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recu_cli.training import SUMMARY_FIELDS, TrainConfig, Trainer, TrainingStopped
from tests.resume_checks import assert_continued, assert_fresh_run, saved_position
from tests.test_cli_models import assert_one_line_error, run_cli

RUN_ARGS = [
    "--recipe", "paper", "--epochs", "2", "-b", "16", "--log-interval", "1", "--seed", "7",
    "-j", "0",
]  # fmt: skip
TOTAL_STEPS = 2 * (120 // 16)  # small_cifar: 120 training images; the last partial batch drops


@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory) -> Path:
    """train: 12 images per class, val: 6 per class, linked (not copied) from shared data."""
    from tests.conftest import link_tree

    return link_tree(tmp_path_factory.mktemp("cifar_small"), {"train": 12, "val": 6})


def binarize_args(data: Path, out: Path, weights: Path, name: str, *extra: str) -> list[str]:
    return [
        "binarize", "resnet20", "--weights", str(weights), "--data", str(data),
        "-o", str(out), "--experiment", name, *RUN_ARGS, *extra,
    ]  # fmt: skip


def same_threads_env() -> dict[str, str]:
    """The environment for a child process that must compute as this one does: CPU float
    results depend on the number of threads (OMP_NUM_THREADS=1 outside, 2 in here)."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def final_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "resume.pt", map_location="cpu", weights_only=True)["model"]


def test_short_run_writes_every_output(capsys, small_cifar, resnet20_weights, tmp_path) -> None:
    code, out, _ = run_cli(
        binarize_args(small_cifar, tmp_path, resnet20_weights, "run", "--json"), capsys
    )
    assert code == 0
    result = json.loads(out)
    run = tmp_path / "run"
    for name in (
        "config.json",
        "summary.csv",
        "last.safetensors",
        "best.safetensors",
        "resume.pt",
        "train.log",
    ):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp"))
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == SUMMARY_FIELDS
    assert float(rows[0]["tau"]) == pytest.approx(0.85)
    assert float(rows[1]["tau"]) == pytest.approx(
        0.85 + 0.14 * (2.718281828**0.5 - 1) / (2.718281828 - 1), abs=1e-5
    )
    assert 0.0 < float(rows[0]["dead_share"]) < 0.5
    assert float(rows[0]["flip_rate"]) > 0  # weights trained and changed sign
    final = result["final"]
    assert result["epochs"] == 2
    assert final["val_top1"] == pytest.approx(float(rows[1]["val_top1"]), rel=1e-5)  # 6 digits
    # the packed checkpoint is the model that was validated: `recu eval` counts as many
    # right answers on the same images
    assert packed_top1(run / "last.safetensors", str(small_cifar), capsys) == final["val_top1"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["model"] == "resnet20" and cfg["model"]["num_classes"] == 10


def packed_top1(packed: Path, data: str, capsys) -> float:
    """Top-1 of `recu eval PACKED --data DATA` (its validation images, as training's)."""
    capsys.readouterr()
    code, out, err = run_cli(["eval", str(packed), "--data", data, "-j", "0", "--json"], capsys)
    assert code == 0, err
    return json.loads(out)["top1"]


def test_interrupted_run_resumes_bit_identically(
    capsys, small_cifar, resnet20_weights, tmp_path
) -> None:
    # the PIL path: its loader workers must not change the result (the resident path is
    # resumed in test_trust.py)
    pil = ("--data-path", "pil")
    args = binarize_args(small_cifar, tmp_path, resnet20_weights, "straight", "--json", *pil)
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    assert_fresh_run(tmp_path / "straight", TOTAL_STEPS, json.loads(out))
    # the same run, interrupted by a real SIGINT in its first epoch, then resumed
    args = binarize_args(small_cifar, tmp_path, resnet20_weights, "broken", "-j", "1", *pil)
    proc = subprocess.Popen(
        [sys.executable, "-m", "recu_cli", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=same_threads_env(),  # float sums depend on the thread count
    )
    for line in proc.stderr:
        if re.search(r"epoch 1 step 3/", line):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "resume point saved" in err and "Traceback" not in err
    broken = tmp_path / "broken"
    assert not (broken / "last.safetensors").exists()  # interrupted before any epoch ended
    saved = saved_position(broken)
    assert saved["epoch"] == 1 and saved["step_in_epoch"] >= 3  # Ctrl-C after step 3
    code, out, _ = run_cli(["binarize", "--resume", str(broken), "--json"], capsys)
    assert code == 0
    assert_continued(broken, saved, TOTAL_STEPS, json.loads(out))
    a, b = final_state(tmp_path / "straight"), final_state(broken)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pa, pb = (
        load_file(tmp_path / "straight" / "last.safetensors"),
        load_file(broken / "last.safetensors"),
    )
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


DDP_ARGS = ("--epochs", "1", "-b", "8")
DDP_STEPS = 120 // 2 // 8  # each rank: its half of the 120 images, batches of 8
VOLATILE = {"seconds", "img_per_s"}  # wall-clock columns of summary.csv


def torchrun(args: list[str], **kw) -> list[str]:
    """`torchrun --nproc_per_node 2 -m recu_cli ARGS` (gloo on the CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "-m", "recu_cli", *args]  # fmt: skip


def digests(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"rank (\d)/2: final weights digest (\w+)", stdout))


def summary_rows(run: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader((run / "summary.csv").open()))
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.fixture(scope="module")
def ddp_run(small_cifar, tmp_path_factory) -> tuple[Path, str]:
    """One uninterrupted 2-process gloo run (run folder, stdout), shared by the DDP tests."""
    from tests.conftest import RESNET20_WEIGHTS, require_shared

    weights = require_shared(RESNET20_WEIGHTS)
    out = tmp_path_factory.mktemp("ddp")
    args = binarize_args(small_cifar, out, weights, "ddp", *DDP_ARGS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(torchrun(args), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "ddp", proc.stdout


def test_two_process_gloo_run_under_torchrun(ddp_run) -> None:
    run, stdout = ddp_run
    found = digests(stdout)
    assert set(found) == {"0", "1"}, stdout[-3000:]
    assert found["0"] == found["1"]
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert len(rows) == 1 and (run / "last.safetensors").is_file()


def test_two_process_run_interrupted_by_ctrl_c_resumes_exactly(
    capsys, ddp_run, small_cifar, resnet20_weights, tmp_path
) -> None:
    """Ctrl-C in the terminal (SIGINT to torchrun and both ranks), resume under torchrun:
    the summary (each rank's own loss sums) and the weights equal the uninterrupted run's;
    a resume with another number of processes is refused in one line."""
    straight, straight_out = ddp_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = binarize_args(small_cifar, tmp_path, resnet20_weights, "broken", *DDP_ARGS)
    proc = subprocess.Popen(
        torchrun(args), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # its own process group: the terminal's Ctrl-C reaches all
    )  # fmt: skip
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(r"epoch 1 step 2/", line):
            os.killpg(proc.pid, signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    err = "".join(seen) + err
    broken = tmp_path / "broken"
    assert "resume point saved" in err, err[-3000:]
    assert (broken / "resume.pt").is_file() and not (broken / "last.safetensors").exists()
    saved = saved_position(broken)
    assert saved["epoch"] == 1 and saved["step_in_epoch"] >= 2  # Ctrl-C after step 2

    proc = subprocess.run(
        torchrun(["binarize", "--resume", str(broken), "--quiet"]),
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary_rows(broken) == summary_rows(straight)
    assert digests(proc.stdout) == digests(straight_out)
    assert_fresh_run(straight, DDP_STEPS)
    assert_continued(broken, saved, DDP_STEPS)  # rank 0's count; the ranks step together

    code, _, msg = run_cli(["binarize", "--resume", str(broken), "--quiet"], capsys)
    assert_one_line_error(code, msg, "2 process", "nproc_per_node 2")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    small_cifar, resnet20_weights, tmp_path
) -> None:
    cfg = TrainConfig(
        model="resnet20", data=str(small_cifar), weights=str(resnet20_weights), epochs=2,
        batch_size=16, workers=0, output=str(tmp_path), experiment="nan", max_steps=7,
        log_interval=0,
        opt="sgd", lr=0.01, recipe="paper",
    )  # fmt: skip
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()  # one good epoch (7 steps) -> last.safetensors
    run = tmp_path / "nan"
    good = (run / "last.safetensors").read_bytes()
    resumed = Trainer(TrainConfig(**{**cfg.__dict__, "max_steps": None}), run_dir=run, quiet=True)
    for group in resumed.parts.optimizer.param_groups:
        group["lr"] = 1e38  # a learning rate that makes the weights overflow
    for _, cosine in resumed.state.scheduler.cycles:
        cosine.base_values = [1e38 for _ in cosine.base_values]
    with pytest.raises(TrainingStopped, match=r"loss became (nan|inf)") as exc:
        resumed.fit()
    assert exc.value.exit_code == 1
    assert (run / "last.safetensors").read_bytes() == good
    assert not list(run.glob("*.tmp"))


def test_run_folder_works_on_its_own_from_plain_values(tmp_path) -> None:
    """A RunFolder without a Trainer: last.safetensors at every kept epoch, best only when
    top-1 beats the best so far (it decides, the caller keeps the best), resume.pt from a
    payload, summary.csv, the lock; the model it is given is left as it was."""
    from recu_cli import pack
    from recu_cli.bnn import convert_model
    from recu_cli.convert_config import ConvertConfig
    from recu_cli.models import create_model
    from recu_cli.stats import model_stats
    from recu_cli.training.distributed import DistInfo
    from recu_cli.training.run_folder import RunFolder

    config = ConvertConfig()
    model, spec = create_model("resnet20")
    model, _ = convert_model(model, config)
    stats = model_stats(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run, created = RunFolder.create(tmp_path, "alone", "resnet20", DistInfo(), quiet=True)
    assert created and run.path == tmp_path / "alone"
    run.open(resuming=False)
    best, verdicts = -1.0, []
    for epoch, top1 in enumerate((10.0, 5.0, 12.5, 12.5), start=1):
        is_best = run.keep_epoch(
            top1, best, model, spec, config, stats=stats, training={"epoch": epoch},
            history=[{"epoch": epoch}], half=epoch == 4,
        )  # fmt: skip
        verdicts.append(is_best)
        best = top1 if is_best else best
    assert verdicts == [True, False, True, False]
    last, kept = pack.read(run.path / "last.safetensors"), pack.read(run.path / "best.safetensors")
    assert last.training == {"epoch": 4} and last.storage["float_dtype"] == "F16"
    assert kept.training == {"epoch": 3} and kept.history == [{"epoch": 3}]
    assert kept.stats == json.loads(json.dumps(stats))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    run.save_resume({"position": {"epoch": 4}, "weights": torch.ones(2)})
    saved = torch.load(run.resume_path, weights_only=True)
    assert saved["position"] == {"epoch": 4} and torch.equal(saved["weights"], torch.ones(2))
    run.write_summary([{"epoch": 1, "val_top1": 10.0}])
    rows = list(csv.DictReader((run.path / "summary.csv").open()))
    assert rows[0]["epoch"] == "1" and rows[0]["val_top1"] == "10"
    run.close()
    names = sorted(p.name for p in run.path.iterdir())
    assert names == [".lock", "best.safetensors", "last.safetensors", "resume.pt", "summary.csv"]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--opt", "lamb"], "--opt"),
        (["--tau-min", "0.99", "--tau-max", "0.9"], "--tau-min"),
        (["--lr", "-1"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--tau-update", "batch"], "--tau-update"),
    ],
)
def test_bad_flag_values(capsys, extra, fragment, tmp_path) -> None:
    code, _, err = run_cli(
        ["binarize", "resnet20", "--data", "demo", "-o", str(tmp_path), *extra], capsys
    )
    assert_one_line_error(code, err, fragment)
    assert not any(tmp_path.iterdir())


def test_bad_data(capsys, tmp_path) -> None:
    code, _, err = run_cli(
        ["binarize", "resnet20", "--data", str(tmp_path / "nope"), "-o", str(tmp_path)], capsys
    )
    assert_one_line_error(code, err, "data folder not found")
    (tmp_path / "d" / "val" / "cat").mkdir(parents=True)
    code, _, err = run_cli(
        ["binarize", "resnet20", "--data", str(tmp_path / "d"), "-o", str(tmp_path)], capsys
    )
    assert_one_line_error(code, err, "no train/ folder")


def test_resume_of_a_folder_that_is_no_run(capsys, tmp_path) -> None:
    code, _, err = run_cli(["binarize", "--resume", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "not a resumable run")


def test_demo_data_is_built_in(capsys, tmp_path) -> None:
    code, out, _ = run_cli(
        ["binarize", "resnet20", "--data", "demo", "--max-steps", "2", "-b", "32", "-j", "0",
         "--recipe", "paper",
         "-o", str(tmp_path), "--experiment", "demo", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert Path(result["last"]).is_file()
    # the training's validation and `recu eval` of the packed file: the same answers (the
    # demo's validation images are shipped with recu, so this needs no shared data)
    assert packed_top1(Path(result["last"]), "demo", capsys) == result["final"]["val_top1"]


def test_imagenet_model_gets_a_new_head_and_no_self_distillation(capsys, tmp_path) -> None:
    """timm resnet18 (1000 classes) fine-tuned on 10 classes: new head, teacher self is off.
    (One step on one image per class: at 224 px each image costs what 50 CIFAR ones do.)"""
    from safetensors.torch import save_file

    from recu_cli.models import create_model
    from tests.conftest import link_tree

    data = link_tree(tmp_path / "data", {"train": 1, "val": 1})
    model, _ = create_model("resnet18")
    weights = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    args = [
        "binarize", "resnet18", "--weights", str(weights), "--data", str(data),
        "--max-steps", "1", "-b", "4", "-j", "0", "--no-step0-eval", "-o", str(tmp_path),
        "--experiment", "r18",
    ]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    log = (tmp_path / "r18" / "train.log").read_text()
    assert "new 10-class classifier" in log and "distillation off" in log
    cfg = json.loads((tmp_path / "r18" / "config.json").read_text())
    assert cfg["model"]["num_classes"] == 10 and cfg["model"]["input_size"] == [3, 224, 224]
