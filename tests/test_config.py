"""One source per setting: `recu binarize`'s flags, its recipe and a --config file fill
TrainConfig by field name, flags given on the command line winning."""

from __future__ import annotations

import json
import sys

import pytest

from recu_cli.binarize.tau import TAU_MAX, TAU_MIN
from recu_cli.errors import RecuError
from recu_cli.training.config import TrainConfig
from tests.conftest import require_module
from tests.test_cli_models import assert_one_line_error, run_cli


def config_of(*args: str) -> TrainConfig:
    """The TrainConfig `recu binarize ARGS` would train with (nothing is run)."""
    import typer

    from recu_cli.app import app
    from recu_cli.commands import register_all
    from recu_cli.commands.binarize import given_params
    from recu_cli.training.settings import build_config

    register_all()
    command = typer.main.get_command(app).commands["binarize"]
    ctx = command.make_context("binarize", list(args))
    return build_config(ctx.params, set(given_params(ctx)), ctx.params["config"])


def test_recipe_fills_what_flags_do_not_give() -> None:
    cfg = config_of("resnet20", "--data", "demo", "--epochs", "4")
    assert (cfg.recipe, cfg.lr, cfg.stage1_epochs, cfg.feature_kd) == ("finetune", 8e-3, 2, 6.0)
    assert (cfg.attention_weight(1), cfg.attention_weight(2)) == (6.0, 3.0)
    assert cfg.kd_temperature == 2.0
    assert (cfg.convert.activation, cfg.convert.act_threshold) == ("prelu", "median")
    assert (cfg.tau_min, cfg.tau_max, cfg.convert.tau) == (TAU_MIN, TAU_MAX, TAU_MIN)
    given = config_of(
        "resnet20", "--data", "demo", "--lr", "0.01", "--act", "hardtanh", "--plain-sign",
        "--keep", "layer3.*",
    )  # fmt: skip
    assert given.lr == 0.01 and given.convert.activation == "hardtanh"
    assert (given.convert.standardize, given.convert.clamp, given.convert.keep) == (
        False, False, ("layer3.*",),
    )  # fmt: skip
    paper = config_of("resnet20", "--data", "demo", "--recipe", "paper")
    assert paper.lr is None and paper.stage1_epochs == 0 and paper.convert.activation == "hardtanh"


