"""Model names and the registries that know them (timm with recu's zoo, torchvision).

Parsing a name needs no torch; asking a registry imports it (inside the functions).
"""

from __future__ import annotations

import difflib
from types import ModuleType

from recu_cli.errors import RecuError

TV_PREFIXES = ("tv:", "torchvision:")
TIMM_PREFIX = "timm:"


def parse_name(name: str) -> tuple[str, str]:
    """'tv:resnet18' -> ('torchvision', 'resnet18'); 'resnet18' -> ('timm', 'resnet18')."""
    for p in TV_PREFIXES:
        if name.startswith(p):
            return "torchvision", name[len(p) :]
    if name.startswith(TIMM_PREFIX):
        return "timm", name[len(TIMM_PREFIX) :]
    return "timm", name


def timm_registry() -> ModuleType:
    """timm, with recu's CIFAR models registered in it (importing the zoo registers them)."""
    import timm

    from recu_cli.models import zoo  # noqa: F401 - registration

    return timm


def known_models() -> list[str]:
    import torchvision

    from recu_cli.models.zoo import RECU_MODELS

    timm = timm_registry()
    return sorted(set(timm.list_models()) | set(RECU_MODELS)) + [
        f"tv:{n}" for n in torchvision.models.list_models()
    ]


def unknown_model(name: str) -> RecuError:
    """The error for a name no registry knows, with the closest known names."""
    close = difflib.get_close_matches(name, known_models(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
    return RecuError(f"unknown model '{name}'{hint}")


def is_known(name: str) -> bool:
    source, arch = parse_name(name)
    if source == "torchvision":
        import torchvision

        return arch in torchvision.models.list_models()
    return timm_registry().is_model(arch)
