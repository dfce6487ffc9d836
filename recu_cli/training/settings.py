"""`recu binarize`'s arguments -> TrainConfig, by field name.

A setting is a parameter of the command and a field of TrainConfig (or ConvertConfig)
of the same name; nothing else lists it. Where a value comes from, lowest first: the
dataclass default, the command's own default (None = no default of its own), the recipe,
a --config file, and the flags given on the command line.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from recu_cli.convert_config import ConvertConfig, convert_options
from recu_cli.errors import RecuError
from recu_cli.recipes import recipe_settings
from recu_cli.training.config import TrainConfig, check_tau_range, read_config_file

PATH_FIELDS = ("weights", "teacher_weights", "output")


def build_config(params: dict[str, Any], given: set[str], config_file: Path | None) -> TrainConfig:
    """The run's TrainConfig from the command's parameters (`given`: those typed on the
    command line), the recipe and the config file."""
    names = {f.name for f in fields(TrainConfig)} - {"convert"}
    file = read_config_file(config_file) if config_file is not None else {}
    file_convert = file.pop("convert", {})
    cli = {k: v for k, v in params.items() if k in given}
    defaults = {k: v for k, v in params.items() if k not in given and v is not None}

    def pick(name: str) -> Any:
        return cli.get(name, file.get(name, defaults.get(name)))

    if pick("model") is None or pick("data") is None:
        raise RecuError("give MODEL and --data DIR (or --resume RUN_DIR)")
    tau_min, tau_max = (pick(k) for k in ("tau_min", "tau_max"))
    check_tau_range(tau_min, tau_max)  # before the conversion config checks tau
    recipe = recipe_settings(pick("recipe"), pick("epochs"))
    recipe_convert = recipe.pop("convert")
    merged = {
        **{k: v for k, v in defaults.items() if k in names},
        **recipe,
        **file,
        **{k: v for k, v in cli.items() if k in names},
    }
    convert = {
        **convert_options({k: v for k, v in params.items() if k not in given}),
        **recipe_convert,
        **file_convert,
        **convert_options(cli),
        "tau": tau_min,
    }
    _normalise_paths(merged)
    return TrainConfig(**merged, convert=ConvertConfig.from_dict(convert))


def _normalise_paths(settings: dict[str, Any]) -> None:
    """Paths are stored absolute, so `--resume` and `--config RUN/config.json` work from
    any working directory; the demo binarizes the shipped pretrained network."""
    untrained = settings.get("weights") is None and not settings.get("pretrained")
    if settings["data"] == "demo" and settings["model"] == "resnet20" and untrained:
        from recu_cli.demo import DEMO_WEIGHTS

        settings["weights"] = DEMO_WEIGHTS
    data = Path(str(settings["data"])).expanduser()
    settings["data"] = str(data.resolve()) if data.exists() else str(settings["data"])
    for key in PATH_FIELDS:
        if settings.get(key) is not None:
            settings[key] = str(Path(settings[key]).resolve())
