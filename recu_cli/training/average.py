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

With --ema-memory lr the memory 1 / (1 - d) also shrinks with the learning rate: update k
keeps

    keep_k = max(0, 1 - (1 - d_k) / r_k)     r_k = lr_k / the stage's peak lr  (optim.lr_share)

of the average. While the rate is high the average smooths the noisy signs; as a cosine
reaches zero the average becomes the last step's weights, which are settled there (issue
27: a fixed memory gained at the switch and lost at the end of the cosine).

tau and the weight blend are the schedule's, not learned: the average takes them from the
live model when it is validated or packed (`synced`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from recu_cli.bnn import binary_layers, set_tau
from recu_cli.training.switch import set_weight_mix

if TYPE_CHECKING:
    from recu_cli.training.config import TrainConfig


def average_for(model: nn.Module, cfg: TrainConfig) -> WeightAverage | None:
    """The run's average as its settings declare it (--ema-decay 0: none); the benches
    build theirs here too, so they time the recipe's own."""
    if not cfg.ema_decay:
        return None
    return WeightAverage(model, cfg.ema_decay, cfg.ema_warmup_power, cfg.ema_memory == "lr")


class WeightAverage:
    """The moving average of a model, and how many updates it has had in this stage."""

    def __init__(
        self, model: nn.Module, decay: float, warmup_power: float, follow_lr: bool = False
    ) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=warmup_power)
        for module in self.ema.module.modules():  # a deep copy keeps forward hooks: those
            module._forward_hooks.clear()  # of the feature taps would see its validation
        self.ema.module.requires_grad_(False)
        self.follow_lr = follow_lr
        self.updates = 0
        self._pairs: tuple[list[torch.Tensor], ...] | None = None

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def decay_at(self, update: int) -> float:
        """d_k of update k (1-based) of the stage."""
        return self.ema.get_decay(update)

    def keep_at(self, update: int, lr_share: float = 1.0) -> float:
        """The share of the average that update k keeps: d_k, or with --ema-memory lr
        max(0, 1 - (1 - d_k) / r_k)."""
        decay = self.decay_at(update)
        if not self.follow_lr:
            return decay
        if lr_share <= 0:
            return 0.0
        return max(0.0, 1.0 - (1.0 - decay) / lr_share)

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """A new stage: the average is the live model, and the next update copies it again."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module, lr_share: float = 1.0) -> None:
        """After an optimizer step, with that step's lr_share (optim.lr_share): device work
        only, no host sync; a few foreach kernels, not one per tensor."""
        self.updates += 1
        keep = self.keep_at(self.updates, lr_share)
        averaged, live, counts, live_counts = self._tensor_pairs(model)
        if averaged:
            torch._foreach_lerp_(averaged, live, 1.0 - keep)  # weight 1 (keep 0): live exactly
        if counts:
            torch._foreach_copy_(counts, live_counts)  # BatchNorm's num_batches_tracked

    def _tensor_pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], ...]:
        """The averaged and live tensors side by side, found once: parameters and buffers
        change in place (optimizer, load_state_dict, set_tau), so these views stay true, and a
        step does not rebuild two state_dicts."""
        if self._pairs is None:
            mine = self.module.state_dict()  # detached views of the parameters and
            theirs = model.state_dict()  # buffers: the same storage, as timm updates
            floats = [k for k, v in mine.items() if v.is_floating_point()]
            others = [k for k, v in mine.items() if not v.is_floating_point()]
            self._pairs = (
                [mine[k] for k in floats], [theirs[k] for k in floats],
                [mine[k] for k in others], [theirs[k] for k in others],
            )  # fmt: skip
        return self._pairs

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
