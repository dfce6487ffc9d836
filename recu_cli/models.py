"""Build a full-precision model by name (timm, torchvision, recu's own zoo) and load weights.

Names: `resnet18` or `timm:resnet18` (timm, which also holds recu's CIFAR models
resnet20/32/44/56 and vgg_small), `tv:resnet18` or `torchvision:resnet18` (torchvision).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from recu_cli.errors import RecuError
from recu_cli.spec import ModelSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch, timm and torchvision are imported where a model is built, not here: ModelSpec and
# the name helpers serve the CLI's start-up and the torch-free file reader.

TV_PREFIXES = ("tv:", "torchvision:")
TIMM_PREFIX = "timm:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_name(name: str) -> tuple[str, str]:
    """'tv:resnet18' -> ('torchvision', 'resnet18'); 'resnet18' -> ('timm', 'resnet18')."""
    for p in TV_PREFIXES:
        if name.startswith(p):
            return "torchvision", name[len(p) :]
    if name.startswith(TIMM_PREFIX):
        return "timm", name[len(TIMM_PREFIX) :]
    return "timm", name


def _timm():
    """timm, with recu's CIFAR models registered in it (importing the zoo registers them)."""
    import timm

    from recu_cli import zoo  # noqa: F401 - registration

    return timm


def known_models() -> list[str]:
    import torchvision

    from recu_cli import zoo

    timm = _timm()
    return sorted(set(timm.list_models()) | set(zoo.RECU_MODELS)) + [
        f"tv:{n}" for n in torchvision.models.list_models()
    ]


def _unknown(name: str) -> RecuError:
    close = difflib.get_close_matches(name, known_models(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
    return RecuError(f"unknown model '{name}'{hint}")


def is_known(name: str) -> bool:
    source, arch = parse_name(name)
    if source == "torchvision":
        import torchvision

        return arch in torchvision.models.list_models()
    return _timm().is_model(arch)


def create_model(
    name: str,
    num_classes: int | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Build the full-precision model; weights from a local file or (online) the hub."""
    if not is_known(name):
        raise _unknown(name)
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
    timm = _timm()
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


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted name (model surgery)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the final classifier (timm's cfg, else the last Linear)."""
    from torch import nn

    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    if isinstance(name, str):
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            pass
    last = ""
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = n
    return last


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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors, or .pth/.th/.pt through torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise RecuError(f"weights file not found: {path}; check the path")
    if path.stat().st_size == 0:
        raise RecuError(f"weights file {path} is empty; point --weights at a real checkpoint")
    if _looks_like_safetensors(path):
        obj = _read_safetensors(path)
    else:
        import torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load fails in many types on junk
            raise _unreadable_weights(path, e) from e
    return _unwrap(obj, path)


def _unreadable_weights(path: Path, e: Exception) -> RecuError:
    """Why torch.load(weights_only=True) refused a file, in one line with what to do:
    a pickle holding Python objects (refused, never executed) or simply not a checkpoint."""
    text = str(e)
    with open(path, "rb") as f:
        head = f.read(4)
    pickled = head[:1] == b"\x80" or head == b"PK\x03\x04"
    if "Unsupported global" in text or (pickled and isinstance(e, pickle.UnpicklingError)):
        return RecuError(
            f"{path} contains Python objects besides tensors, refused for safety (recu loads "
            "with weights_only=True and never runs code from a file); where you trust it, "
            "re-save it as plain tensors: "
            "torch.save(model.state_dict(), 'weights.pth') or safetensors"
        )
    if head == b"PK\x03\x04":
        return RecuError(
            f"{path} is a damaged PyTorch checkpoint (its zip archive is incomplete); "
            "download or copy it again"
        )
    return RecuError(
        f"{path} is not a PyTorch or safetensors checkpoint; check the --weights path "
        "(recu reads .safetensors and torch.save files of tensors)"
    )


def _looks_like_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == "recu-packed":
            raise RecuError(
                f"{path} is a recu packed checkpoint, not full-precision weights; use it "
                "directly (recu eval/analyze/info FILE)"
            )
        return load_file(str(path))
    except SafetensorError as e:
        raise RecuError(f"{path} is not a valid safetensors file ({e}); re-download it") from e


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict):
            for key in ("state_dict", "model", "model_state_dict", "module"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict):
        raise RecuError(f"{path} does not hold a state_dict (found {type(obj).__name__})")
    import torch

    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        raise RecuError(f"{path} holds no tensors; is it a model checkpoint?")
    out = {}
    for k, v in tensors.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def load_weights(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    spec: ModelSpec,
    drop_mismatched_head: int | None = None,
) -> list[str]:
    """Load `state` strictly; a classifier of another size is dropped when the user asked
    for a different number of classes. Returns the keys that were left at their init."""
    own = model.state_dict()
    head = classifier_name(model)
    dropped: list[str] = []
    if drop_mismatched_head is not None and head:
        for key in (f"{head}.weight", f"{head}.bias"):
            if key in state and key in own and state[key].shape != own[key].shape:
                state = {k: v for k, v in state.items() if k != key}
                dropped.append(key)
    missing = [
        k
        for k in own
        if k not in state and k not in dropped and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if wrong:
        detail = ", ".join(
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3]
        )
        problems.append(f"{len(wrong)} with another shape ({detail})")
    if problems:
        raise RecuError(
            f"weights do not fit {spec.full_name}: "
            + "; ".join(problems)
            + "; are they from another architecture or class count? (--num-classes)"
        )
    merged = dict(own)
    merged.update(state)
    model.load_state_dict(merged, strict=True)
    return dropped


def few(keys: list[str], n: int = 3) -> str:
    """The first n names and an ellipsis: error lines stay one line."""
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