def test_yaml_config_file_under_the_flags(tmp_path) -> None:
    require_module("yaml", "dev")
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: resnet20\ndata: demo\nepochs: 4\nlr: 0.005\nbatch-size: 32\n"
        "convert:\n  activation: identity\n  keep: ['layer3.*']\n"
    )
    cfg = config_of("--config", str(path), "--epochs", "8", "--seed", "1")
    assert (cfg.model, cfg.data, cfg.epochs, cfg.seed) == ("resnet20", "demo", 8, 1)
    assert (cfg.lr, cfg.batch_size, cfg.stage1_epochs) == (0.005, 32, 4)  # recipe on 8 epochs
    assert cfg.convert.activation == "identity" and cfg.convert.keep == ("layer3.*",)
    assert config_of("--config", str(path), "--act", "prelu").convert.activation == "prelu"
    path.write_text("model: resnet20\ndata: demo\nlr: 1e-3\n")  # YAML 1.1 reads 1e-3 as text
    assert config_of("--config", str(path)).lr == 1e-3


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("model: resnet20\nlearning_rate: 0.1\n", "unknown setting 'learning_rate'"),
        ("model: resnet20\nconvert: {act: prelu}\n", "unknown setting 'convert.act'"),
        ("- resnet20\n", "must hold a mapping"),
        ("model: [resnet20\n", "cannot read config file"),
        ("model: resnet20\nlr: fast\n", "'lr' in config file"),
    ],
)
def test_bad_config_file_is_one_line(capsys, tmp_path, text, fragment) -> None:
    require_module("yaml", "dev")
    path = tmp_path / "run.yaml"
    path.write_text(text)
    code, _, err = run_cli(["binarize", "--config", str(path), "-o", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_yaml_without_pyyaml_says_how_to_install_it(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    path = tmp_path / "run.yaml"
    path.write_text("model: resnet20\n")
    code, _, err = run_cli(["binarize", "--config", str(path)], capsys)
    assert_one_line_error(code, err, "pip install pyyaml")


def test_cross_flag_rules_live_in_validate() -> None:
    with pytest.raises(RecuError, match="--plain-sign has no clamp"):
        config_of("resnet20", "--data", "demo", "--plain-sign", "--tau-min", "0.9").validate()
    with pytest.raises(RecuError, match="--stage1-epochs"):
        config_of("resnet20", "--data", "demo", "--epochs", "2", "--stage1-epochs", "2").validate()


def test_run_config_json_reproduces_the_run_settings(capsys, tmp_path) -> None:
    """A run's config.json given back with --config (another -o/--experiment) trains with
    the same settings; old config.json files (conversion options as a dict) still load."""
    from tests.conftest import RESNET20_WEIGHTS, link_tree, require_shared

    data = link_tree(tmp_path / "data", {"train": 4, "val": 2})
    args = [
        "binarize", "resnet20", "--data", str(data), "--weights",
        str(require_shared(RESNET20_WEIGHTS)), "--epochs", "2", "--max-steps", "1", "-b", "8",
        "-j", "0", "--no-step0-eval", "--act", "identity", "--keep", "layer3.*",
        "--lr", "0.004", "--calib-images", "16", "--log-interval", "0", "--json",
    ]  # fmt: skip
    code, out, err = run_cli([*args, "-o", str(tmp_path / "a"), "--experiment", "one"], capsys)
    assert code == 0, err
    first = tmp_path / "a" / "one" / "config.json"
    code, out, err = run_cli(
        ["binarize", "--config", str(first), "-o", str(tmp_path / "b"), "--experiment", "two",
         "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    a = json.loads(first.read_text())["train"]
    b = json.loads((tmp_path / "b" / "two" / "config.json").read_text())["train"]
    assert (b["experiment"], b["output"]) == ("two", str(tmp_path / "b"))
    assert {**a, "experiment": "two", "output": str(tmp_path / "b")} == b
    assert json.loads(out)["config"] == b
    old = TrainConfig.from_dict({**a, "convert": dict(a["convert"]), "gone_setting": 1})
    assert old.convert.keep == ("layer3.*",) and old.convert.activation == "identity"


def test_tau_defaults_come_from_the_schedule_module() -> None:
    import inspect

    from recu_cli.commands.binarize import binarize

    assert (TrainConfig(model="m", data="d").tau_min, TrainConfig.tau_max) == (TAU_MIN, TAU_MAX)
    params = inspect.signature(binarize).parameters
    assert (params["tau_min"].default, params["tau_max"].default) == (TAU_MIN, TAU_MAX)


def test_every_binarize_command_in_the_docs_is_a_valid_run() -> None:
    """reproduce.md's paper schedules once ran on the default recipe, whose attention loss
    refuses their --teacher none: every `recu binarize MODEL ...` line of the README and
    docs/ (fenced, continuation lines joined; not --resume, not a synopsis) validates."""
    import re
    import shlex
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    checked = 0
    for path in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        for block in re.findall(r"```.*?```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0]  # a comment may say "as recu binarize runs"
                found = re.search(r"(?:^|\s)(?:recu|-m recu_cli) binarize (.*)", line)
                if not found or "--resume" in line or "MODEL" in line:
                    continue
                args = shlex.split(found.group(1))
                try:
                    config_of(*args).validate()
                except RecuError as e:
                    raise AssertionError(f"{path.name}: recu binarize {' '.join(args)}: {e}") from e
                checked += 1
    assert checked >= 15  # it reads them (README, usage, results, reproduce)
