"""Full-precision models by name: timm, torchvision and recu's own CIFAR zoo.

Names: `resnet18` or `timm:resnet18` (timm, which also holds recu's CIFAR models
resnet20/32/44/56, vgg_small and resnet18_cifar), `tv:resnet18` or `torchvision:resnet18`
(torchvision).

One job per module: `names` (parsing names, the registries, `is_known`), `create`
(`create_model`, `reset_head`, `spec_for`), `zoo` (recu's CIFAR models, registered in
timm's registry), `surgery` (finding and replacing submodules: `classifier_name`,
`set_submodule`), `weight_files` (reading .pth/.th/.safetensors weights, `load_weights`).
Importing this package imports no torch; its names are loaded on first use (PEP 562).
"""

from __future__ import annotations

from recu_cli.lazy import lazy_names

_EXPORTS = {
    "create_model": "create",
    "reset_head": "create",
    "spec_for": "create",
    "is_known": "names",
    "known_models": "names",
    "parse_name": "names",
    "classifier_name": "surgery",
    "set_submodule": "surgery",
    "load_weights": "weight_files",
    "read_state_dict": "weight_files",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_names(__name__, _EXPORTS)
