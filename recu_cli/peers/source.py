"""The two models a peer comparison needs: the float original (for the peers) and the BNN.

Peers run the model a user would deploy instead of recu's BNN: the same architecture at full
precision. From a model name that is the model before conversion. From a packed file it is
rebuilt from the file's model spec, with every full-precision tensor the file holds (stem,
downsample convs, BatchNorms, classifier; the binary layers' latent weights if it kept them);
the rest stays random, which does not change timings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from recu_cli.spec import ModelSpec
from recu_cli.targets import Target, load_target


@dataclass
class Models:
    float_model: nn.Module  # full precision, eval mode: what the peers run
    deploy: nn.Module  # the BNN's float deploy form: what recu's engines run
    spec: ModelSpec  # input size (after --img-size) and normalisation, for calibration
    name: str
    weights_note: str  # where the float original's weights come from


def _copy_matching(dst: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Copy the tensors whose name and shape exist in dst; (copied, dst's total)."""
    own = dst.state_dict()
    hits = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    with torch.no_grad():
        for k, v in hits.items():
            own[k].copy_(v.to(own[k].dtype))
    return len(hits), len(own)


def _float_from_file(target: Target) -> tuple[nn.Module, str]:
    """The float original of a packed file: its spec's model with every tensor the file
    holds that fits (full-precision layers, and the latent weights if kept)."""
    from recu_cli.models.create import create_model
    from recu_cli.pack import latent_layers

    packed, spec = target.packed, target.spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = create_model(spec.full_name, num_classes=spec.num_classes)
    tensors = dict(target.model.state_dict())
    if packed.has_latent:
        for name, layer in latent_layers(packed).items():
            tensors[f"{name}.weight"] = layer.weight.detach()
    copied, total = _copy_matching(model, tensors)
    note = (
        f"float {spec.full_name} rebuilt from the file's spec: {copied} of {total} tensors from "
        "the file (its full-precision layers"
        + (" and latent weights" if packed.has_latent else "")
        + "), the rest random (timing does not depend on weights)"
    )
    return model.eval(), note


def load_models(target: str, img_size: int | None = None) -> Models:
    """Float original and BNN deploy form of a packed checkpoint or a model name."""
    loaded = load_target(target, keep_original=True)
    if loaded.packed is not None:
        float_model, note = _float_from_file(loaded)
    else:
        float_model = loaded.original
        note = (
            "random weights for both the float original and the BNN (timing does not depend "
            "on them)"
        )
    models = Models(float_model, loaded.model, loaded.spec, loaded.name, note)
    if img_size is not None:
        c = models.spec.input_size[0]
        models.spec = dataclasses.replace(models.spec, input_size=(c, img_size, img_size))
    return models
