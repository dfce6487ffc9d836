"""Mixed precision on the CPU: the CUDA autocast path, shown where this machine can show it."""

from __future__ import annotations

import pytest
import torch

from recu_cli.binarize import BinaryConv2d, ReCUConv2d
from recu_cli.binarize.functions import _ApproxSign, _RescaledApproxSign, rescale_activation
from recu_cli.bnn import convert_model
from recu_cli.convert_config import ConvertConfig
from recu_cli.models import create_model

HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("alpha_mode", ["learned", "analytic"])
def test_binary_conv_output_stays_in_the_autocast_dtype(dtype, alpha_mode) -> None:
    layer = ReCUConv2d(8, 8, 3, padding=1, bias=True, alpha_mode=alpha_mode, act_threshold=True)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert layer.alpha.dtype == torch.float32  # the parameter itself stays fp32
    if alpha_mode == "learned":
        assert layer.alpha.grad is not None and layer.alpha.grad.dtype == torch.float32
    layer.eval()
    deploy = BinaryConv2d.from_recu(layer)
    with torch.autocast("cpu", dtype=dtype):
        assert deploy(x).dtype == dtype


@pytest.mark.parametrize("dtype", HALF)
def test_converted_resnet_runs_in_half_under_autocast(dtype) -> None:
    """BatchNorm, the residual adds and the activations after a binary conv run in half."""
    model, _ = create_model("resnet20")
    model, _ = convert_model(model, ConvertConfig())
    seen: dict[str, torch.dtype] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            seen[name] = output.dtype

        return hook

    hooks = [
        m.register_forward_hook(record(name))
        for name, m in model.named_modules()
        if name == "layer1.0" or name.startswith("layer1.0.")
    ]
    with torch.autocast("cpu", dtype=dtype):
        model(torch.randn(2, 3, 32, 32)).float().sum().backward()
    for h in hooks:
        h.remove()
    assert seen["layer1.0.conv1"] == dtype
    assert seen["layer1.0.bn1"] == dtype, seen
    assert seen["layer1.0"] == dtype, seen  # the block's output: adds and activation


def _overflowing_fp16_input() -> tuple[torch.Tensor, torch.Tensor]:
    """~200k activations per sample and a scaled loss's gradient, as fp16 training sees them.

    sum(g0 * A) over one sample is ~3e5 here (beyond fp16's 65504), and so is sum(A^2)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 64, 56, 56, generator=gen) * 1.5
    grad = a.sign() * 4.0
    return a, grad


def test_rescale_backward_accumulates_fp16_in_fp32() -> None:
    a32, g32 = _overflowing_fp16_input()
    a16 = a32.half().requires_grad_(True)
    _RescaledApproxSign.apply(a16).backward(g32.half())
    assert a16.grad.dtype == torch.float16
    assert torch.isfinite(a16.grad).all()
    # reference: the unfused formula in fp64 on the same (fp16-rounded) values
    ref = a16.detach().double().requires_grad_(True)
    _ApproxSign.apply(rescale_activation(ref)).backward(g32.half().double())
    torch.testing.assert_close(a16.grad.double(), ref.grad, rtol=2e-3, atol=2e-3)


def test_rescale_backward_reads_channels_last_as_it_is() -> None:
    """Channels-last activations give the same gradient as contiguous ones."""
    a, g = _overflowing_fp16_input()
    a, g = a[:, :16, :8, :8].contiguous(), g[:, :16, :8, :8].contiguous()
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = a.clone().to(memory_format=fmt).requires_grad_(True)
        _RescaledApproxSign.apply(x).backward(g.to(memory_format=fmt))
        grads.append(x.grad.contiguous())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
