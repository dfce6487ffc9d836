"""Checks for records read back from files (JSON types, bounds), without torch.

A packed file or a run's config is untrusted input: the dataclasses that read them
(`ModelSpec.from_dict`, `ConvertConfig.from_dict`) check each field with these and raise
`FieldError`, which the packed-file validator words with the file's path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from recu_cli.errors import RecuError


class FieldError(RecuError):
    """A record that does not fit its dataclass.

    `what` is the problem without context (the validator adds the path and the metadata
    key); `unknown` holds keys this recu does not know, a newer writer rather than damage.
    """

    def __init__(self, message: str, what: str, unknown: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.what = what
        self.unknown = list(unknown)


def is_int(x: Any, lo: int, hi: int) -> bool:
    """An int in [lo, hi]; JSON's true/false are not numbers here."""
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def is_num(x: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
