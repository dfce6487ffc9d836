"""One function per peer family; each turns the models into timed entries under stable keys.

A family function gets the context (models, calibration inputs, a temp dir) and the keys it
may build (those whose packages import), and returns key -> Entry. An Entry's make(threads,
batch, x) does the per-setting work (a session, a compiled model) and returns the zero-arg
call that is timed; the call returns the logits so that they can be compared.

The optional packages (onnx, onnxruntime, openvino, nncf) are imported inside these
functions only, never when the CLI starts.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

Call = Callable[[], Any]


@dataclass
class Entry:
    """One timed thing: what it is, and how to get its call for (threads, batch, input)."""

    label: str
    make: Callable[[int, int, torch.Tensor], Call]
    reference: str  # "float" (compared with torch_fp32) or "deploy" (with the BNN's float form)


@dataclass
class Context:
    float_model: nn.Module
    deploy: nn.Module
    input_size: tuple[int, int, int]
    calib: list[torch.Tensor]  # batch-1 inputs for the int8 peers
    workdir: Path  # temporary; removed by the caller
    engines: list[str]  # recu engines to time
    channels_last: bool  # recu engines' layout
    runtime_options: dict[str, Any] = field(default_factory=dict)  # more to_runtime kwargs
    _onnx: Path | None = None

    def onnx_file(self) -> Path:
        """The float original as ONNX (opset 18, dynamic batch), exported once per run."""
        if self._onnx is None:
            self._onnx = export_onnx(self.float_model, self.input_size, self.workdir / "fp32.onnx")
        return self._onnx


@contextlib.contextmanager
def silenced() -> Any:
    """Keep stdout clean (it may carry --json): third-party progress bars and warnings go."""
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


def export_onnx(model: nn.Module, input_size: tuple[int, int, int], path: Path) -> Path:
    """torch.onnx.export of the float model, dynamic batch; BatchNorm folded into the convs."""
    x = torch.zeros(1, *input_size)
    kwargs = {
        "input_names": ["input"],
        "output_names": ["logits"],
        "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}},
        "opset_version": 18,
    }
    with silenced(), torch.no_grad():
        try:  # the TorchScript exporter: fast, and folds BN (what users get from most recipes)
            torch.onnx.export(model, (x,), str(path), dynamo=False, **kwargs)
        except TypeError:  # a torch without the dynamo switch
            torch.onnx.export(model, (x,), str(path), **kwargs)
    return path


# ---------------------------------------------------------------- PyTorch


def torch_family(ctx: Context, keys: set[str]) -> dict[str, Entry]:
    """The float original in eager PyTorch, NCHW (as built) and NHWC (channels_last)."""
    nchw = ctx.float_model
    nhwc = _channels_last(ctx.float_model)
    out = {}
    if "torch_fp32" in keys:
        out["torch_fp32"] = Entry("PyTorch fp32, NCHW", lambda _t, _b, x: lambda: nchw(x), "float")
    if "torch_fp32_nhwc" in keys:
        out["torch_fp32_nhwc"] = Entry(
            "PyTorch fp32, NHWC", lambda _t, _b, x: lambda: nhwc(x), "float"
        )
    return out


def _channels_last(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(memory_format=torch.channels_last).eval()


# ---------------------------------------------------------------- ONNX Runtime


def onnxruntime_family(ctx: Context, keys: set[str]) -> dict[str, Entry]:
    """ONNX Runtime CPU, fp32 and int8 (static QDQ, per-channel s8 weights, u8 activations)."""
    import onnxruntime as ort

    files = {}
    if "ort_fp32" in keys:
        files["ort_fp32"] = ctx.onnx_file()
    if "ort_int8" in keys:
        files["ort_int8"] = _ort_quantize(ctx)

    def maker(path: Path) -> Callable[[int, int, torch.Tensor], Call]:
        sessions: dict[int, Any] = {}

        def make(threads: int, _batch: int, x: torch.Tensor) -> Call:
            if threads not in sessions:
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                so.inter_op_num_threads = 1
                so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                so.log_severity_level = 3
                sessions[threads] = ort.InferenceSession(
                    str(path), so, providers=["CPUExecutionProvider"]
                )
            sess, feed = sessions[threads], {"input": x.numpy()}
            return lambda: sess.run(None, feed)[0]

        return make

    labels = {
        "ort_fp32": f"ONNX Runtime {ort.__version__} fp32",
        "ort_int8": f"ONNX Runtime {ort.__version__} int8 (static QDQ, per channel)",
    }
    return {k: Entry(labels[k], maker(p), "float") for k, p in files.items()}


def _ort_quantize(ctx: Context) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, xs: list[torch.Tensor]) -> None:
            self._it = iter(xs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {"input": x.numpy()}

    out = ctx.workdir / "ort_int8.onnx"
    logging.getLogger("root").setLevel(logging.ERROR)
    with silenced():
        quantize_static(
            str(ctx.onnx_file()), str(out), Reader(ctx.calib), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------- OpenVINO


def openvino_family(ctx: Context, keys: set[str]) -> dict[str, Entry]:
    """OpenVINO CPU: fp32 (f32 inference precision) and int8 (NNCF post-training quantize)."""
    import openvino as ov

    core = ov.Core()
    models = {}
    if "openvino_fp32" in keys:
        models["openvino_fp32"] = core.read_model(str(ctx.onnx_file()))
    if "openvino_int8" in keys:
        models["openvino_int8"] = _nncf_quantize(core.read_model(str(ctx.onnx_file())), ctx)

    def maker(key: str, model: Any) -> Callable[[int, int, torch.Tensor], Call]:
        def make(threads: int, batch: int, x: torch.Tensor) -> Call:
            m = model.clone()
            m.reshape([batch, *ctx.input_size])
            config: dict[str, Any] = {
                "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY",
            }
            if key == "openvino_fp32":  # else CPUs with bf16 / AMX would run bf16
                config["INFERENCE_PRECISION_HINT"] = "f32"
            request = core.compile_model(m, "CPU", config).create_infer_request()
            request.set_input_tensor(ov.Tensor(x.numpy(), shared_memory=True))

            def call() -> Any:
                request.infer()
                return request.get_output_tensor(0).data

            return call

        return make

    labels = {
        "openvino_fp32": f"OpenVINO {ov.__version__.split('-')[0]} fp32",
        "openvino_int8": f"OpenVINO {ov.__version__.split('-')[0]} int8 (NNCF post-training)",
    }
    return {k: Entry(labels[k], maker(k, m), "float") for k, m in models.items()}


def _nncf_quantize(model: Any, ctx: Context) -> Any:
    from recu_cli.runtime.ext import quiet_cpp_extension_log

    with quiet_cpp_extension_log(), silenced():
        import nncf

        logging.getLogger("nncf").setLevel(logging.ERROR)
        data = nncf.Dataset([x.numpy() for x in ctx.calib])
        return nncf.quantize(model, data, subset_size=len(ctx.calib))


# ---------------------------------------------------------------- recu


def recu_family(ctx: Context, keys: set[str]) -> dict[str, Entry]:
    """recu's engines on the BNN (recu_cli.runtime.to_runtime), in the bench's layout."""
    from recu_cli.runtime import to_runtime

    layout = "NHWC" if ctx.channels_last else "NCHW"
    out = {}
    for engine in ctx.engines:
        key = f"recu_{engine}"
        if key not in keys:
            continue
        opts = dict(ctx.runtime_options)
        if opts.get("fp_layers") == "int8":  # the same calibration images as the int8 peers
            opts.setdefault("calibration", [torch.cat(ctx.calib)])
        rt = to_runtime(ctx.deploy, engine, channels_last=ctx.channels_last, **opts)
        out[key] = Entry(
            f"recu {engine}, BNN, {layout}", lambda _t, _b, x, rt=rt: lambda: rt(x), "deploy"
        )
    return out
