"""--ema-decay: validate and pack a moving average of the weights, not the last step's.

A binary weight is the sign of its latent weight, so the latent weights near zero flip at
every step with the gradient noise; the last step's signs carry that noise into the
checkpoint. An exponential moving average of everything the model holds (latent weights,
alphas, thresholds, BatchNorm statistics) keeps the signs the recent steps agree on.

The average starts again at each stage: at the switch the network's function changes
(real weights behind binary activations, then binary weights), and an average across it
would blend two different networks. Within a stage, update k (1-based) moves the average
toward the live weights with the decay

    d_k = min(D, 1 - k ** -P)      (d_1 = 0: the first update copies the live weights)

timm's ModelEmaV3 warm-up (`use_warmup`, `warmup_power` P): P = 1 is the plain mean of the
stage's weights so far until it reaches D, a smaller P a shorter memory early on. D is
--ema-decay, P --ema-warmup-power.

tau and the weight blend are the schedule's, not learned: the average takes them from the
live model when it is validated or packed (`synced`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recu_cli.bnn import binary_layers, set_tau
from recu_cli.training.switch import set_weight_mix


class WeightAverage:
    """The moving average of a model, and how many updates it has had in this stage."""

    def __init__(self, model: nn.Module, decay: float, warmup_power: float) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=warmup_power)
        for module in self.ema.module.modules():  # a deep copy keeps forward hooks: those
            module._forward_hooks.clear()  # of the feature taps would see its validation
        self.ema.module.requires_grad_(False)
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def decay_at(self, update: int) -> float:
        """d_k of update k (1-based) of the stage."""
        return self.ema.get_decay(update)

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """A new stage: the average is the live model, and the next update copies it again."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """After an optimizer step (device work only: no host sync)."""
        self.updates += 1
        self.ema.update(model, step=self.updates)

    def synced(self, live: nn.Module) -> nn.Module:
        """The average with the live model's tau and weight blend: the model to validate
        and pack."""
        layers = binary_layers(live)
        if layers:
            set_tau(self.module, float(layers[0][1].tau))
            set_weight_mix(self.module, layers[0][1]._weight_mix)
        return self.module

    def state_dict(self) -> dict[str, Any]:
        """For resume.pt: the averaged tensors and the update count of the stage."""
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.module.load_state_dict(saved["model"])
        self.updates = int(saved["updates"])
