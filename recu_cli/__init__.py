"""recu: ReCU binary neural networks from pretrained CNNs."""

__version__ = "0.1.0"
