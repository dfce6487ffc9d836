"""One declaration per setting: a dataclass field of `TrainConfig` or `ConvertConfig` with
its default, help, choices, bounds and --resume rule, read by everything else.

`recu binarize`'s and `recu convert`'s flags and their --help (commands/options.py), config
files and config.json (training/config.py), the checks of every value from every source
(here: `check_value`), the recipes' levers (recipes.py) and what `--resume` accepts
(training/resume_rules.py) all read these declarations; nothing else lists a setting.
Plain Python (no torch, no Typer): `recu binarize --help` reads it at start-up.

How to add a setting (one place):

1. Add a field to `TrainConfig` (training/config.py), or to `ConvertConfig`
   (convert_config.py) when it belongs to the conversion stored in packed files (a new
   key there: docs/format.md)::

       compile: str = setting("auto", "Compile the model: auto, on or off.",
                              choices=("auto", "on", "off"), resume=EXECUTION)

   The flag is `--compile` (the field name with `-`; `flags=` for another name, a short
   form or a `--x/--no-x` switch); the type comes from the annotation (bool, int, float,
   str, tuple[str, ...]; `| None` when None is a value, say what None means in the help).
   Bounds (`min`, `max`, `above`/`below` for open ends), `choices`, `pattern` or `check`
   are enforced for the flag, a --config file, config.json on --resume and Python callers
   alike, with the flag's name in the one-line error. `resume=`: FIXED (default: --resume
   refuses a changed value), EXECUTION (may change: it does not change the result), LONGER
   (may grow). `path=True` stores a path absolute. `panel=` groups it in --help. Rarer:
   `off=` for a switch that turns a bool off (--plain-sign), `cli=False` for config files
   only, `auto=` for values resolved when a run starts (--amp-dtype auto).
2. Read it where the run needs it (`cfg.compile`). The flag, --help, config files,
   config.json, the checks and the resume rule need nothing more: `recu binarize` shows
   every TrainConfig and ConvertConfig setting, `recu convert` every ConvertConfig one
   (`skip=` in a command's `setting_parameters` leaves one out).
3. A recipe lever: give the field the default None (= "the recipe's value") and its value
   in every recipe of `recipes.RECIPES` (tests check that each recipe sets each lever).
4. A rule that ties several settings together goes into `TrainConfig.validate()`.
5. Say it in docs/usage.md. tests/test_settings.py then checks the new flag against the
   declaration (and refuses a flag that is not a declared setting).
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from functools import cache
from typing import Any

from recu_cli.errors import RecuError

FIXED, EXECUTION, LONGER = "fixed", "execution", "longer"  # what --resume may do with it
INT64_MAX = 2**63 - 1  # every int setting ends up in torch or numpy somewhere


@dataclass(frozen=True)
class Setting:
    """What a field declares besides its default and type (see the module docstring)."""

    help: str
    flags: tuple[str, ...] = ()  # as typed: ("--batch-size", "-b"); () = ("--field-name",)
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    above: bool = False  # min itself is refused
    below: bool = False  # max itself is refused
    pattern: str = ""  # a regular expression the whole text must match ...
    shape: str = ""  # ... and its wording: "--device must be {shape}"
    check: Callable[[Any], object] | None = None  # raises RecuError naming the flag
    resume: str = FIXED
    path: bool = False  # stored absolute (--resume and --config work from any folder)
    argument: bool = False  # a positional argument (MODEL), not an option
    cli: bool = True  # False: config files only (no flag)
    off: tuple[tuple[str, Any], ...] | None = None  # flag turns this bool off (and sets these)
    auto: tuple[str, ...] = ()  # resolved when a run starts: --resume accepts them repeated
    panel: str = ""  # --help group


def setting(default: Any = MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field declared as a setting (no default: the field is required)."""
    return field(default=default, metadata={"setting": Setting(help, **kw)})


