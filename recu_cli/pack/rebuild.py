"""Tensors of a packed file, the module tree its recipe builds, and the deploy model
rebuilt from it (docs/format.md section 5)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recu_cli.binarize.layers import ReCUConv2d
from recu_cli.bnn import binary_layers, convert_model, to_deploy
from recu_cli.convert_config import ConvertConfig
from recu_cli.errors import RecuError, few
from recu_cli.models.create import create_model
from recu_cli.module_facts import module_facts
from recu_cli.pack import schema as s
from recu_cli.pack.bits import unpack_signs
from recu_cli.pack.header import damaged
from recu_cli.pack.packed_file import PackedFile, parse, verify_checksum
from recu_cli.spec import ModelSpec


def build_tree(
    spec: ModelSpec, recipe: ConvertConfig, device: torch.device | str, path: Path
) -> nn.Module:
    """create_model (no weights) -> convert_model(recipe): the training-form tree that a
    file at `path` with this spec and recipe holds (named in errors)."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        try:
            model, _ = create_model(spec.full_name, num_classes=spec.num_classes)
            model, _ = convert_model(model, recipe)
        except RecuError as e:
            raise RecuError(f"{path}: cannot rebuild the model from its recipe: {e}") from e
        except Exception as e:  # noqa: BLE001 - a hostile spec can fail anywhere in a builder
            raise RecuError(
                f"{path}: cannot rebuild {spec.full_name} from its recipe "
                f"({type(e).__name__}: {str(e)[:120]}); the file is damaged or from another "
                "library version"
            ) from e
    return model


def skeleton(packed: PackedFile) -> nn.Module:
    """The training-form module tree on the meta device: shapes only, free to build."""
    return build_tree(packed.spec, packed.recipe, "meta", packed.path)


def module_records(
    model: nn.Module, input_size: tuple[int, ...], tensor_names: Iterable[str]
) -> list[dict[str, Any]]:
    """Metadata 'modules' of a file holding `tensor_names` for the training-form `model`:
    every module that owns a tensor, in module order (docs/format.md section 4.2)."""
    owners = {s.owner(name) for name in tensor_names}
    binary = {name for name, _ in binary_layers(model)}
    return [
        s.ModuleRecord(
            name=name,
            type=s.BINARY_TYPE if name in binary else fact.type,
            output=list(fact.output) if fact.output is not None else None,
            macs=fact.macs if fact.output is not None else None,
        ).to_dict()
        for name, fact in module_facts(model, input_size).items()
        if name in owners
    ]


