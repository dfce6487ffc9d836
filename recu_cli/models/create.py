"""Building a full-precision model by name, with weights from a local file or the hub,
and the `ModelSpec` that records how to rebuild and feed it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from recu_cli.errors import RecuError
from recu_cli.models.names import is_known, parse_name, timm_registry, unknown_model
from recu_cli.models.surgery import classifier_name, set_submodule
from recu_cli.models.weight_files import load_weights, read_state_dict
from recu_cli.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

if TYPE_CHECKING:
    from torch import nn

# torch, timm and torchvision are imported where a model is built, not here.


def create_model(
    name: str,
    num_classes: int | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Build the full-precision model; weights from a local file or (online) the hub."""
    if not is_known(name):
        raise unknown_model(name)
    source, arch = parse_name(name)
    if pretrained and weights:
        raise RecuError("give either --pretrained or --weights FILE, not both")
    if source == "torchvision":
        model = _create_torchvision(arch, num_classes, pretrained)
    else:
        model = _create_timm(arch, num_classes, pretrained)
    spec = _spec(model, arch, source)
    if weights:
        load_weights(model, read_state_dict(weights), spec, drop_mismatched_head=num_classes)
    return model, spec


def _create_timm(arch: str, num_classes: int | None, pretrained: bool) -> nn.Module:
    timm = timm_registry()
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if pretrained and timm.get_pretrained_cfg(arch.split(".")[0]) is not None:
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is not None and not (cfg.url or cfg.hf_hub_id or cfg.file):
            raise RecuError(f"'{arch}' has no downloadable pretrained weights; pass --weights FILE")
    if pretrained:
        _use_cache_only_when_offline("huggingface.co")
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except RecuError:
        raise
    except Exception as e:  # noqa: BLE001 - hub failures come in many types
        if pretrained:
            raise _hub_error(arch, e) from e
        raise


def _create_torchvision(arch: str, num_classes: int | None, pretrained: bool) -> nn.Module:
    import torchvision

    try:
        if pretrained:
            model = torchvision.models.get_model(arch, weights="DEFAULT")
            if num_classes is not None:
                _reset_tv_head(model, num_classes)
            return model
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    except Exception as e:  # noqa: BLE001
        if pretrained:
            raise _hub_error(f"tv:{arch}", e) from e
        raise


def _use_cache_only_when_offline(host: str) -> None:
    """Without DNS, tell huggingface_hub to use its cache only: it fails in milliseconds
    instead of retrying for a minute, and a cached download still works."""
    import socket

    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = True
        except ImportError:
            pass


def _hub_error(name: str, e: Exception) -> RecuError:
    reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    return RecuError(
        f"could not download pretrained weights for {name} ({reason}); if you are offline, "
        "pass a local checkpoint with --weights FILE",
        exit_code=1,
    )


def _reset_tv_head(model: nn.Module, num_classes: int) -> None:
    from torch import nn

    head_name = classifier_name(model)
    head = model.get_submodule(head_name)
    if isinstance(head, nn.Linear) and head.out_features != num_classes:
        set_submodule(model, head_name, nn.Linear(head.in_features, num_classes))


def reset_head(model: nn.Module, spec: ModelSpec, num_classes: int) -> ModelSpec:
    """A fresh classifier for another class count (fine-tuning on a new dataset)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
    else:
        _reset_tv_head(model, num_classes)
    return dataclasses.replace(spec, num_classes=num_classes)


def _spec(model: nn.Module, arch: str, source: str) -> ModelSpec:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    head = model.get_submodule(classifier_name(model)) if classifier_name(model) else None
    num_classes = getattr(model, "num_classes", None) or getattr(head, "out_features", 0)
    return ModelSpec(
        name=arch,
        source=source,
        num_classes=int(num_classes),
        input_size=tuple(cfg.get("input_size", (3, 224, 224))),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )


def spec_for(model: nn.Module, name: str) -> ModelSpec:
    source, arch = parse_name(name)
    return _spec(model, arch, source)
