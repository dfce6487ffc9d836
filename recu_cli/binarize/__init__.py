"""ReCU binarization: sign functions, layers and the tau schedule."""

from recu_cli.binarize.functions import sign_pos
from recu_cli.binarize.layers import BinaryConv2d, ReCUConv2d, recu_threshold
from recu_cli.binarize.tau import tau_schedule

__all__ = [
    "BinaryConv2d",
    "ReCUConv2d",
    "recu_threshold",
    "sign_pos",
    "tau_schedule",
]
