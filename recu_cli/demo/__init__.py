"""The built-in demo dataset: a small balanced Fashion-MNIST subset shipped with recu.

4,000 training images (400 per class, from Fashion-MNIST's training split) and 1,000
validation images (100 per class, from its test split), in the original IDX format, read
by `recu_cli.idx`. Fashion-MNIST is (c) Zalando SE, MIT licence (LICENSE-fashion-mnist);
the files were taken from Debian's dataset-fashion-mnist package.
"""

from pathlib import Path

DEMO_ROOT = Path(__file__).parent
# A full-precision ResNet-20 trained on this data (bench/make_demo_weights.py), so that the
# offline demo binarizes a pretrained network, which is what recu is for.
DEMO_WEIGHTS = DEMO_ROOT / "resnet20-demo.safetensors"
