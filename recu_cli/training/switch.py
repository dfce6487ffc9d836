"""How stage 1 hands the network to stage 2 without a fall (the two-stage recipe's switch).

At the switch the conv weights change from stage 1's real W0 to alpha * sign(W2): at once,
the network loses most of what stage 1 taught it (docs/results.md, "the stage switch").
Two schedules of the step soften that, each a recipe lever:

- `--binarize-penalty L`: in stage 1, the loss gains L * s * mean over the binary layers of
  sign_gap(W0) (binarize/weights.py: the share of each channel's weight energy that
  alpha * sign(W0) would lose), s rising linearly from 0 to 1 over stage 1, so the latent
  weights are shaped toward +-alpha while the task loss still has the time to adapt.
- `--binarize-ramp R`: in the first R epochs of stage 2 the weights are the blend
  (1 - m) W0 + m alpha sign(W2) (ReCUConv2d.mixed_weight), m rising linearly from 1/n to 1
  over those n = R * steps-per-epoch steps, instead of m = 1 from the first step.

Both depend on the step's position within its stage only, so a resumed run recomputes
them exactly; R is at most one epoch, so every epoch of stage 2 ends on binary weights
(what is validated is what is packed).
"""

from __future__ import annotations

import torch
from torch import nn

from recu_cli.binarize.weights import centred, sign_gap
from recu_cli.bnn import binary_layers
from recu_cli.training.device_scalar import DeviceScalar


def ramp_mix(step_in_stage: int, ramp_steps: int) -> float:
    """The weight blend m of stage 2's step `step_in_stage` (0-based): (k + 1) / n, then 1."""
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step_in_stage + 1) / ramp_steps)


def penalty_share(step_in_stage: int, stage_steps: int) -> float:
    """s of stage 1's step `step_in_stage` (0-based): (k + 1) / (stage's steps), at most 1."""
    return min(1.0, (step_in_stage + 1) / max(1, stage_steps))


def model_sign_gap(model: nn.Module) -> torch.Tensor:
    """sign_gap of every binary layer's W0, averaged over the layers (a 0-dim tensor)."""
    gaps = [sign_gap(centred(layer.weight)) for _, layer in binary_layers(model)]
    return torch.stack(gaps).mean()


def set_weight_mix(model: nn.Module, mix: float) -> None:
    """Every binary layer's blend m (filled in place only where it changes: a compiled
    or captured step reads the same buffers)."""
    for _, layer in binary_layers(model):
        if layer._weight_mix != mix:
            layer.set_weight_mix(mix)


class SignPenalty:
    """Stage 1's penalty weight L * s, a device scalar (training/device_scalar.py): a
    compiled or captured step reads it as s grows, without a recompile, and the eager step
    skips the term where it is 0 (all of stage 2)."""

    def __init__(self, weight: float, device: torch.device) -> None:
        self.weight = float(weight)
        self.scale = DeviceScalar(0.0, device)

    def set_share(self, share: float) -> None:
        self.scale.set(self.weight * share)

    def term(self, model: nn.Module) -> torch.Tensor | None:
        """L * s * mean sign_gap, or None where it is 0 in an eager step."""
        if self.scale.value == 0.0 and not torch.compiler.is_compiling():
            return None
        return self.scale.tensor * model_sign_gap(model)
