"""Training recipes by name: a recipe fills in every setting the user did not give.

`paper` is the authors' single-stage recipe exactly (recu's TrainConfig and ConvertConfig
defaults). `finetune` is what measured best for a short fine-tune of a pretrained network
(docs/results.md has the runs): learnable thresholds calibrated to the channel medians,
PReLU, two stages (binary activations on real weights first, then ReCU's binary weights),
attention-map distillation from the original network, and a larger learning rate for
everything that is not a latent binary weight.
"""

from __future__ import annotations

from typing import Any

from recu_cli.errors import RecuError

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "finetune": {
        "lr": 2e-3,
        "stage1_share": 0.5,  # stage 1 = this share of --epochs, rounded down
        "feature_kd": 3.0,
        "other_lr_scale": 3.0,
        "bn_recalib": 0,
        "convert": {"activation": "prelu", "act_threshold": "median"},
    },
}
DEFAULT_RECIPE = "finetune"

RECIPE_HELP = (
    "Recipes (flags you give override them): 'finetune' (default), for a short fine-tune "
    "of a pretrained model: median-calibrated learnable thresholds, PReLU, two stages (real "
    "weights behind binary activations for half the epochs, then ReCU's binary weights), "
    "attention distillation from the original. 'paper': the authors' single-stage recipe "
    "exactly (ReCU from step 0, hardtanh, sign(x), logit distillation only)."
)


def recipe_settings(name: str, epochs: int) -> dict[str, Any]:
    """The settings of a recipe for a run of `epochs`: TrainConfig fields, plus 'convert'
    for ConvertConfig."""
    if name not in RECIPES:
        from recu_cli.errors import few

        raise RecuError(f"unknown --recipe '{name}'; choose one of {few(list(RECIPES), 5)}")
    settings = {k: v for k, v in RECIPES[name].items() if k not in ("convert", "stage1_share")}
    if "stage1_share" in RECIPES[name]:
        settings["stage1_epochs"] = int(epochs * RECIPES[name]["stage1_share"])
    settings["convert"] = dict(RECIPES[name].get("convert", {}))
    settings["recipe"] = name
    return settings
