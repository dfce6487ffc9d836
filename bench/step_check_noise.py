"""How far a correct compiled step's gradients are from the eager step's, next to how far
rounding alone moves them: the noise that training/step_check.py's bound must stay clear of.

For resnet20 with the finetune recipe (real weights, a real batch of ../shared/data/cifar10)
in each stage, the gradients of one batch: eager twice (must be equal), eager on the batch
moved by 1e-3, eager without autocast, and compiled (inductor). Each against the first
eager: the cosine of all gradients and the range of the latent weights' gradient norm
ratios, which is what the check bounds (0.5-2x).

    python bench/step_check_noise.py                     # CPU, bf16 autocast (minutes)
    python bench/step_check_noise.py --amp-dtype none    # fp32
    python bench/step_check_noise.py --device cuda
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import torch
from ablation import SHARED, make_subset  # bench/ is run as a script folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recu_cli.bnn import binary_layers  # noqa: E402
from recu_cli.convert_config import ConvertConfig  # noqa: E402
from recu_cli.recipes import recipe_settings  # noqa: E402
from recu_cli.training import TrainConfig, Trainer  # noqa: E402
from recu_cli.training.step_check import (  # noqa: E402
    Agreement,
    buffers_kept,
    compare,
    gradients,
)
from recu_cli.training.steps import forward_loss  # noqa: E402


def trainer_in_stage(stage: int, data: Path, out: Path, args) -> Trainer:
    settings = recipe_settings("finetune", 2)
    conv = settings.pop("convert")
    amp = args.amp_dtype != "none"
    cfg = TrainConfig(**{
        **settings, "model": "resnet20", "data": str(data), "stage1_epochs": 1,
        "weights": str(SHARED / "weights" / "resnet20-12fca82f.th"), "batch_size": 128,
        "workers": 0, "output": str(out), "experiment": f"stage{stage}", "seed": 3,
        "step0_eval": False, "calib_images": 256, "convert": ConvertConfig(**conv).to_dict(),
        "amp": amp, "amp_dtype": args.amp_dtype if amp else "auto", "device": args.device,
    })  # fmt: skip
    trainer = Trainer(cfg, quiet=True)
    if stage == 2:
        trainer.state.pos.epoch, trainer.state.pos.global_step = 1, trainer.steps_per_epoch
        trainer.loop.enter_stage(2, switching=True)
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp-dtype", default="bf16", choices=("bf16", "fp16", "none"))
    args = ap.parse_args()
    data, out = make_subset(26), Path(tempfile.mkdtemp(prefix="recu-step-check-"))
    print(f"resnet20 finetune, batch 128, autocast {args.amp_dtype}, {args.device}\n")
    print("| stage | against eager | cosine of all gradients | latent-weight norm ratios |")
    print("|---|---|---|---|")
    for stage in (1, 2):
        for label, a in stage_rows(trainer_in_stage(stage, data, out, args)):
            ratios = f"{a.lowest[0]:.3f}-{a.highest[0]:.3f}x"
            print(f"| {stage} | {label} | {a.cosine:.3f} | {ratios} |", flush=True)


def stage_rows(trainer: Trainer) -> list[tuple[str, Agreement]]:
    parts, cfg = trainer.parts, trainer.cfg
    images, targets = next(iter(parts.train_loader))
    images, targets = images.to(parts.device), targets.to(parts.device)
    named = [(n, p) for n, p in parts.model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    latent = {f"{n}.weight" for n, _ in binary_layers(parts.model)}
    eager = functools.partial(forward_loss, cfg, parts)

    def grads(fn, x=images):
        with buffers_kept(parts.model):
            return gradients(fn, params, x, targets)

    base = grads(eager)
    rows = {"eager again": grads(eager)}
    rows["eager, batch moved by 1e-3"] = grads(eager, images + 1e-3 * torch.randn_like(images))
    if parts.amp_dtype is not None:
        amp, parts.amp_dtype = parts.amp_dtype, None
        rows["eager without autocast"] = grads(eager)
        parts.amp_dtype = amp
    torch._dynamo.reset()
    compiled = torch.compile(
        functools.partial(forward_loss, cfg, parts, cache=False), fullgraph=True, dynamic=False
    )
    rows["compiled (inductor)"] = grads(compiled)
    return [(label, compare(names, base, got, latent)) for label, got in rows.items()]


if __name__ == "__main__":
    main()
