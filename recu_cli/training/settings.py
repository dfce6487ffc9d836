"""`recu binarize`'s arguments -> TrainConfig.

A setting is declared once, as a field of TrainConfig or ConvertConfig
(recu_cli/setting.py); its flag is generated from that declaration, so the command's
parameters map back onto fields through it. Where a value comes from, lowest first: the
declared default, the recipe (for the levers it sets), a --config file, and the flags given
on the command line. Each value is checked by its declaration, whatever its source; the
TrainConfig itself resolves the recipe and makes paths absolute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recu_cli.errors import RecuError
from recu_cli.setting import from_params
from recu_cli.training.config import TrainConfig, read_config_file


def build_config(params: dict[str, Any], given: set[str], config_file: Path | None) -> TrainConfig:
    """The run's TrainConfig from the command's parameters (`given`: those typed on the
    command line; the others are left to the recipe and the declared defaults) and the
    config file."""
    file = read_config_file(config_file) if config_file is not None else {}
    flags = from_params(TrainConfig, {k: v for k, v in params.items() if k in given})
    convert = {**file.pop("convert", {}), **flags.pop("convert", {})}
    merged = {**file, **flags}
    if merged.get("model") is None or merged.get("data") is None:
        raise RecuError("give MODEL and --data DIR (or --resume RUN_DIR)")
    cfg = TrainConfig(**merged, convert=convert)
    cfg.validate()
    return cfg