@dataclass(frozen=True)
class Declared:
    """One setting as the rest of recu sees it: its key, type and declaration."""

    key: str  # config-file key: "clip_grad", or "convert.activation" for a nested field
    kind: str  # bool, int, float, str or list
    optional: bool  # None is a value
    default: Any  # MISSING: required
    setting: Setting

    @property
    def name(self) -> str:
        return self.key.rsplit(".", 1)[-1]

    @property
    def flags(self) -> tuple[str, ...]:
        return self.setting.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def flag(self) -> str:
        """The long flag: '--batch-size', '--act', '--no-standardize', '--step0-eval'."""
        if self.setting.argument:
            return self.name.upper()
        return self.flags[0].split("/")[0]

    @property
    def param(self) -> str:
        """The command's parameter name: the long flag in Python (act, no_standardize)."""
        return self.flag.lstrip("-").replace("-", "_").lower()

    @property
    def label(self) -> str:
        """How errors name it: the flag that sets it, else its key."""
        if self.setting.off is not None or not self.setting.cli:
            return self.key
        return self.flag

    def from_flag(self, value: Any) -> dict[str, Any]:
        """The fields a flag's value sets: {key: value}; {} when an off-switch is not given."""
        if self.setting.off is None:
            return {self.key: value}
        if not value:
            return {}
        prefix = self.key.rsplit(".", 1)[0] + "." if "." in self.key else ""
        return {self.key: False, **{prefix + k: v for k, v in self.setting.off}}


@cache
def declared(cls: type) -> dict[str, Declared]:
    """Every setting of a settings dataclass by key, nested dataclasses expanded in place
    ('convert.activation'), in field order."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Declared] = {}
    for f in fields(cls):
        kind, optional = _kind(hints[f.name])
        if kind == "nested":
            for key, d in declared(_nested(hints[f.name])).items():
                out[f"{f.name}.{key}"] = replace(d, key=f"{f.name}.{key}")
            continue
        if "setting" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no setting() declaration")
        out[f.name] = Declared(f.name, kind, optional, f.default, f.metadata["setting"])
    return out


@cache
def nested_fields(cls: type) -> dict[str, type]:
    """Fields that hold another settings dataclass: {'convert': ConvertConfig}."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: _nested(hints[f.name]) for f in fields(cls) if _kind(hints[f.name])[0] == "nested"
    }


@cache
def by_param(cls: type) -> dict[str, Declared]:
    """The settings that have a flag, by the command parameter's name."""
    out: dict[str, Declared] = {}
    for d in declared(cls).values():
        if d.setting.cli:
            if d.param in out:
                raise TypeError(f"{d.key} and {out[d.param].key} have the same flag {d.flag}")
            out[d.param] = d
    return out


def _kind(tp: Any) -> tuple[str, bool]:
    args = typing.get_args(tp)
    optional = type(None) in args
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else tp
    if is_dataclass(tp) or any(is_dataclass(a) for a in typing.get_args(tp)):
        return "nested", optional
    if typing.get_origin(tp) in (tuple, list):
        return "list", optional
    kinds = {bool: "bool", int: "int", float: "float", str: "str"}
    if tp not in kinds:
        raise TypeError(f"a setting cannot have the type {tp}")
    return kinds[tp], optional


def _nested(tp: Any) -> type:
    return next(a for a in (tp, *typing.get_args(tp)) if is_dataclass(a))


# ---------------------------------------------------------------- checks


def check_value(d: Declared, value: Any, source: str = "") -> Any:
    """`value` as the setting holds it, or one RecuError naming the flag (and the source,
    e.g. 'config file run.yaml'). Type, then bounds, choices, pattern, check."""

    def bad(what: str) -> RecuError:
        return RecuError(f"{d.label} {what}, got {_shown(value)}{_where(d, source)}")

    if value is None:
        if d.optional:
            return None
        raise bad("needs a value")
    value = _typed(d, value, bad)
    s = d.setting
    if d.kind in ("int", "float"):
        explicit = s.max is not None
        top = s.max if explicit else (INT64_MAX if d.kind == "int" else None)
        low_ok = s.min is None or (value > s.min if s.above else value >= s.min)
        high_ok = top is None or (value < top if s.below else value <= top)
        if not low_ok or (not high_ok and explicit):
            raise bad(f"must be {_bounds(d)}")
        if not high_ok:
            raise bad(f"must be at most {top}")
    if s.choices and value not in s.choices:
        raise bad(f"must be one of {', '.join(s.choices)}")
    if s.pattern and not re.fullmatch(s.pattern, value):
        raise bad(f"must be {s.shape}")
    if s.check is not None:
        try:
            s.check(value)
        except RecuError as e:
            raise RecuError(f"{e}{_where(d, source)}", e.exit_code) from None
    return value


