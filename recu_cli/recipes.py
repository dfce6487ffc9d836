"""Training recipes by name: a recipe gives the value of each recipe lever the user did not.

A lever is a setting whose declared default is None, "the recipe's value" (TrainConfig's
lr, stage1_epochs, kd_temperature, feature_kd, other_lr_scale, bn_recalib, ...; the
conversion's activation and act_threshold). Every recipe sets every lever (tests check
it), so a run never falls back to a value nobody chose. Where a value comes from, lowest
first: the declared default (recu_cli/setting.py), the recipe, a --config file, the flags
given.

`paper` is the authors' single-stage recipe exactly. `finetune` (the default, for
`recu binarize` and for a TrainConfig built in Python alike) is what measured best for a
short fine-tune of a pretrained network (docs/results.md has the runs): learnable
thresholds calibrated to the channel medians, PReLU, two stages (binary activations on
real weights first, then ReCU's binary weights, Adam's moments carried across the switch,
stage 2's first epoch a cosine of its own so that the first binary checkpoint is settled),
distillation from the original network (soft labels at temperature 2, attention maps
weighed half as much once the weights are binary),
a larger learning rate for everything that is not a latent binary weight, and a moving
average of the weights, validated and packed, whose memory follows the learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recu_cli.errors import RecuError


@dataclass(frozen=True)
class EpochShare:
    """A lever that depends on the run's length: this share of --epochs, rounded down."""

    share: float

    def of(self, epochs: int) -> int:
        return int(epochs * self.share)

    def __str__(self) -> str:
        return "half of --epochs" if self.share == 0.5 else f"{self.share:g} x --epochs"


# The paper's peak learning rate by optimizer: what `lr` None means (TrainConfig.base_lr).
PAPER_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}

# lever key (as in config files: "convert.activation") -> value
RECIPES: dict[str, dict[str, Any]] = {
    "finetune": {
        "lr": 8e-3,  # issue 27: 2e-3 -> 4e-3 (+1.9 on all images), -> 8e-3 (+0.7 more)
        "stage1_epochs": EpochShare(0.5),
        "binarize_penalty": 0.0,
        "binarize_ramp": 0.0,
        "switch_moments": "keep",  # "reset" before issue 27: half the drop, same end
        "stage2_lr_scale": 1.0,
        "stage2_short_cycles": 1,  # issue 27, twelfth round: stage 2's first epoch anneals,
        # so the checkpoint after it keeps stage 1's accuracy (drop 3.8 / 7.2 -> 1.0 / 0.6)
        "ema_decay": 0.999,  # issue 27, eighth round: validate and pack a moving average
        "ema_memory": "lr",  # whose memory follows the rate: the switch drop 9.7-13.3 ->
        # 1.5-2.7, and where the cosine ends it is the last step's weights (the same end)
        "kd_temperature": 2.0,  # issue 27, third round: 1 -> 2 (soft labels of a teacher
        # that saw these images are nearly one-hot at T = 1)
        "feature_kd": 6.0,  # issue 27, eleventh round: the attention loss 3 -> 6 in stage 1
        "stage2_feature_kd_scale": 0.5,  # and 3 in stage 2 (Real-to-Binary's light weight
        # once the weights are binary): 72 % on seeds 42-45 (71.86 on seed 43 before)
        "other_lr_scale": 3.0,
        "bn_recalib": 0,
        "convert.activation": "prelu",
        "convert.act_threshold": "median",
    },
    "paper": {
        "lr": None,  # PAPER_LR by --opt
        "stage1_epochs": 0,
        "binarize_penalty": 0.0,
        "binarize_ramp": 0.0,
        "switch_moments": "reset",
        "stage2_lr_scale": 1.0,  # one stage: no stage 2 of its own
        "stage2_short_cycles": 0,
        "ema_decay": 0.0,
        "ema_memory": "fixed",
        "kd_temperature": 1.0,
        "feature_kd": 0.0,
        "stage2_feature_kd_scale": 1.0,  # one stage: no stage 2 of its own
        "other_lr_scale": 1.0,
        "bn_recalib": 0,
        "convert.activation": "hardtanh",
        "convert.act_threshold": "zero",
    },
}
DEFAULT_RECIPE = "finetune"
LEVERS = tuple(RECIPES[DEFAULT_RECIPE])

RECIPE_HELP = (
    "Recipes (flags you give override them): 'finetune' (default), for a short fine-tune "
    "of a pretrained model: median-calibrated learnable thresholds, PReLU, two stages (real "
    "weights behind binary activations for half the epochs, then ReCU's binary weights, "
    "Adam's moments kept across, stage 2's first epoch annealed on its own), distillation "
    "from the original (soft labels at temperature 2, attention maps weighed half as much "
    "in stage 2), a moving average of the weights validated and packed (its memory "
    "following the learning rate). 'paper': the authors' single-stage recipe exactly (ReCU "
    "from step 0, hardtanh, sign(x), logit distillation only)."
)


def lever_values(name: str, epochs: int) -> dict[str, Any]:
    """The levers of recipe `name` for a run of `epochs`, by key ('convert.activation')."""
    if name not in RECIPES:
        raise RecuError(f"--recipe must be one of {', '.join(RECIPES)}, got '{name}'")
    return {
        key: value.of(epochs) if isinstance(value, EpochShare) else value
        for key, value in RECIPES[name].items()
    }


def recipe_settings(name: str, epochs: int) -> dict[str, Any]:
    """The settings of a recipe for a run of `epochs`: TrainConfig fields, plus 'convert'
    for ConvertConfig's, plus 'recipe'."""
    settings: dict[str, Any] = {"convert": {}, "recipe": name}
    for key, value in lever_values(name, epochs).items():
        if key.startswith("convert."):
            settings["convert"][key.split(".", 1)[1]] = value
        else:
            settings[key] = value
    return settings


def describe(key: str) -> str:
    """A lever's value in each recipe, for --help: 'finetune: 0.002; paper: 0'."""

    def shown(value: Any) -> str:
        if value is None and key == "lr":
            by_opt = {}
            for opt, lr in PAPER_LR.items():
                by_opt.setdefault(lr, []).append(opt)
            return ", ".join(f"{lr:g} for {'/'.join(opts)}" for lr, opts in by_opt.items())
        return f"{value:g}" if isinstance(value, float) else str(value)

    return "; ".join(f"{name}: {shown(levers[key])}" for name, levers in RECIPES.items())
