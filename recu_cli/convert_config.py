"""`ConvertConfig`, the conversion recipe stored in every packed file. No torch, so reading
a packed file's metadata stays fast; the surgery itself is in `recu_cli.convert`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from recu_cli.errors import RecuError
from recu_cli.fields import FieldError

ACTIVATIONS = ("hardtanh", "prelu", "identity")  # sign-friendly activations (blocks.py)
ALPHA_MODES = ("learned", "analytic")  # ReCUConv2d's alpha (binarize/layers.py)
THRESHOLD_MODES = ("zero", "learned", "median")
# JSON types a field's annotation accepts (bool is an int in Python, refused for numbers)
_JSON_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "float": (int, float), "bool": (bool,)}


@dataclass(frozen=True)
class ConvertConfig:
    """The conversion recipe: stored in every packed file, enough to rebuild the tree."""

    keep: tuple[str, ...] = ()
    activation: str = "hardtanh"
    b_star: float = 2.0
    tau: float = 1.0
    alpha_init: str = "pretrained"
    alpha_mode: str = "learned"
    standardize: bool = True
    clamp: bool = True
    rescale_activations: bool = True
    bireal: bool = True
    # activation thresholds before each binary conv: "zero" (the paper: sign(x)), or a
    # learnable sign(x - beta) starting at 0 ("learned") or at the channel median ("median")
    act_threshold: str = "zero"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise RecuError(f"--act must be one of {', '.join(ACTIVATIONS)}")
        if self.alpha_init not in ("pretrained", "random"):
            raise RecuError("--alpha-init must be 'pretrained' or 'random'")
        if self.alpha_mode not in ALPHA_MODES:
            raise RecuError(f"--alpha-mode must be one of {', '.join(ALPHA_MODES)}")
        if self.act_threshold not in THRESHOLD_MODES:
            raise RecuError(f"--act-threshold must be one of {', '.join(THRESHOLD_MODES)}")
        if not self.b_star > 0:
            raise RecuError(f"--b-star must be positive, got {self.b_star}")
        if not 0.5 < self.tau <= 1.0:
            raise RecuError(f"tau must be in (0.5, 1], got {self.tau}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep"] = list(self.keep)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ConvertConfig:
        """Check every field against its annotation; missing fields take their defaults
        (version-1 files have no act_threshold), unknown ones are refused."""
        _check(d)
        d = dict(d)
        d["keep"] = tuple(str(p) for p in d.get("keep", ()))
        return cls(**d)

    def layer_kwargs(self) -> dict[str, Any]:
        return {
            "b_star": self.b_star,
            "tau": self.tau,
            "standardize": self.standardize,
            "clamp": self.clamp,
            "alpha_mode": self.alpha_mode,
            "rescale_activations": self.rescale_activations,
            "act_threshold": self.act_threshold != "zero",
        }


def _bad(what: str) -> FieldError:
    return FieldError(f"recipe: {what}", what)


def _check(d: Any) -> None:
    if not isinstance(d, dict):
        raise _bad("not a JSON object")
    known = {f.name for f in fields(ConvertConfig)}
    unknown = set(d) - known
    if unknown:
        raise FieldError(
            f"unknown conversion option(s) {sorted(unknown)} in the recipe",
            "unknown option",
            sorted(str(k)[:40] for k in unknown),
        )
    for f in fields(ConvertConfig):
        if f.name not in d or f.name == "keep":
            continue
        v, types = d[f.name], _JSON_TYPES[str(f.type)]
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            raise _bad(f"'{f.name}' has the wrong type")
        if isinstance(v, float) and not math.isfinite(v):
            raise _bad(f"'{f.name}' is not finite")
    keep = d.get("keep", [])
    if not (isinstance(keep, (list, tuple)) and all(isinstance(p, str) for p in keep)):
        raise _bad("'keep' is not a list of patterns")


# command parameter -> ConvertConfig field, where the flag's name is not the field's
OPTION_ALIASES = {"act": "activation"}


def convert_options(params: dict[str, Any]) -> dict[str, Any]:
    """ConvertConfig fields named by command parameters (None: not set); the ablation
    switches --no-standardize and --plain-sign turn parts of ReCU's weight path off."""
    names = set(ConvertConfig.__dataclass_fields__)
    out = {}
    for key, value in params.items():
        name = OPTION_ALIASES.get(key, key)
        if name in names and value is not None:
            out[name] = tuple(value) if name == "keep" else value
    if params.get("no_standardize") or params.get("plain_sign"):
        out["standardize"] = False
    if params.get("plain_sign"):
        out["clamp"] = False
    return out