def _typed(d: Declared, value: Any, bad: Callable[[str], RecuError]) -> Any:
    """JSON/YAML/flag values in the field's type; only lossless conversions."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if d.kind == "bool":
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if d.kind == "int":
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)  # JSON's 2.0
        if not (number and isinstance(value, int)):
            raise bad("must be a whole number")
        return value
    if d.kind == "float":
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                raise bad("must be a number") from None
        elif not number:
            raise bad("must be a number")
        if not math.isfinite(value):
            raise bad("must be a finite number")
        return float(value)
    if d.kind == "str":
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # YAML's `checkpoint_interval: 500`
        if not isinstance(value, str):
            raise bad("must be text")
        return value
    if isinstance(value, str):  # list: `keep: layer4.*` is one pattern
        value = [value]
    if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
        raise bad("must be a list of texts")
    return tuple(value)


def _bounds(d: Declared) -> str:
    s = d.setting

    def num(x: float) -> str:
        return str(int(x)) if d.kind == "int" else f"{x:g}"

    if s.min is not None and s.max is not None:
        return f"in {'(' if s.above else '['}{num(s.min)}, {num(s.max)}{')' if s.below else ']'}"
    if s.min is not None:
        return f"{'>' if s.above else '>='} {num(s.min)}"
    return f"{'<' if s.below else '<='} {num(s.max)}"


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, (str, list, tuple, dict)) else str(value)
    if isinstance(value, float):
        text = f"{value:g}"
    return text if len(text) <= 40 else text[:37] + "..."


def _where(d: Declared, source: str) -> str:
    """' ('clip_grad' in config file run.yaml)': the key as the file spells it."""
    return f" ('{d.key}' in {source})" if source else ""


def check_fields(obj: Any, source: str = "") -> None:
    """Check (and normalise, e.g. a list to a tuple) every setting of a dataclass instance
    in place; nested settings dataclasses check themselves."""
    for d in declared(type(obj)).values():
        if "." in d.key:
            continue
        value = check_value(d, getattr(obj, d.key), source)
        object.__setattr__(obj, d.key, value)  # frozen ConvertConfig too


def check_mapping(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """A config file's or config.json's settings, checked: flat keys, nested ones under
    their field's name ('convert': {...}); '-' or '_' in names; unknown keys refused."""
    table, nested = declared(cls), nested_fields(cls)
    out: dict[str, Any] = {}
    for raw, value in values.items():
        key = str(raw).replace("-", "_")
        if key in nested:
            if not isinstance(value, dict):
                raise RecuError(f"'{key}' in {source} must be a mapping of option: value")
            out[key] = {}
            for sub_raw, sub_value in value.items():
                sub = f"{key}.{str(sub_raw).replace('-', '_')}"
                if sub not in table:
                    raise RecuError(f"unknown setting '{sub}' in {source}")
                out[key][sub.split(".", 1)[1]] = check_value(table[sub], sub_value, source)
        elif key in table:
            out[key] = check_value(table[key], value, source)
        else:
            raise RecuError(f"unknown setting '{key}' in {source}")
    return out


def from_params(cls: type, params: dict[str, Any], source: str = "") -> dict[str, Any]:
    """The settings a command's flag values set (None: not given), checked, nested under
    their field's name: {'epochs': 4, 'convert': {'activation': 'prelu'}}."""
    table, flags = declared(cls), by_param(cls)
    out: dict[str, Any] = {}
    for param, value in params.items():
        if param not in flags or value is None:
            continue
        for key, v in flags[param].from_flag(plain_value(value)).items():
            checked = check_value(table[key], v, source)
            if "." in key:
                head, tail = key.split(".", 1)
                out.setdefault(head, {})[tail] = checked
            else:
                out[key] = checked
    return out


def plain_value(value: Any) -> Any:
    """Typer's values as config files hold them: a Path as text, a list as a tuple."""
    if hasattr(value, "__fspath__"):
        return str(value)
    if isinstance(value, list):
        return tuple(value)
    return value
