"""Fast data paths: where training and validation images are decoded and augmented.

`recu binarize --data-path` picks one (choice.py; `auto` by default, recorded in config.json):

- `pil` (recu_cli/data.py): loader workers decode with PIL and run the torchvision/timm
  transforms. Every device, every dataset; the fallback.
- `resident` (resident.py): a small training set (CIFAR-size trees, the named torchvision
  sets, the demo) decoded once (cache.py keeps trees decoded on disk), held as uint8 on the
  training device, and cropped, flipped and normalised there as batched tensor ops.
- `gpu-decode` (jpeg.py): large JPEG trees. Loader workers only read file bytes and draw
  each image's crop as timm's transform would; the JPEGs are decoded on the GPU in batches
  (nvJPEG through torchvision) and resized, flipped, colour-jittered and normalised there
  (resample.py). On the CPU (and where the GPU cannot decode) the workers decode instead.

Every path keeps imagecheck's rules: an unreadable image is named, skipped and counted, or
fatal with --strict-data; validation needs every image.
"""

DATA_PATHS = ("auto", "resident", "gpu-decode", "pil")
