"""Options shared by several commands, declared once so their names and help agree, and
the flags of settings: Typer parameters generated from the declarations of TrainConfig and
ConvertConfig (recu_cli/setting.py), so a setting is never listed here."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from dataclasses import MISSING
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from recu_cli.setting import Declared, check_value, declared, plain_value

Json = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


FpLayers = Annotated[
    str,
    typer.Option(
        "--fp-layers",
        help="How the runtime runs the full-precision layers (stem, 1x1 shortcuts, classifier): "
        "'exact' (float32, outputs identical to the float model) or 'int8' (oneDNN, calibrated "
        "on real images: faster, not exact; see docs/performance.md).",
    ),
]


def setting_parameters(
    cls: type,
    *,
    only: Collection[str] = (),
    skip: Collection[str] = (),
    levers: Collection[str] = (),
    describe: Callable[[str], str] | None = None,
    defaults: dict[str, Any] | None = None,
    notes: dict[str, str] | None = None,
    panels: bool = True,
) -> list[inspect.Parameter]:
    """The Typer parameters of `cls`'s settings that have a flag (keys in `only`, if
    given; not in `skip`), in declaration order. A lever's flag has no default of its own
    (None: the recipe's, described by `describe(key)`); `defaults` and `notes` adjust one
    command's view of a setting; `panels=False` leaves --help's grouping to the command."""
    defaults, notes = defaults or {}, notes or {}
    out = []
    for d in declared(cls).values():
        if not d.setting.cli or d.key in skip or (only and d.key not in only):
            continue
        default = defaults.get(d.key, None if d.default is MISSING else d.default)
        text = d.setting.help
        if d.key in levers:
            default = None
            text += f" (recipe {describe(d.key)})" if describe else " (from the recipe)"
        if d.setting.off is not None:
            default = False  # a switch: given or not
        if d.kind == "list":
            default = None if not default else list(default)
        text += notes.get(d.key, "")
        info = _typer_info(d, text, d.setting.panel if panels else "")
        out.append(
            inspect.Parameter(
                d.param,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[_python_type(d, default), info],
            )
        )
    return out


def setting_option(cls: type, key: str) -> Any:
    """One setting's flag as an annotation for a command's own parameter
    (`weights: Weights = None`), for commands that share the flag but not the setting."""
    [param] = setting_parameters(cls, only=(key,), panels=False)
    return param.annotation


def with_settings(*groups: list[inspect.Parameter], last: Collection[str] = ()) -> Callable:
    """Give a command the flags of settings (lists from `setting_parameters`): the
    function takes them as `**settings`; its own parameters come first, those named in
    `last` after the settings."""

    def wrap(f: Callable) -> Callable:
        sig = inspect.signature(f, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        params = [
            *(p for p in own if p.name not in last),
            *(p for group in groups for p in group),
            *(p for p in own if p.name in last),
        ]
        f.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return f

    return wrap


def _python_type(d: Declared, default: Any) -> Any:
    tp: Any = {"bool": bool, "int": int, "float": float, "str": str, "list": list[str]}[d.kind]
    if d.setting.path:
        tp = Path
    if d.kind != "bool" and default is None:
        tp = Optional[tp]  # noqa: UP045 - a runtime type for Typer
    return tp


def _typer_info(d: Declared, text: str, panel: str) -> Any:
    if d.setting.argument:
        return typer.Argument(help=text, show_default=False, callback=_checker(d))
    return typer.Option(
        *d.flags,
        help=text,
        metavar=_metavar(d),
        rich_help_panel=panel or None,
        callback=_checker(d),
    )


def _checker(d: Declared) -> Callable[[Any], Any]:
    """The declaration's check of a typed flag, as the flag is parsed: a command that
    hands the value on without a settings dataclass (eval's --num-classes) checks it too."""

    def check(value: Any) -> Any:
        if value is not None and d.setting.off is None:  # a switch is a bool already
            check_value(d, plain_value(value))
        return value

    return check


def _metavar(d: Declared) -> str | None:
    """What the value looks like in --help: its choices, or its kind and bounds."""
    s = d.setting
    if d.kind == "bool":
        return None
    if s.choices:
        return "|".join(s.choices)
    if d.kind not in ("int", "float") or (s.min is None and s.max is None):
        return None

    def num(x: float) -> str:
        return str(int(x)) if d.kind == "int" else f"{x:g}"

    lo = "" if s.min is None else f"{num(s.min)}{'<' if s.above else '<='}"
    hi = "" if s.max is None else f"{'<' if s.below else '<='}{num(s.max)}"
    if not hi:  # x>=1 reads better than 1<=x
        lo = f"{'>' if s.above else '>='}{num(s.min)}"
        return f"<{d.kind}> [x{lo}]"
    return f"<{d.kind}> [{lo}x{hi}]"
