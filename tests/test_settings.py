"""One declaration per setting (recu_cli/setting.py): the flags of `recu binarize` and
`recu convert` are generated from TrainConfig's and ConvertConfig's fields, one check
serves every source (flags, config files, config.json on --resume, Python), and --resume
compares every flag, nested conversion ones included, with the run's own values."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import MISSING
from pathlib import Path
from typing import Any

import pytest

from recu_cli.convert_config import ConvertConfig
from recu_cli.recipes import LEVERS, RECIPES
from recu_cli.setting import by_param, declared
from recu_cli.training.config import TrainConfig
from tests.conftest import RESNET20_WEIGHTS, link_tree, require_shared
from tests.test_cli_models import assert_one_line_error, run_cli
from tests.test_config import config_of

DATA = Path(__file__).parent / "data"
# the flags of recu 0.1.0, before they were generated: none may change or go away
BINARIZE_FLAGS = {
    "--act", "--act-threshold", "--alpha-init", "--alpha-mode", "--amp", "--amp-dtype",
    "--b-star", "--batch-size", "--bn-recalib", "--calib-images", "--channels-last",
    "--checkpoint-interval", "--clip-grad", "--compile", "--config", "--data", "--data-path",
    "--deterministic",
    "--device", "--epochs", "--experiment", "--feature-kd", "--half", "--json", "--kd-weight",
    "--keep", "--keep-latent", "--log-interval", "--lr", "--max-steps", "--min-lr",
    "--momentum", "--no-standardize", "--no-step0-eval", "--num-classes", "--opt",
    "--other-lr-scale", "--other-weight-decay", "--output", "--plain-sign", "--pretrained",
    "--quiet", "--recipe", "--resume", "--seed", "--stage1-epochs", "--step0-eval",
    "--strict-data", "--tau-max", "--tau-min", "--tau-update", "--teacher",
    "--teacher-weights", "--warmup-epochs", "--warmup-lr", "--weight-decay", "--weights",
    "--workers", "-b", "-d", "-j", "-o", "-q", "-w",
}  # fmt: skip
CONVERT_FLAGS = {
    "--act", "--act-threshold", "--alpha-init", "--alpha-mode", "--b-star", "--batch-size",
    "--calib-images", "--data", "--dry-run", "--half", "--json", "--keep", "--keep-latent",
    "--no-standardize", "--num-classes", "--output", "--plain-sign", "--pretrained", "--tau",
    "--weights", "--workers", "-b", "-d", "-j", "-o", "-w",
}  # fmt: skip
COMMAND_ONLY = {"binarize": {"config", "resume", "json_out", "quiet"}}
# appended to bad input: if a check ever lets it through, the run is short, not 6 epochs
SHORT = ["--max-steps", "1", "--no-step0-eval", "-j", "0", "--calib-images", "8", "-b", "8"]


def command(name: str) -> Any:
    """The real click command Typer builds for `recu NAME`."""
    import typer

    from recu_cli.app import app
    from recu_cli.commands import register_all

    register_all()
    return typer.main.get_command(app).commands[name]


def flags_of(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


# ---------------------------------------------------------------- 1. one declaration


def test_flags_stay_as_they_were() -> None:
    added = {
        "--kd-temperature", "--binarize-penalty", "--binarize-ramp", "--switch-moments",
        "--stage2-lr-scale", "--stage2-short-cycles", "--ema-decay", "--ema-warmup-power",
        "--ema-memory", "--stage2-feature-kd-scale",
    }  # fmt: skip
    assert flags_of(command("binarize")) == BINARIZE_FLAGS | added
    assert flags_of(command("convert")) == CONVERT_FLAGS


def test_command_line_defaults_are_the_declared_defaults() -> None:
    """Every parameter of `recu binarize` is a declared setting (or one of the command's
    own four), and its default is the declaration's: None for a recipe lever (the recipe
    decides), the dataclass default otherwise."""
    table = by_param(TrainConfig)
    for param in command("binarize").params:
        if param.name in COMMAND_ONLY["binarize"] or param.name == "help":
            continue
        d = table[param.name]  # KeyError: a flag that is not a setting
        if d.key in LEVERS or d.default is MISSING:
            want = None
        elif d.setting.off is not None:
            want = False
        else:
            want = d.default
        got = param.default
        got = str(got) if isinstance(got, Path) else got
        got = tuple(got) if isinstance(got, list) else got
        assert got == (None if want == () else want), d.key
        assert param.help and len(param.help) > 12, d.key
    conversion = by_param(ConvertConfig)
    for param in command("convert").params:
        if param.name in conversion and param.name != "act_threshold":  # --data decides it
            d = conversion[param.name]
            want = False if d.setting.off is not None else (None if d.default == () else d.default)
            assert param.default == want, d.key


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_python_trainconfig_is_the_command_line_run(recipe: str) -> None:
    """TrainConfig(model, data) means what `recu binarize MODEL --data DATA` trains, for
    each recipe and another length (the finetune recipe's stage 1 is half of --epochs)."""
    args = ("resnet20", "--data", "demo", "--recipe", recipe, "--epochs", "9")
    cli = config_of(*args)
    assert cli == TrainConfig(model="resnet20", data="demo", recipe=recipe, epochs=9)
    assert config_of("resnet20", "--data", "demo") == TrainConfig(model="resnet20", data="demo")
    assert TrainConfig(model="m", data="d").recipe == "finetune"
    assert cli.recipe == recipe and cli.convert.tau == cli.tau_min


def test_every_recipe_sets_every_lever_and_levers_default_to_none() -> None:
    table = declared(TrainConfig)
    for name, levers in RECIPES.items():
        assert set(levers) == set(LEVERS), name
    for key in LEVERS:
        if "." not in key:
            assert table[key].default is None and table[key].optional, key
    paper = TrainConfig(model="m", data="d", recipe="paper", opt="sgd")
    assert paper.lr is None and paper.base_lr == 0.1  # the paper's lr by optimizer
    assert TrainConfig(model="m", data="d", recipe="paper").base_lr == 1e-3


def test_kd_temperature_has_a_flag() -> None:
    assert config_of("resnet20", "--data", "demo", "--kd-temperature", "4").kd_temperature == 4.0


# execution settings at their defaults; issue 27's switch levers at the recipe's (off), as
# those runs trained
ADDED_SINCE_0_1_0 = {
    "compile": "auto", "data_path": "auto", "binarize_penalty": 0.0, "binarize_ramp": 0.0,
    "switch_moments": "reset", "stage2_lr_scale": 1.0, "stage2_short_cycles": 0,
    "ema_decay": 0.0, "ema_warmup_power": 0.75, "ema_memory": "fixed",
    "stage2_feature_kd_scale": 1.0,
}  # fmt: skip


def fixture_config(name: str, data: Path, out: Path) -> dict[str, Any]:
    """tests/data/config-0.1.0-NAME.json: a config.json written by recu 0.1.0 (before the
    settings were declared once), its paths pointed at this machine's."""
    text = (DATA / f"config-0.1.0-{name}.json").read_text()
    for key, value in {"DATA": data, "WEIGHTS": RESNET20_WEIGHTS, "OUTPUT": out}.items():
        text = text.replace("{" + key + "}", str(value))
    return json.loads(text)


@pytest.mark.parametrize("name", ["finetune", "paper"])
def test_config_json_of_0_1_0_gives_the_same_settings(tmp_path, name: str) -> None:
    saved = fixture_config(name, tmp_path / "data", tmp_path / "out")
    (tmp_path / "data").mkdir()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    # settings added since 0.1.0 take their defaults (a --resume of such a run keeps the
    # PIL data path instead: run_folder.load_run_config, tested in test_fastdata.py)
    want = {**saved["train"], **ADDED_SINCE_0_1_0}
    assert config_of("--config", str(path)).to_dict() == want
    assert TrainConfig.from_dict(saved["train"]).to_dict() == want


def test_a_lever_added_later_keeps_what_older_runs_did(tmp_path) -> None:
    """--switch-moments came after runs that reset Adam's moments at the switch: their
    config.json (no key) resumes with 'reset'; a config file of the user's own, or a fresh
    run, takes the recipe's 'keep'."""
    assert TrainConfig(model="m", data="d").switch_moments == "keep"
    assert TrainConfig(model="m", data="d", recipe="paper").switch_moments == "reset"
    saved = fixture_config("finetune", tmp_path / "data", tmp_path / "out")
    assert "switch_moments" not in saved["train"]
    assert TrainConfig.from_dict(saved["train"]).switch_moments == "reset"
    (tmp_path / "data").mkdir()
    run_file = tmp_path / "config.json"
    run_file.write_text(json.dumps(saved))
    assert config_of("--config", str(run_file)).switch_moments == "reset"
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"model": "resnet20", "data": str(tmp_path / "data")}))
    assert config_of("--config", str(own)).switch_moments == "keep"


