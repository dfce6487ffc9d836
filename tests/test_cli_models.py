"""The CLI on real inputs: eval of pretrained weights, conversion reports, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recu_cli.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def assert_one_line_error(code: int, err: str, *fragments: str, exit_code: int = 2) -> None:
    assert code == exit_code, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_version(capsys) -> None:
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("recu ")


def test_pretrained_resnet20_scores_86_percent(capsys, cifar_dir, resnet20_weights) -> None:
    code, out, _ = run_cli(
        [
            "eval",
            "resnet20",
            "--weights",
            str(resnet20_weights),
            "--data",
            str(cifar_dir),
            "--json",
            "-j",
            "0",
        ],
        capsys,
    )
    assert code == 0
    result = json.loads(out)
    assert result["top1"] == pytest.approx(86.0, abs=0.5)
    assert result["top5"] > 99.0 and result["images"] == 5000


def test_convert_dry_run_json(capsys) -> None:
    code, out, _ = run_cli(["convert", "resnet18", "--dry-run", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    binary = [layer["name"] for layer in report["layers"] if layer["binary"]]
    assert len(binary) == 16
    assert all(isinstance(layer["binary"], bool) for layer in report["layers"])
    assert report["totals"]["binary_params"] == 10_985_472


def test_convert_dry_run_table(capsys) -> None:
    code, out, _ = run_cli(["convert", "tv:resnet18", "--dry-run", "--keep", "layer4.*"], capsys)
    assert code == 0
    assert "layer3.1.conv2" in out and "kept by --keep 'layer4.*'" in out
    assert "12 of 21 conv/linear layers binary" in out


def test_unknown_model_suggests_names(capsys) -> None:
    code, _, err = run_cli(["convert", "resnt18", "--dry-run"], capsys)
    assert_one_line_error(code, err, "unknown model 'resnt18'", "resnet18")


def test_missing_weights_file(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(
        ["convert", "resnet20", "--weights", str(tmp_path / "nope.th"), "--dry-run"], capsys
    )
    assert_one_line_error(code, err, "weights file not found")


def test_weights_of_another_architecture(capsys, resnet20_weights) -> None:
    code, _, err = run_cli(
        ["convert", "resnet56", "--weights", str(resnet20_weights), "--dry-run"], capsys
    )
    assert_one_line_error(code, err, "weights do not fit resnet56", "missing")


def test_pickled_object_is_refused(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "obj": Path("x")}, bad)
    code, _, err = run_cli(["convert", "resnet20", "--weights", str(bad), "--dry-run"], capsys)
    assert_one_line_error(code, err, "weights_only=True")


def test_offline_pretrained_suggests_weights(capsys, monkeypatch, tmp_path: Path) -> None:
    """Offline with nothing cached, on every machine (CI may reach the hub): the hub
    client's own offline mode over an empty cache, as recu sets it when DNS fails."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code, _, err = run_cli(["convert", "resnet18", "--pretrained", "--dry-run"], capsys)
    assert_one_line_error(code, err, "could not download", "--weights", exit_code=1)


def test_data_folder_missing(capsys, tmp_path: Path, resnet20_weights) -> None:
    code, _, err = run_cli(
        ["eval", "resnet20", "--weights", str(resnet20_weights), "--data", str(tmp_path / "none")],
        capsys,
    )
    assert_one_line_error(code, err, "data folder not found")


def test_data_folder_without_class_folders(capsys, tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "stray.txt").write_text("x")
    code, _, err = run_cli(["eval", "resnet20", "--data", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "no class folders")


def test_bad_flag_value_is_one_line(capsys) -> None:
    code, _, err = run_cli(["convert", "resnet20", "--dry-run", "--act", "relu"], capsys)
    assert_one_line_error(code, err, "--act")
    code, _, err = run_cli(["eval", "resnet20", "--data", "x", "-b", "0"], capsys)
    assert_one_line_error(code, err, "batch-size")


def test_console_script_runs_as_a_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "recu_cli", "convert", "nosuchmodel", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown model") and "Traceback" not in proc.stderr
