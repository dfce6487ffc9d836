"""Runtime engines vs the float32 deploy form, per binary layer and end to end.

The protocol is docs/method.md section 7.

One process, the same inputs for every engine, fixed thread counts per measurement
(torch.utils.benchmark's Timer sets them), median and IQR of blocked_autorange replicates.
A binary layer's float time is its BinaryConv2d (F.conv2d on +-1 plus the alpha scale) and
the BatchNorm that the engine folds into it, so both sides compute the same thing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from recu_cli.binarize.functions import sign_pos
from recu_cli.errors import RecuError
from recu_cli.runtime.api import Site, binary_sites, to_runtime


def _timer_class() -> type:
    """torch.utils.benchmark, imported without its 'No CUDA runtime' warning on CPU builds."""
    from recu_cli.runtime.ext import quiet_cpp_extension_log

    with quiet_cpp_extension_log():
        from torch.utils.benchmark import Timer

    return Timer


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    runs: int


def measure(fn: Callable[[], object], threads: int, min_time: float, min_runs: int = 10) -> Timing:
    """Median and IQR (ms) of blocked_autorange replicates of fn() at a fixed thread count.

    Slow calls get fewer replicates than min_time allows for; they are measured again for
    long enough to give at least min_runs replicates (docs/method.md section 7 asks for 30).
    """
    timer = _timer_class()(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_time)
    if len(m.times) < min_runs:
        m = timer.blocked_autorange(min_run_time=1.05 * min_runs * m.median * m.number_per_run)
    return Timing(m.median * 1e3, m.iqr * 1e3, len(m.times))


@dataclass
class LayerResult:
    name: str
    shape: str  # "Cin x H x W -> Cout, kxk sS"
    float32: Timing | None  # None with layers=False (only end-to-end timed)
    engines: dict[str, Timing] = field(default_factory=dict)
    bit_exact: dict[str, bool] = field(default_factory=dict)


@dataclass
class EngineResult:
    engine: str
    threads: int
    batch: int
    binary_layers_ms: float | None
    end_to_end: Timing
    binary_layers_speedup: float | None
    end_to_end_speedup: float
    bit_exact: bool  # every layer's integer dot products equal F.conv2d's on the same input
    identical_outputs: bool  # end-to-end logits equal the float deploy form's bit for bit
    max_rel_diff: float  # end-to-end logits vs the float deploy form
    argmax_agree: float  # share of identical top-1 predictions


@dataclass
class SettingResult:
    threads: int
    batch: int
    float32_binary_layers_ms: float | None
    float32_end_to_end: Timing
    engines: list[EngineResult]
    layers: list[LayerResult]

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(site: Site, x: torch.Tensor) -> str:
    c = site.conv
    return (
        f"{c.in_channels}x{x.shape[-2]}x{x.shape[-1]}->{c.out_channels} "
        f"{c.kernel_size[0]}x{c.kernel_size[1]} s{c.stride[0]}"
    )


def _capture(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named module receives when the model runs on x."""
    seen: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    hooks = [
        mods[n].register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, a[0].detach()))
        for n in names
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise RecuError(f"binary layer(s) {missing[:3]} never ran in the forward pass")
    return seen


def _dots_exact(fast: nn.Module, site: Site, x: torch.Tensor) -> bool:
    """Integer-exact: the engine's dot products equal F.conv2d(sign_pos(x - beta), w) exactly."""
    c = site.conv
    xb = sign_pos(c.shifted_input(x.float()))
    ref = F.conv2d(xb, c.weight_sign.float(), None, c.stride, c.padding, c.dilation, c.groups)
    return bool(torch.equal(fast.integer_dot(x), ref))


def _float_layer(site: Site) -> Callable[[torch.Tensor], torch.Tensor]:
    conv, bn = site.conv, site.bn
    return (lambda x: bn(conv(x))) if bn is not None else conv


def _total(timings: Iterable[Timing | None]) -> float | None:
    ts = list(timings)
    return None if any(t is None for t in ts) else sum(t.median_ms for t in ts)  # type: ignore[union-attr]


