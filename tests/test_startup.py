"""`recu --help`, `--version` and `COMMAND --help` start without torch, timm or torchvision
(each costs about a second at start-up); checked by what Python imports, not by timing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from recu_cli.commands import COMMAND_MODULES
from tests.conftest import REPO

HEAVY = {"torch", "timm", "torchvision"}
COMMANDS = ["eval" if name == "evaluate" else name for name in COMMAND_MODULES]


def imported_modules(args: list[str]) -> set[str]:
    """Top-level names of the modules `python -m recu_cli ARGS` imports (-X importtime)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "recu_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "recu_cli" in names  # the parse found the CLI's own imports
    return names


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], *[[c, "--help"] for c in COMMANDS]], ids=" ".join
)
def test_help_and_version_do_not_import_torch(args: list[str]) -> None:
    assert not imported_modules(args) & HEAVY


def test_info_on_a_new_file_does_not_import_torch(tmp_path) -> None:
    """`recu info FILE` prints a file written by this recu from its metadata alone: the
    module records (format minor 1) and the checksum, no torch, timm or torchvision."""
    from recu_cli import pack
    from recu_cli.bnn import convert_model
    from recu_cli.convert_config import ConvertConfig
    from recu_cli.models import create_model
    from recu_cli.stats import model_stats

    config = ConvertConfig()
    model, spec = create_model("resnet20")
    model, _ = convert_model(model, config)
    path = tmp_path / "r20.safetensors"
    pack.save(path, model, spec, config, stats=model_stats(model))
    for args in (["info", str(path)], ["info", str(path), "--json"]):
        assert not imported_modules(args) & HEAVY
    old = REPO / "tests" / "data" / "packed-v1-resnet20.safetensors"
    assert "torch" in imported_modules(["info", str(old)])  # the rebuilt tree's path
