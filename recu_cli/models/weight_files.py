"""Reading a weights file (.safetensors, or .pth/.th/.pt through torch.load with
weights_only=True: never unpickling code) and loading it into a model strictly."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from recu_cli.errors import RecuError, few
from recu_cli.models.surgery import classifier_name
from recu_cli.spec import ModelSpec

if TYPE_CHECKING:
    import torch
    from torch import nn


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
