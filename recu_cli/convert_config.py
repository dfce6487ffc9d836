"""`ConvertConfig`, the conversion recipe stored in every packed file. No torch, so reading
a packed file's metadata stays fast; the surgery itself is in `recu_cli.bnn`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from recu_cli.fields import FieldError
from recu_cli.setting import check_fields, declared, from_params, setting

ACTIVATIONS = ("hardtanh", "prelu", "identity")  # sign-friendly activations (blocks.py)
ALPHA_MODES = ("learned", "analytic")  # ReCUConv2d's alpha (binarize/layers.py)
THRESHOLD_MODES = ("zero", "learned", "median")
# JSON types a field's kind accepts in a packed file (bool is an int in Python: refused)
_JSON_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "float": (int, float), "bool": (bool,)}


CONVERSION = "Conversion (ReCU)"


@dataclass(frozen=True)
class ConvertConfig:
    """The conversion recipe: stored in every packed file, enough to rebuild the tree.

    Each field is declared once (recu_cli/setting.py says how to add one): `recu convert`'s
    flags, `recu binarize`'s conversion flags and `convert:` in config files read it."""

    keep: tuple[str, ...] = setting(
        (),
        "fnmatch pattern of layer names to keep full precision (repeatable), e.g. 'layer4.*'.",
        panel=CONVERSION,
    )
    activation: str = setting(
        "hardtanh",
        "Sign-friendly activation that replaces ReLU.",
        flags=("--act",),
        choices=ACTIVATIONS,
        panel=CONVERSION,
    )
    b_star: float = setting(
        2.0,
        "Laplace scale of the standardized weights (the paper's b*).",
        min=0.0,
        above=True,
        panel=CONVERSION,
    )
    tau: float = setting(
        1.0,
        "tau recorded in the layers (1 = no clamp).",
        min=0.5,
        above=True,
        max=1.0,
        panel=CONVERSION,
    )
    alpha_init: str = setting(
        "pretrained",
        "'pretrained' (mean |W - mean| per channel) or 'random' (reference U[0,1)).",
        choices=("pretrained", "random"),
        panel=CONVERSION,
    )
    alpha_mode: str = setting(
        "learned",
        "'learned' per-channel scale (authors' code) or 'analytic' E|ReCU(W)| (paper).",
        choices=ALPHA_MODES,
        panel=CONVERSION,
    )
    standardize: bool = setting(
        True,
        "Ablation: skip per-filter weight standardization.",
        flags=("--no-standardize",),
        off=(),
        panel=CONVERSION,
    )
    clamp: bool = setting(
        True,
        "Baseline: plain sign(W), no standardization and no ReCU clamp.",
        flags=("--plain-sign",),
        off=(("standardize", False),),
        panel=CONVERSION,
    )
    rescale_activations: bool = setting(
        True,
        "Per-sample A / std(A) before each sign in training (config files only).",
        cli=False,
    )
    bireal: bool = setting(
        True, "Rewrite ResNet blocks as Bi-Real blocks (config files only).", cli=False
    )
    # activation thresholds before each binary conv: "zero" (the paper: sign(x)), or a
    # learnable sign(x - beta) starting at 0 ("learned") or at the channel median ("median")
    act_threshold: str = setting(
        "zero",
        "Threshold before each sign: zero (paper: sign(x)), learned (from 0), median "
        "(learned, starting at each channel's median over --calib-images training images).",
        choices=THRESHOLD_MODES,
        panel=CONVERSION,
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep"] = list(self.keep)
        return d

    @classmethod
    def from_flags(cls, **params: Any) -> ConvertConfig:
        """The conversion that command flags ask for, by parameter name (act, b_star,
        no_standardize, plain_sign, ...; None = not given: the default)."""
        return cls(**from_params(cls, params))

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
    for name, decl in declared(ConvertConfig).items():
        if name not in d or name == "keep":
            continue
        v, types = d[name], _JSON_TYPES[decl.kind]
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            raise _bad(f"'{name}' has the wrong type")
        if isinstance(v, float) and not math.isfinite(v):
            raise _bad(f"'{name}' is not finite")
    keep = d.get("keep", [])
    if not (isinstance(keep, (list, tuple)) and all(isinstance(p, str) for p in keep)):
        raise _bad("'keep' is not a list of patterns")
