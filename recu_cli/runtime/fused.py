"""The end-to-end fast path of the xnor engine: whole Bi-Real blocks and the stem tail in C++.

Once the binary convs are fast, a BNN's time goes to the float work around them: the
shortcut add, the activation and the sign of every block's input are separate passes over
memory, each one a Python module call. In NHWC the xnor kernel does all of it in its
epilogue, on each chunk of 64 output pixels while it is still in L1 (csrc/xnor.cpp,
`XnorBlock`):

    out1 = act1(bn1(conv1(x)) + shortcut)     ->  float out1 and the sign bits of conv2's input
    out  = act2(bn2(conv2(out1)) + out1)      ->  float out (and, in a stage, the next block's bits)

so a block packs its input at most once and writes each activation once; a stage of such
blocks is one C++ call (`XnorChain`). The stem's BatchNorm, activation and max-pool become
one pass too (`bn_act_pool`). Every float operation is the one the float deploy form
computes, in the same order (fold.py for the BatchNorm), so the logits stay bit-identical
to the float deploy model in NHWC; tests/test_fused.py checks that.

Fusion applies to BiRealBasicBlock (timm / torchvision ResNet-18/34, recu's CIFAR ResNets)
whose two binary convs have their BatchNorm folded and whose `aa` / `se` are identities, and
to the stems of timm, torchvision and recu ResNets. Anything else keeps the per-layer path.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from recu_cli.blocks import BiRealBasicBlock
from recu_cli.runtime import ext
from recu_cli.runtime.fold import exact_bn_terms, pad_channels
from recu_cli.runtime.geometry import ConvGeometry
from recu_cli.runtime.xnor import BLOCK, XnorConv2d

# Activation codes of csrc/xnor.cpp (enum Act).
ACT_NONE, ACT_RELU, ACT_HARDTANH, ACT_PRELU = 0, 1, 2, 3


class ActSpec:
    """An activation module as the kernel's (code, lo, hi, per-channel slopes), or unsupported."""

    def __init__(
        self, code: int, lo: float = 0.0, hi: float = 0.0, slopes: torch.Tensor | None = None
    ) -> None:
        self.code, self.lo, self.hi, self.slopes = code, lo, hi, slopes

    @staticmethod
    def of(module: nn.Module, channels: int) -> ActSpec | None:
        if isinstance(module, nn.Identity):
            return ActSpec(ACT_NONE)
        if isinstance(module, nn.ReLU):
            return ActSpec(ACT_RELU)
        if isinstance(module, nn.Hardtanh):
            return ActSpec(ACT_HARDTANH, float(module.min_val), float(module.max_val))
        if isinstance(module, nn.PReLU):
            w = module.weight.detach().float().cpu().reshape(-1)
            if w.numel() not in (1, channels):
                return None
            return ActSpec(ACT_PRELU, slopes=w.expand(channels).contiguous())
        return None

    def padded(self, multiple: int) -> ActSpec:
        """The slopes zero-padded to whole kernel blocks."""
        slopes = None if self.slopes is None else pad_channels(self.slopes, multiple).contiguous()
        return ActSpec(self.code, self.lo, self.hi, slopes)

    def args(self) -> tuple:
        return self.code, self.lo, self.hi, self.slopes


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _threshold(conv: XnorConv2d) -> torch.Tensor | None:
    beta = conv.act_threshold
    return None if beta is None else beta.reshape(-1).contiguous()