def _engine(
    engine: str,
    runtime: nn.Module,
    fast_mods: dict[str, nn.Module],
    sites: list[Site],
    rows: list[LayerResult],
    x: torch.Tensor,
    f_in: dict[str, torch.Tensor],
    ref_logits: torch.Tensor,
    f_e2e: Timing,
    fl_total: float | None,
    threads: int,
    min_time: float,
    min_runs: int,
    layers: bool,
) -> EngineResult:
    """One engine at one setting: exactness per layer, layer and end-to-end timings."""
    exact = True
    for row, site in zip(rows, sites, strict=True):
        fast = fast_mods[site.name]
        row.bit_exact[engine] = ok = _dots_exact(fast, site, f_in[site.name])
        exact &= ok
        if layers:  # timed alone on the float model's input (fused blocks run it in C++)
            xr = f_in[site.name]
            row.engines[engine] = measure(lambda f=fast, x=xr: f(x), threads, min_time, min_runs)
    out = runtime(x)
    rel = float((out - ref_logits).abs().max() / ref_logits.abs().max().clamp_min(1e-12))
    agree = float((out.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    e2e = measure(lambda: runtime(x), threads, min_time, min_runs)
    rt_total = _total(r.engines.get(engine) for r in rows)
    return EngineResult(
        engine=engine, threads=threads, batch=x.shape[0], binary_layers_ms=rt_total,
        end_to_end=e2e,
        binary_layers_speedup=fl_total / rt_total if fl_total and rt_total else None,
        end_to_end_speedup=f_e2e.median_ms / e2e.median_ms, bit_exact=exact,
        identical_outputs=bool(torch.equal(out, ref_logits)), max_rel_diff=rel,
        argmax_agree=agree,
    )  # fmt: skip


@torch.no_grad()
def run_benchmark(
    deploy: nn.Module,
    input_size: tuple[int, int, int],
    engines: Iterable[str],
    threads: Iterable[int],
    batches: Iterable[int],
    min_time: float = 0.2,
    min_runs: int = 10,
    layers: bool = True,
    seed: int = 0,
    channels_last: bool = False,
    on_step: Callable[[str], None] | None = None,
    fp_layers: str = "exact",
    calibration: list[torch.Tensor] | None = None,
) -> list[SettingResult]:
    """Time the float deploy model and each engine's runtime model, side by side.

    channels_last: run both the float baseline and the runtime models in NHWC (the runtime's
      fast path: fused blocks, runtime/fused.py).
    fp_layers / calibration: passed to to_runtime; with "int8" the outputs are no longer
      identical to the float model's (reported as such), the binary layers stay exact.
    """
    deploy = copy.deepcopy(deploy).cpu().eval()
    if channels_last:
        deploy = deploy.to(memory_format=torch.channels_last)
    sites = binary_sites(deploy)
    if not sites:
        raise RecuError("the model has no BinaryConv2d layers; benchmark a converted model")
    engines = list(engines)
    if fp_layers == "int8" and calibration is None:  # timing only: the bench's own input
        calibration = [torch.randn(8, *input_size, generator=torch.Generator().manual_seed(seed))]
    runtimes = {
        e: to_runtime(
            deploy, e, channels_last=channels_last, fp_layers=fp_layers, calibration=calibration
        )  # fmt: skip
        for e in engines
    }
    fast_mods = {e: dict(r.named_modules()) for e, r in runtimes.items()}
    names = [s.name for s in sites]
    results = []
    for th in threads:
        for b in batches:
            step = f"threads={th} batch={b}"
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(b, *input_size, generator=gen)
            ref_logits = deploy(x)
            f_in = _capture(deploy, names, x)
            layer_rows = []
            for site in sites:
                xin = f_in[site.name]
                t = (
                    measure(lambda f=_float_layer(site), x=xin: f(x), th, min_time, min_runs)
                    if layers
                    else None
                )
                layer_rows.append(LayerResult(site.name, _shape(site, xin), t))
            if on_step:
                on_step(f"{step}: float32")
            f_e2e = measure(lambda x=x: deploy(x), th, min_time, min_runs)
            fl_total = _total(r.float32 for r in layer_rows)
            eng_rows = []
            for e in engines:
                eng_rows.append(
                    _engine(
                        e,
                        runtimes[e],
                        fast_mods[e],
                        sites,
                        layer_rows,
                        x,
                        f_in,
                        ref_logits,
                        f_e2e,
                        fl_total,
                        th,
                        min_time,
                        min_runs,
                        layers,
                    )  # fmt: skip
                )
                if on_step:
                    on_step(f"{step}: {e}")
            results.append(SettingResult(th, b, fl_total, f_e2e, eng_rows, layer_rows))
    return results
