"""Options shared by several commands, declared once so their names and help agree."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from recu_cli.convert_config import ConvertConfig


Weights = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        "-w",
        help="Local weights: .safetensors, or .pth/.th/.pt (loaded with weights_only=True).",
    ),
]
Pretrained = Annotated[
    bool,
    typer.Option(
        "--pretrained", help="Download the model's pretrained weights from the hub (online)."
    ),
]
NumClasses = Annotated[
    int | None,
    typer.Option(
        "--num-classes", min=1, help="Classifier size (default: the model's or the data's)."
    ),
]
Keep = Annotated[
    list[str] | None,
    typer.Option(
        "--keep",
        help="fnmatch pattern of layer names to keep full precision (repeatable), e.g. 'layer4.*'.",
    ),
]
Activation = Annotated[
    str | None,
    typer.Option(
        "--act",
        help="Sign-friendly activation that replaces ReLU: hardtanh, prelu or identity "
        "(default: hardtanh; binarize takes its recipe's).",
    ),
]
BStar = Annotated[
    float, typer.Option("--b-star", help="Laplace scale of the standardized weights (paper: 2).")
]
AlphaInit = Annotated[
    str,
    typer.Option(
        "--alpha-init",
        help="'pretrained' (mean |W - mean| per channel) or 'random' (reference U[0,1)).",
    ),
]
AlphaMode = Annotated[
    str,
    typer.Option(
        "--alpha-mode",
        help="'learned' per-channel scale (authors' code) or 'analytic' E|ReCU(W)| (paper).",
    ),
]
NoStandardize = Annotated[
    bool, typer.Option("--no-standardize", help="Ablation: skip per-filter weight standardization.")
]
PlainSign = Annotated[
    bool,
    typer.Option(
        "--plain-sign", help="Baseline: plain sign(W), no standardization and no ReCU clamp."
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def convert_config(
    keep: list[str] | None,
    act: str | None,
    b_star: float,
    alpha_init: str,
    alpha_mode: str = "learned",
    no_standardize: bool = False,
    plain_sign: bool = False,
    tau: float = 1.0,
    act_threshold: str = "zero",
) -> ConvertConfig:
    """The conversion config of a command's conversion flags (their names: convert.py)."""
    params = {**locals(), "act": act or None}
    from recu_cli.convert_config import ConvertConfig, convert_options

    return ConvertConfig(**convert_options(params))


FpLayers = Annotated[
    str,
    typer.Option(
        "--fp-layers",
        help="How the runtime runs the full-precision layers (stem, 1x1 shortcuts, classifier): "
        "'exact' (float32, outputs identical to the float model) or 'int8' (oneDNN, calibrated "
        "on real images: faster, not exact; see docs/performance.md).",
    ),
]
