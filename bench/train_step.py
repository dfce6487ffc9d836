"""Training-step time of the ReCU-binarized model over the full-precision model.

Both models are built from the same architecture, take the same batch, use the same
optimizer and thread count, and are timed in alternating rounds in one process, so the
ratio is robust to whatever else the machine is doing. Target: <= 1.5x on CPU, for the
paper's layer and for the default (finetune) recipe's layer in both of its stages.

    python bench/train_step.py                # resnet20 (32 px, b 128) and resnet18 (224 px, b 16)
    python bench/train_step.py --threads 2 --rounds 7 --models resnet20
    python bench/train_step.py --compile --models resnet20   # also torch.compile'd steps

With --compile every model is also timed with its forward and loss compiled by
torch.compile (inductor's C++ backend on the CPU; the backward compiled with it), as
`recu binarize --compile on` runs them, and the compiled/eager ratio of each is printed.
Compilation (minutes on a small CPU) happens before the timed rounds and is reported.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from recu_cli.bnn import binary_layers, convert_model
from recu_cli.convert_config import ConvertConfig
from recu_cli.models import create_model
from recu_cli.runtime.allocator import keep_freed_memory
from recu_cli.training.average import average_for
from recu_cli.training.config import TrainConfig
from recu_cli.training.switch import model_sign_gap

CASES = (("resnet20", 32, 128), ("resnet18", 224, 16))
FINETUNE = ConvertConfig(activation="prelu", act_threshold="median", tau=0.85)
# (label, conversion, weight mix, stage-1 penalty?, moving average?): the paper's layer, and
# the finetune recipe's in both stages and at its switch (training/switch.py: the penalty's
# extra term in stage 1, the ramp's blend of both weight paths at the start of stage 2), and
# its stage-2 step followed by the update of the weights' moving average (--ema-decay)
VARIANTS = (
    ("recu paper", ConvertConfig(tau=0.85), 1.0, False, False),
    ("recu finetune stage 1", FINETUNE, 0.0, False, False),
    ("recu finetune stage 1 + penalty", FINETUNE, 0.0, True, False),
    ("recu finetune ramp (mix 0.5)", FINETUNE, 0.5, False, False),
    ("recu finetune stage 2", FINETUNE, 1.0, False, False),
    ("recu finetune stage 2 + average", FINETUNE, 1.0, False, True),
)


def make_step(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, compiled: bool = False,
    penalty: bool = False, average: bool = False,
):  # fmt: skip
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    # the finetune default's average (--ema-decay, --ema-memory, --ema-warmup-power), as the
    # run builds it
    ema = average_for(model, TrainConfig(model="-", data="-")) if average else None

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        return loss + 10.0 * model_sign_gap(model) if penalty else loss

    loss_fn = torch.compile(loss_of, fullgraph=True, dynamic=False) if compiled else loss_of

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(x, y).backward()
        opt.step()
        if ema is not None:
            ema.update(model, lr_share=0.5)  # a fractional keep: the lerp runs in full

    return step


def time_steps(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument("--models", nargs="*", default=[c[0] for c in CASES], help="cases to run")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    ap.add_argument(
        "--glibc-trim",
        action="store_true",
        help="leave glibc's default mmap/trim behaviour (recu binarize turns it off on CPU)",
    )
    args = ap.parse_args()
    if not args.glibc_trim:
        keep_freed_memory()  # what `recu binarize` does on CPU; applies to every model here
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {args.threads} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    for name, size, batch in (c for c in CASES if c[0] in args.models):
        fp, _ = create_model(name, num_classes=10)
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        steps = {"fp32": make_step(fp, x, y)}
        for label, config, mix, penalty, average in VARIANTS:
            bnn, _ = create_model(name, num_classes=10)
            bnn.load_state_dict(fp.state_dict())
            bnn, _ = convert_model(bnn, config)
            for _, layer in binary_layers(bnn):
                layer.set_weight_mix(mix)
            steps[label] = make_step(bnn, x, y, penalty=penalty, average=average)
            if args.compile and mix == 1.0 and not average:  # compiled: one graph a stage
                twin = copy.deepcopy(bnn)
                steps[label + " compiled"] = make_step(twin, x, y, compiled=True)
        if args.compile:
            fp_twin, _ = create_model(name, num_classes=10)
            fp_twin.load_state_dict(fp.state_dict())
            steps["fp32 compiled"] = make_step(fp_twin, x, y, compiled=True)
        for label, s in steps.items():  # warm-up (compilation of the compiled ones)
            start = time.perf_counter()
            time_steps(s, 1)
            if label.endswith("compiled"):
                print(f"    compile warm-up {label}: {time.perf_counter() - start:.1f} s")
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.rounds):
            for k, s in steps.items():
                times[k].append(time_steps(s, args.steps))
        fp_t = statistics.median(times["fp32"])
        print(f"{name:9s} {size}px b{batch:<4d} fp32 {1000 * fp_t:8.1f} ms/step")
        for label in steps:
            if label == "fp32":
                continue
            t = statistics.median(times[label])
            ratios = [b / f for b, f in zip(times[label], times["fp32"], strict=True)]
            line = (
                f"    {label:31s} {1000 * t:8.1f} ms/step  ratio {t / fp_t:.2f}x "
                f"(per-round min {min(ratios):.2f}, max {max(ratios):.2f})"
            )
            eager = label.removesuffix(" compiled")
            if label.endswith(" compiled") and eager in times:
                line += f"  compiled/eager {t / statistics.median(times[eager]):.2f}x"
            print(line)


if __name__ == "__main__":
    main()