# ---------------------------------------------------------------- 2. --resume


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run of one step (resnet20, 20 linked CIFAR images) started from the 0.1.0
    config.json, then given that very file back: what a run folder of 0.1.0 holds."""
    require_shared(RESNET20_WEIGHTS)
    root = tmp_path_factory.mktemp("resume")
    data = link_tree(root / "data", {"train": 2, "val": 1})
    saved = fixture_config("finetune", data, root / "out")
    (root / "config.json").write_text(json.dumps(saved))
    code, _, err = run_cli(["binarize", "--config", str(root / "config.json"), "-q"], _NoCapture())
    assert code == 0, err
    run = root / "out" / "finetune"
    (run / "config.json").write_text(json.dumps(saved, indent=2))
    return run


class _NoCapture:
    """run_cli's capsys for a module fixture: the output is not needed."""

    def readouterr(self) -> tuple[str, str]:
        return "", ""


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def own_values(cfg: TrainConfig) -> list[str]:
    """Every flag of `recu binarize` that can state the run's value, stating it."""
    table, args = by_param(TrainConfig), []
    for param in command("binarize").params:
        d = table.get(param.name)
        if d is None or d.setting.argument or d.key == "data":  # MODEL, --data: refused
            continue
        value = cfg
        for part in d.key.split("."):
            value = getattr(value, part)
        if d.setting.off is not None:
            if not value:  # the run has it off: the switch says so
                args.append(d.flag)
        elif d.kind == "bool":
            names = [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
            args += [names[0]] if value else [n for n in names[1:]]
        elif d.kind == "list":
            args += [x for v in value for x in (d.flag, v)]
        elif value is not None:
            args += [d.flag, str(value)]
    return args


def test_resume_accepts_every_flag_with_the_run_s_own_value(finished_run, capsys) -> None:
    cfg = TrainConfig.from_dict(json.loads((finished_run / "config.json").read_text())["train"])
    args = own_values(cfg)
    for flag in ("--keep", "--act", "--b-star", "--act-threshold", "--alpha-mode", "--lr"):
        assert flag in args
    before = snapshot(finished_run)
    code, _, err = run_cli(["binarize", "--resume", str(finished_run), *args], capsys)
    assert_one_line_error(code, err, "has finished")  # accepted: nothing left to train
    assert snapshot(finished_run) == before


CHANGED = {
    "keep": ["--keep", "layer2.*"],
    "act": ["--act", "identity"],
    "b_star": ["--b-star", "3"],
    "alpha_init": ["--alpha-init", "random"],
    "alpha_mode": ["--alpha-mode", "analytic"],
    "no_standardize": ["--no-standardize"],
    "plain_sign": ["--plain-sign"],
    "act_threshold": ["--act-threshold", "zero"],
    "kd_temperature": ["--kd-temperature", "2"],
    "recipe": ["--recipe", "paper"],
    "stage1_epochs": ["--stage1-epochs", "0"],
    "warmup_epochs": ["--warmup-epochs", "0.5"],
    "output": ["-o", "elsewhere"],
}


def test_changed_values_cover_every_conversion_flag() -> None:
    binarize = {p.name for p in command("binarize").params}
    assert {p for p in by_param(ConvertConfig) if p in binarize} <= set(CHANGED)


@pytest.mark.parametrize("param", sorted(CHANGED))
def test_resume_refuses_a_changed_flag_naming_it(finished_run, capsys, param: str) -> None:
    before = snapshot(finished_run)
    code, _, err = run_cli(["binarize", "--resume", str(finished_run), *CHANGED[param]], capsys)
    assert_one_line_error(code, err, by_param(TrainConfig)[param].flag, "would change")
    assert snapshot(finished_run) == before


def test_resume_checks_the_run_s_config_json(finished_run, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    saved = json.loads((run / "config.json").read_text())
    saved["train"]["epochs"] = "abc"
    (run / "config.json").write_text(json.dumps(saved))
    before = snapshot(run)
    code, _, err = run_cli(["binarize", "--resume", str(run)], capsys)
    assert_one_line_error(code, err, "--epochs must be a whole number", str(run / "config.json"))
    assert snapshot(run) == before


# ---------------------------------------------------------------- 3. one check, every source

BAD_FILES = [
    ("clip_grad: -1", "--clip-grad must be >= 0, got -1"),
    ("weight_decay: -1", "--weight-decay must be >= 0"),
    ("epochs: 2.5", "--epochs must be a whole number, got 2.5"),
    ("epochs: true", "--epochs must be a whole number"),
    ("half: 'yes'", "--half must be true or false"),
    ("momentum: .nan", "--momentum must be a finite number"),
    ("kd_temperature: 0", "--kd-temperature must be > 0"),
    ("min_lr: 1e9", "--min-lr 1e+09 is above the peak learning rate"),
    ("warmup_epochs: 1e300", "--warmup-epochs 1e+300 is longer than"),
    ("log_interval: -1", "--log-interval must be >= 0"),
    ("epochs: abc", "--epochs must be a whole number, got 'abc'"),
    ("epochs: 1e12", "--epochs must be a whole number, got '1e12'"),  # YAML 1.1: a string
    ("lr: [1, 2]", "--lr must be a number"),
    ("seed: 1e30", "--seed must be a whole number"),
    ("device: meta", "--device must be cpu, cuda or cuda:N, got 'meta'"),
    ("recipe: fast", "--recipe must be one of finetune, paper"),
    ("convert: {activation: relu}", "--act must be one of hardtanh, prelu, identity"),
    ("convert: {b_star: -2}", "--b-star must be > 0"),
    ("convert: {keep: 5}", "--keep must be a list"),
    ("checkpoint_interval: soon", "--checkpoint-interval"),
    ("model: null", "MODEL needs a value"),
]


@pytest.mark.parametrize(("line", "fragment"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_yaml_value_is_one_line_naming_the_flag(tmp_path, capsys, line, fragment) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text(f"model: resnet20\ndata: demo\n{line}\n")
    args = ["binarize", "--config", str(path), "-o", str(tmp_path / "o"), *SHORT]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, fragment)
    if "must be" in fragment:
        assert str(path) in err  # the file is named
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"model": "resnet20", "data": "demo", "epochs": NaN}', "--epochs must be a whole"),
        ('{"model": "resnet20", "data": "demo", "seed": 1e30}', "--seed must be in [0, "),
        ('{"model": "resnet20", "data": "demo", "momentum": Infinity}', "--momentum must be"),
        (bytes(range(256)) * 4, "not UTF-8 text"),
    ],
    ids=["nan", "seed", "inf", "binary"],
)
def test_bad_json_or_binary_file_is_one_line(tmp_path, capsys, content, fragment) -> None:
    path = tmp_path / "run.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = ["binarize", "--config", str(path), "-o", str(tmp_path / "o"), *SHORT]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, fragment, str(path))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--seed", "100000000000000000000000"], "--seed must be in [0, 4294967295]"),
        (["--min-lr", "1e9"], "--min-lr"),
        (["--warmup-epochs", "1e300"], "--warmup-epochs"),
        (["--kd-temperature", "0"], "--kd-temperature must be > 0"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--device", "meta"], "--device must be"),
        (["--momentum", "1"], "--momentum must be in [0, 1)"),
        (["--opt", "sgd", "--momentum", "0"], "--momentum above 0"),
    ],
)
def test_bad_flag_value_is_one_line(tmp_path, capsys, extra, fragment) -> None:
    args = ["binarize", "resnet20", "--data", "demo", "-o", str(tmp_path / "o"), *SHORT]
    code, _, err = run_cli([*args, *extra], capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_python_callers_get_the_same_checks() -> None:
    from recu_cli.errors import RecuError

    with pytest.raises(RecuError, match="--clip-grad must be >= 0, got -1"):
        TrainConfig(model="m", data="d", clip_grad=-1)
    with pytest.raises(RecuError, match="--act must be one of"):
        TrainConfig(model="m", data="d", convert={"activation": "relu"})
    with pytest.raises(RecuError, match="--min-lr"):
        TrainConfig(model="m", data="d", min_lr=1.0).validate()
    assert TrainConfig(model="m", data="d", lr="1e-3").lr == 1e-3  # YAML 1.1's text form
