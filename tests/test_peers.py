"""`recu bench --peers`: recu's engines next to PyTorch, ONNX Runtime and OpenVINO, and the
skip path when the peer packages are absent."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recu_cli.peers import INSTALL_HINT, KEYS
from tests.conftest import CIFAR, REPO, RESNET20_WEIGHTS, require_module, require_shared
from tests.test_cli_models import run_cli

FAST = ["--threads", "1", "--min-time", "0.02", "--min-runs", "3"]
PEER_MODULES = ("onnx", "onnxruntime", "openvino", "nncf")
HIDE = "import sys\nfor m in ('openvino', 'onnxruntime'):\n    sys.modules[m] = None\n"


@pytest.fixture(scope="module")
def peers_report() -> dict:
    """One --peers --json run on ResNet-20 (32 px), batches 1 and 2, int8 peers calibrated on
    real CIFAR-10 images."""
    import contextlib
    import io

    from recu_cli.cli import main

    require_shared(CIFAR)
    buf = io.StringIO()
    args = ["bench", "resnet20", "--peers", "--json", "--batch", "1,2", "--data", str(CIFAR)]
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        main(args + FAST)
    assert exc.value.code == 0
    return json.loads(buf.getvalue())


def test_peers_json_has_every_key_and_consistent_speedups(peers_report) -> None:
    p = peers_report["peers"]
    assert p["keys"] == list(KEYS)
    assert {"torch_fp32", "ort_fp32", "ort_int8", "openvino_fp32", "openvino_int8",
            "recu_xnor", "recu_int8"} <= set(KEYS)  # fmt: skip
    assert [(s["threads"], s["batch"]) for s in p["settings"]] == [(1, 1), (1, 2)]
    for s in p["settings"]:
        assert set(s["ms"]) == set(KEYS)
        for key in KEYS:
            if p["entries"][key]["available"]:
                ms = s["ms"][key]
                assert ms is not None and math.isfinite(ms) and ms > 0, (key, ms)
            else:
                assert s["ms"][key] is None
                assert key in p["skipped"]
        base = s["ms"]["openvino_int8"]
        for key in ("recu_xnor", "recu_int8"):
            got = s["speedup_vs_openvino_int8"][key]
            if base is None or s["ms"][key] is None:
                assert got is None
            else:
                assert got == pytest.approx(base / s["ms"][key], rel=1e-9)
        # the float peers compute the float original; recu's engines the BNN, bit for bit
        for key in ("torch_fp32_nhwc", "ort_fp32", "openvino_fp32"):
            if s["max_rel_diff"][key] is not None:
                assert s["max_rel_diff"][key] < 1e-4, key
        for key in ("recu_xnor", "recu_int8"):
            if s["max_rel_diff"][key] is not None:
                assert s["max_rel_diff"][key] == 0.0, key


def test_installed_peers_all_run(peers_report) -> None:
    """Where the extra is installed (CI installs it), every peer runs: none is skipped. A
    peer module that is absent skips this test (fails it in CI); one that is installed but
    fails to import fails it, as it would make its peer skip."""
    for module in PEER_MODULES:
        require_module(module, "peers")
    p = peers_report["peers"]
    float_keys = [k for k in KEYS if not k.startswith("recu_")]
    assert all(p["entries"][k]["available"] for k in float_keys), p["skipped"]
    # int8 peers quantize for real: close to, but not equal to, the float model's logits
    for s in p["settings"]:
        for key in ("ort_int8", "openvino_int8"):
            assert 0 < s["max_rel_diff"][key] < 0.5, (key, s["max_rel_diff"][key])


def test_int8_peers_calibrate_on_real_images_with_data(peers_report) -> None:
    assert peers_report["peers"]["calibration"].startswith("16 real images from ")
    assert str(CIFAR / "val") in peers_report["peers"]["calibration"]


def test_calibration_images_are_the_data_through_eval_transforms() -> None:
    from torchvision import datasets

    from recu_cli.data import build_transform, spread_inputs
    from recu_cli.models import create_model

    require_shared(CIFAR)
    _, spec = create_model("resnet20")
    xs, note = spread_inputs(str(CIFAR), spec, 4)
    ds = datasets.ImageFolder(str(CIFAR / "val"), transform=build_transform(spec, train=False))
    idx = torch.linspace(0, len(ds) - 1, 4).round().long().tolist()
    assert [ds.targets[i] for i in idx] == [0, 3, 6, 9]  # spread over the classes
    for x, i in zip(xs, idx, strict=True):
        assert x.shape == (1, *spec.input_size)
        assert torch.equal(x[0], ds[i][0])
    rnd, rnote = spread_inputs(None, spec, 3)
    assert len(rnd) == 3 and "random" in rnote and "--data" in rnote


def test_packed_file_peers_get_its_full_precision_tensors(tmp_path, capsys) -> None:
    """From a packed file the float original has the file's stem, BatchNorms and classifier."""
    from recu_cli.models import create_model, load_weights, read_state_dict
    from recu_cli.peers.source import load_models

    weights = require_shared(RESNET20_WEIGHTS)
    out = tmp_path / "r20.safetensors"
    code, _, err = run_cli(["convert", "resnet20", "-w", str(weights), "-o", str(out)], capsys)
    assert code == 0, err
    models = load_models(str(out))
    ref, spec = create_model("resnet20")
    load_weights(ref, read_state_dict(weights), spec)
    got = models.float_model.state_dict()
    want = ref.state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer2.1.bn2.weight", "linear.weight"):
        assert torch.equal(got[key], want[key]), key
    assert "rebuilt from the file's spec" in models.weights_note
    assert models.spec.input_size == spec.input_size


def test_peers_without_the_packages_print_the_skip_reason_and_exit_0() -> None:
    """openvino and onnxruntime blocked in a fresh interpreter: skipped with the hint, exit 0."""
    script = HIDE + "from recu_cli.cli import main\nmain(sys.argv[1:])\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["bench", "resnet20", "--peers", "--batch", "1", *FAST]
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    out = " ".join(proc.stdout.split())  # rich may wrap long lines
    for key in ("ort_fp32", "ort_int8", "openvino_fp32", "openvino_int8"):
        assert f"{key} skipped:" in out, out
    assert "onnxruntime not installed" in out and "openvino" in out
    assert INSTALL_HINT in out
    assert "torch_fp32" in out  # the rest still ran
    lines = [ln for ln in proc.stdout.splitlines() if "torch_fp32 " in ln]
    assert lines and any(ch.isdigit() for ch in lines[0])


def test_peers_json_without_the_packages_lists_them_as_skipped() -> None:
    script = HIDE + "from recu_cli.cli import main\nmain(sys.argv[1:])\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["bench", "resnet20", "--peers", "--json", "--batch", "1", "--engine", "int8", *FAST]
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    p = json.loads(proc.stdout)["peers"]
    (s,) = p["settings"]
    for key in ("ort_fp32", "ort_int8", "openvino_fp32", "openvino_int8"):
        assert s["ms"][key] is None and INSTALL_HINT in p["skipped"][key]
    assert s["ms"]["torch_fp32"] > 0 and s["ms"]["recu_int8"] > 0
    assert s["ms"]["recu_xnor"] is None and "--engine" in p["skipped"]["recu_xnor"]
    assert s["speedup_vs_openvino_int8"] == {"recu_xnor": None, "recu_int8": None}


def test_data_without_peers_is_one_line_error(capsys) -> None:
    from tests.test_cli_models import assert_one_line_error

    code, _, err = run_cli(["bench", "resnet20", "--data", str(Path("nowhere"))], capsys)
    assert_one_line_error(code, err, "--peers")