class FusedBasicBlock(nn.Module):
    """A BiRealBasicBlock whose float work runs in the epilogues of its two xnor convs (NHWC).

    The C++ side is one `XnorBlock` object per input size (the zero-padding tables depend on
    it), built on first use and rebuilt after a copy, like the convs' own tables.
    """

    def __init__(
        self, conv1: XnorConv2d, act1: ActSpec, conv2: XnorConv2d, act2: ActSpec,
        downsample: nn.Module | None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.conv1, self.conv2, self.downsample = conv1, conv2, downsample
        self.act1, self.act2 = act1.padded(BLOCK), act2.padded(BLOCK)
        self._native_ds = _native_downsample(downsample)
        self._impl: dict[tuple[int, int], torch.ScriptObject] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_impl": {}}  # C++ objects are rebuilt, never pickled

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self.conv1.check_input(x)
        x = _nhwc(x.float())
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        impl = self.impl(hw)
        if self.downsample is None or self._native_ds:
            return impl.forward(x, None)
        return impl.forward(x, _nhwc(self.downsample(x)))

    def _build(self, hw: tuple[int, int]) -> torch.ScriptObject:
        c1, c2 = self.conv1, self.conv2
        impl = torch.classes.recu_xnor.XnorBlock()
        hw2 = c1.table(hw)[1].numel(), c1.table(hw)[2].numel()  # conv1's output size
        beta2 = _threshold(c2)
        beta2 = None if beta2 is None else pad_channels(beta2, BLOCK).contiguous()
        for i, (conv, size, act, beta) in enumerate(
            ((c1, hw, self.act1, None), (c2, hw2, self.act2, beta2))
        ):
            ktab, ymap, xmap = conv.table(size)
            impl.set_conv(
                i, conv.packed_weight, conv.out_channels, *conv.geometry.ints(), ktab,
                *conv._fwd_args, ymap, xmap, *act.args(), beta,
            )  # fmt: skip
        beta1 = _threshold(c1)
        beta1_padded = None if beta1 is None else pad_channels(beta1, BLOCK).contiguous()
        impl.set_input(beta1, beta1_padded, c1._isa_code)
        if self._native_ds:
            conv, bn = self.downsample[0], self.downsample[1]  # type: ignore[index]
            impl.set_downsample(
                conv.weight.detach(), _detached(conv.bias), *ConvGeometry.of(conv).onednn(),
                _detached(bn.weight), _detached(bn.bias),
                bn.running_mean, bn.running_var, float(bn.eps),
            )  # fmt: skip
        self._impl[hw] = impl
        return impl

    def impl(self, hw: tuple[int, int]) -> torch.ScriptObject:
        """The C++ block for inputs of size hw (built once per size)."""
        impl = self._impl.get(hw)
        return impl if impl is not None else self._build(hw)

    def out_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The block's output size for inputs of size hw."""
        t1 = self.conv1.table(hw)
        t2 = self.conv2.table((t1[1].numel(), t1[2].numel()))
        return t2[1].numel(), t2[2].numel()

    @property
    def chainable(self) -> bool:
        """Its shortcut runs in C++ (none, or conv + BatchNorm): it can sit in an XnorChain."""
        return self.downsample is None or self._native_ds

    def extra_repr(self) -> str:  # noqa: D102
        return "fused: pack -> conv1 + bn1 + shortcut + act1 + sign -> conv2 + bn2 + add + act2"


class FusedStage(nn.Sequential):
    """A stage (nn.Sequential) of chainable fused blocks, run by one C++ XnorChain.

    Block i's last epilogue writes block i+1's input bits, so only the first block packs
    its input; Python is entered once per stage. The blocks stay children under their own
    names (layer1.0.conv1, ...), so hooks and state dicts see the same tree.
    """

    def __init__(self, blocks: nn.Sequential) -> None:
        super().__init__(OrderedDict(blocks._modules))
        self._chains: dict[tuple[int, int], torch.ScriptObject] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_chains": {}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        first: FusedBasicBlock = self[0]  # type: ignore[assignment]
        first.conv1.check_input(x)
        x = _nhwc(x.float())
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        chain = self._chains.get(hw)
        if chain is None:
            chain = torch.classes.recu_xnor.XnorChain()
            size = hw
            for block in self:
                chain.append(block.impl(size))
                size = block.out_hw(size)
            self._chains[hw] = chain
        return chain.forward(x)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _native_downsample(ds: nn.Module | None) -> bool:
    """A conv + BatchNorm shortcut that XnorBlock runs itself, with the ops these modules call."""
    if not isinstance(ds, nn.Sequential) or len(ds) != 2:
        return False
    conv, bn = ds[0], ds[1]
    return (
        type(conv) is nn.Conv2d
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and type(bn) is nn.BatchNorm2d
        and not bn.training
        and bn.running_mean is not None
    )


class FusedStemTail(nn.Module):
    """BatchNorm, activation and max-pool of a ResNet stem in one NHWC pass (conv: torch's)."""

    def __init__(self, bn: nn.BatchNorm2d, act: ActSpec, pool: nn.MaxPool2d | None, isa: int):
        super().__init__()
        terms = exact_bn_terms(bn)
        assert terms is not None, "fuse_stem checks exact_bn_terms first"
        self.bn_a, self.bn_c = terms[0].contiguous(), terms[1].contiguous()
        self.act = act
        self.pool = (0, 0, 0) if pool is None else (_int(pool.kernel_size), _int(pool.stride),
                                                    _int(pool.padding))  # fmt: skip
        self.isa = isa

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out: write the result there (one image of a batch), else into a new tensor."""
        return ext.ops().bn_act_pool(_nhwc(x.float()), self.bn_a, self.bn_c, *self.act.args(),
                                     *self.pool, self.isa, out)  # fmt: skip

    def extra_repr(self) -> str:  # noqa: D102
        return f"fused: bn + act + maxpool{self.pool}"


class FusedStem(nn.Module):
    """The stem conv and its fused tail, one image at a time when the batch has several.

    A batch-16 ResNet-18 stem writes 51 MB of float32 before the max-pool reads it back;
    image by image, the 3.2 MB of one image are still partly in cache when the tail reads
    them (measured: 30 -> 23 ms for conv + tail at batch 16, docs/performance.md). The conv
    must give each image the same result alone as in the batch: checked once per input shape
    on the real input, and the whole batch goes through at once where it does not.
    """

    def __init__(self, conv: nn.Module, tail: FusedStemTail) -> None:
        super().__init__()
        self.conv, self.tail = conv, tail
        self._per_image: dict[tuple[int, ...], bool] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # an NCHW image costs the NHWC conv an internal reorder (+0.44 ms for a 224 px
        # ResNet-18 stem here); one explicit copy costs 0.06 ms and gives the same bits
        x = _nhwc(x)
        n = x.shape[0]
        if n == 1 or not self._per_image_ok(x):
            return self.tail(self.conv(x))
        first = self.tail(self.conv(x[:1]))
        out = torch.empty((n, *first.shape[1:]), memory_format=torch.channels_last)
        out[:1] = first
        for i in range(1, n):
            self.tail(self.conv(x[i : i + 1]), out[i : i + 1])
        return out

    def _per_image_ok(self, x: torch.Tensor) -> bool:
        key = tuple(x.shape)
        if key not in self._per_image:
            whole = self.conv(x)
            self._per_image[key] = all(
                torch.equal(whole[i : i + 1], self.conv(x[i : i + 1])) for i in (0, x.shape[0] - 1)
            )
        return self._per_image[key]


def _int(v: int | tuple[int, ...]) -> int:
    return v if isinstance(v, int) else v[0]


def _square(v: int | tuple[int, ...]) -> bool:
    return isinstance(v, int) or len(set(v)) == 1


def _poolable(pool: nn.Module) -> bool:
    """A max-pool the stem kernel computes exactly like ATen: square, no dilation or ceil mode."""
    return (
        isinstance(pool, nn.MaxPool2d)
        and not pool.ceil_mode
        and not pool.return_indices
        and _int(pool.dilation) == 1
        and all(_square(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
    )


# (bn, activation, max-pool or None) attribute names of the stems fuse_stem knows, applied in
# this order by their model's forward: timm ResNet, torchvision ResNet, recu's CifarResNet.
STEMS = (("bn1", "act1", "maxpool"), ("bn1", "relu", "maxpool"), ("bn1", "act1", None))


def fuse_stem(model: nn.Module, isa: int) -> bool:
    """Replace a known ResNet stem's conv -> bn -> act [-> maxpool] by one FusedStem, if exact."""
    kids = model._modules
    if kids.get("conv1") is None:  # the stem conv (float, or int8 with --fp-layers int8)
        return False
    for bn_key, act_key, pool_key in STEMS:
        bn, act_mod = kids.get(bn_key), kids.get(act_key)
        pool = kids.get(pool_key) if pool_key else None
        if not isinstance(bn, nn.BatchNorm2d) or act_mod is None:
            continue
        if pool_key is not None and not _poolable(pool):
            continue
        if pool_key is None and "maxpool" in kids:
            continue
        act = ActSpec.of(act_mod, bn.num_features)
        if act is None or exact_bn_terms(bn) is None:
            return False
        kids["conv1"] = FusedStem(kids["conv1"], FusedStemTail(bn, act, pool, isa))
        kids[bn_key] = nn.Identity()
        kids[act_key] = nn.Identity()
        if pool_key is not None:
            kids[pool_key] = nn.Identity()
        return True
    return False


def fuse_block(block: nn.Module) -> FusedBasicBlock | None:
    """The fused form of a converted basic block whose parts all run in xnor, else None."""
    if type(block) is not BiRealBasicBlock:
        return None
    c1, c2 = block.conv1, block.conv2
    if not (isinstance(c1, XnorConv2d) and isinstance(c2, XnorConv2d)):
        return None
    if any(not isinstance(m, nn.Identity) for m in (block.bn1, block.bn2, block.aa, block.se)):
        return None  # a BatchNorm that did not fold exactly, or an extra layer in between
    if c1.epilogue.bn_a is None or c2.epilogue.bn_a is None:
        return None
    act1 = ActSpec.of(block.act1, c1.out_channels)
    act2 = ActSpec.of(block.act2, c2.out_channels)
    if act1 is None or act2 is None or c2.in_channels != c1.out_channels:
        return None
    return FusedBasicBlock(c1, act1, c2, act2, block.downsample)


def fuse_model(model: nn.Module) -> int:
    """Fuse every eligible block and the stem in place; returns how many modules were fused."""
    count = 0
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            fused = fuse_block(child) if child is not None else None
            if fused is not None:
                parent._modules[key] = fused
                count += 1
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if (
                type(child) is nn.Sequential
                and len(child) > 1
                and all(isinstance(b, FusedBasicBlock) and b.chainable for b in child)
            ):
                parent._modules[key] = FusedStage(child)
    if count:
        isa = next(m for m in model.modules() if isinstance(m, FusedBasicBlock)).conv1._isa_code
        count += int(fuse_stem(model, isa))
    return count