def expected_tensors(
    model: nn.Module, latent: bool = False
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (kind 'bits'|'float'|'int', shape) that a packed file of `model` holds;
    latent weights (storage.latent) come last."""
    owners = dict(binary_layers(model))
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, m in owners.items():
        bits = (m.weight.shape[0], s.bytes_per_row(math.prod(m.weight.shape[1:])))
        roles = s.layer_roles(
            bias=m.bias is not None, threshold=m.act_threshold is not None, latent=False
        )
        for role in roles:  # every role but BITS is the attribute it stores
            kind_shape = ("bits", bits) if role == s.BITS else ("float", _shape(m, role))
            out[s.tensor_name(name, role)] = kind_shape
    for key, value in model.state_dict().items():
        if s.owner(key) not in owners:
            out[key] = ("float" if value.is_floating_point() else "int", tuple(value.shape))
    if latent:
        for name, m in owners.items():
            out[s.tensor_name(name, s.LATENT)] = ("float", _shape(m, s.LATENT))
    return out


def _shape(layer: nn.Module, attr: str) -> tuple[int, ...]:
    return tuple(getattr(layer, attr).shape)


def check_against_recipe(packed: PackedFile, model: nn.Module) -> None:
    """Every tensor of the file has the name, kind and shape the recipe's model needs."""
    path = packed.path
    layers = binary_layers(model)
    names = [n for n, _ in layers]
    listed = [e["name"] for e in packed.layers]
    if listed != names:
        raise RecuError(
            f"{path}: metadata lists {len(listed)} binary layers but the recipe "
            f"builds {len(names)}; the file was edited or damaged, write it again"
        )
    for entry, (name, m) in zip(packed.layers, layers, strict=True):
        built = {
            "shape": list(m.weight.shape),
            "stride": list(m.stride),
            "padding": list(m.padding),
            "dilation": list(m.dilation),
            "groups": int(m.groups),
            "bias": m.bias is not None,
            "alpha_mode": m.alpha_mode,
        }
        for key, value in built.items():
            if entry[key] != value:
                raise RecuError(
                    f"{path}: layer '{name}' has {key} {entry[key]} in the metadata but the "
                    f"recipe builds {value}; the file was edited or damaged, write it again"
                )
    want = expected_tensors(model, latent=packed.has_latent)
    have = packed.tensors
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {few(missing)}")
        if extra:
            parts.append(f"unexpected {few(extra)}")
        raise RecuError(
            f"{path} does not fit the model its recipe builds ({'; '.join(parts)}); "
            "the file was edited or damaged, write it again"
        )
    for key, info in have.items():
        kind, shape = want[key]
        if info.shape != shape or info.dtype not in s.KIND_DTYPES[kind]:
            raise RecuError(
                f"{path}: tensor '{key}' is {info.dtype} {list(info.shape)} but the recipe "
                f"needs {list(shape)} ({kind}); the file was edited or damaged, write it again"
            )


def read_tensors(packed: PackedFile, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of the file by name (all when names is None), on the CPU."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(packed.path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in (names if names is not None else f.keys())}
    except (SafetensorError, OSError) as e:
        raise damaged(packed.path, str(e)[:120]) from e


def _layer_tensors(packed: PackedFile, role: str) -> dict[str, torch.Tensor]:
    """layer name -> its `role` tensor, for every binary layer."""
    names = {e["name"]: s.tensor_name(e["name"], role) for e in packed.layers}
    raw = read_tensors(packed, list(names.values()))
    return {layer: raw[key] for layer, key in names.items()}


def read_signs(packed: PackedFile) -> dict[str, torch.Tensor]:
    """Unpacked +-1 weights (float32, OIHW) of every binary layer, by layer name."""
    raw = _layer_tensors(packed, s.BITS)
    out = {}
    for e in packed.layers:
        try:
            out[e["name"]] = unpack_signs(raw[e["name"]], e["shape"])
        except ValueError as err:
            raise damaged(packed.path, f"layer '{e['name'][:80]}': {err}") from None
    return out


def latent_layers(packed: PackedFile) -> dict[str, ReCUConv2d]:
    """Stand-alone ReCUConv2d per binary layer with the stored latent weights and tau.

    For deeper analysis (dead masks at save time) and resume; needs keep_latent=True.
    """
    if not packed.has_latent:
        raise RecuError(f"{packed.path} holds no latent weights; write it with --keep-latent")
    raw = _layer_tensors(packed, s.LATENT)
    kw = packed.recipe.layer_kwargs()
    out = {}
    for e in packed.layers:
        o, i, kh, kw_ = e["shape"]
        layer = ReCUConv2d(i, o, (kh, kw_), **{**kw, "tau": float(e["tau"])})
        with torch.no_grad():
            layer.weight.copy_(raw[e["name"]].float())
        out[e["name"]] = layer
    return out


def _deploy_state(packed: PackedFile, model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors under the deploy model's names: bits -> weight_sign, no latents."""
    raw = read_tensors(packed)
    signs = read_signs(packed)
    binary = {n for n, _ in binary_layers(model)}
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        layer = s.owner(key)
        if layer in binary and key == s.tensor_name(layer, s.BITS):
            state[f"{layer}.weight_sign"] = signs[layer]
        elif layer in binary and key == s.tensor_name(layer, s.LATENT):
            continue
        else:
            state[key] = value
    return state


def load(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the deploy model (BinaryConv2d layers) from the file alone, in eval mode."""
    packed, _ = parse(Path(path))
    model = skeleton(packed)
    check_against_recipe(packed, model)
    verify_checksum(packed)
    state = _deploy_state(packed, model)
    check_finite(packed.path, state)
    with torch.device("meta"):
        model = to_deploy(model, inplace=True)
    if _materializable(model):
        model = model.to_empty(device=device)
    else:
        tree = build_tree(packed.spec, packed.recipe, "cpu", packed.path)
        model = to_deploy(tree, inplace=True).to(device)
    own = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key not in own:
                raise RecuError(
                    f"{packed.path}: tensor '{key[:80]}' has no place in the model; "
                    "the file was edited or damaged"
                )
            state[key] = value.to(own[key].dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RecuError(
            f"{packed.path} does not fit the rebuilt model "
            f"({str(e).splitlines()[0][:160]}); write it again"
        ) from e
    return model.eval()


def check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Values that no trained model holds (NaN/inf scales, negative or NaN BatchNorm
    variance) would give NaN outputs silently: refuse them with one line."""
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        leaf = key.rpartition(".")[2]
        if leaf == "running_var":
            ok = bool(torch.isfinite(value).all()) and bool((value >= 0).all())
            what = "a BatchNorm variance that is negative, NaN or infinite"
        elif leaf in ("alpha", "running_mean", "weight", "bias", "act_threshold"):
            ok = bool(torch.isfinite(value).all())
            what = "NaN or infinite values"
        else:
            continue
        if not ok:
            raise RecuError(
                f"{path}: tensor '{key[:80]}' holds {what}; the file is damaged or was "
                "saved from a diverged run: write it again from a good run"
            )


def _materializable(model: nn.Module) -> bool:
    """True when every tensor of the meta tree is in its state_dict (so to_empty + load
    restores everything); else rebuild on the CPU (non-persistent buffers, plain attrs)."""
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        return False
    return not any(isinstance(v, torch.Tensor) for m in model.modules() for v in vars(m).values())
