"""Exact rewrites of a network for faster CPU windows: the same function, computed another way (to float32
rounding: the same products, summed in another order).

**Sub-pixel transposed convolutions.** A MONAI U-Net's last up-sampling is a ``ConvTranspose3d`` from its 32
features to the classes, 3x3x3, stride 2. OpenVINO's and oneDNN's CPU kernels run a transposed convolution with
so few output channels at an eighth of their convolution speed: on the 4.8 M-parameter U-Net, 96^3 windows, that one
layer took 18 % of OpenVINO's time. A transposed convolution whose output is exactly ``stride`` times its input
(``kernel + output_padding - 2 padding == stride`` on every axis) is an ordinary convolution on the *input* grid
with ``stride^3`` times the output channels, one group of channels per output phase, followed by a depth-to-space
shuffle (the "sub-pixel" convolution of Shi et al., 2016). Output voxel ``s m + r`` of a phase ``r`` receives the
input voxels ``m + d`` with ``d = (r + padding - k) / stride`` for the kernel taps ``k`` where that is an integer;
the rewrite places each tap at its offset and zero elsewhere. The sums are the same products in another order, so
the logits agree to float32 rounding (4e-6 of a logit range of 8 on that U-Net).

Measured on this project's 2-core Xeon (AMX), U-Net above, window batch 2: OpenVINO float32 0.061 -> 0.053 s per
96^3 window; PyTorch bfloat16 0.045 -> 0.039 s. Only layers with fewer than :data:`SUBPIXEL_MAX_OUT_CHANNELS`
output channels are rewritten: with 16 or more, the stride^3 wider convolution did as well as the original, not
better (the rewrite multiplies the products by 64/27 for a 3x3x3 kernel).

**Folded identity residuals.** The same U-Net ends in a MONAI ``ResidualUnit`` that is one convolution (no norm,
no activation) plus its input: ``conv(x) + x``, a 2-channel addition at full resolution that OpenVINO ran at 4 ms
per window (its blocked layouts pad 2 channels to 16). Adding 1 to the centre tap of each channel's own kernel
computes the same sum inside the convolution: 0.058 -> 0.055 s per window.

The rewritten network shares every weight of the original except the rearranged transposed-convolution weights
and folded convolutions (a few kilobytes on that U-Net), and is rebuilt when the original's weights change. Used
for the CPU's OpenVINO conversion (both rewrites) and its low-precision windows (the sub-pixel one only: see
:func:`for_cpu`); PyTorch's float32 windows, the reference, run the network as it is.
"""

from __future__ import annotations

import copy
import itertools
import threading
import weakref

import torch

#: Transposed convolutions with fewer output channels than this are rewritten (see the module doc).
SUBPIXEL_MAX_OUT_CHANNELS = 16

_rewritten: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # network -> {float32: (state, rewritten)}
_lock = threading.Lock()


def weights_state(network: torch.nn.Module) -> tuple:
    """Where each of the network's tensors lives and its in-place-change counter: changes when a weight is
    replaced or updated in place (an optimiser step, ``load_state_dict``), without hashing the weights."""
    return tuple((t.data_ptr(), t._version) for t in network.state_dict().values())


def _phase_taps(kernel: int, stride: int, padding: int) -> list[list[tuple[int, int]]]:
    """Per output phase ``r`` (0 <= r < stride): the ``(input offset, kernel tap)`` pairs feeding it."""
    return [
        [((r + padding - k) // stride, k) for k in range(kernel) if (r + padding - k) % stride == 0]
        for r in range(stride)
    ]


class SubPixelConvTranspose3d(torch.nn.Module):
    """A ``ConvTranspose3d`` whose output is ``stride`` times its input, computed as a convolution on the input
    grid into ``prod(stride)`` phases of the output channels and a depth-to-space shuffle. Same function, to
    float32 rounding; see the module doc."""

    def __init__(self, conv: torch.nn.ConvTranspose3d) -> None:
        super().__init__()
        if not subpixel_eligible(conv):
            raise ValueError(f"not an exact stride-multiple transposed convolution: {conv}")
        weight = conv.weight.detach()  # (in, out, *kernel)
        inputs, outputs = int(weight.shape[0]), int(weight.shape[1])
        stride = tuple(int(s) for s in conv.stride)
        taps = [_phase_taps(int(k), s, int(p)) for k, s, p in zip(conv.kernel_size, stride, conv.padding)]
        low = [min(d for phase in axis for d, _ in phase) for axis in taps]
        high = [max(d for phase in axis for d, _ in phase) for axis in taps]
        size = [h - lo + 1 for lo, h in zip(low, high)]
        fused = weight.new_zeros((*stride, outputs, inputs, *size))
        for phase in itertools.product(*(range(s) for s in stride)):
            for (da, ka), (db, kb), (dc, kc) in itertools.product(*(axis[r] for axis, r in zip(taps, phase))):
                fused[(*phase, slice(None), slice(None), da - low[0], db - low[1], dc - low[2])] = weight[
                    :, :, ka, kb, kc
                ].T
        self.register_buffer("weight", fused.reshape(-1, inputs, *size).contiguous())
        bias = None if conv.bias is None else conv.bias.detach().repeat(stride[0] * stride[1] * stride[2])
        self.register_buffer("bias", bias)
        # pad's order: last axis first, (before, after); every offset range holds 0 (see subpixel_eligible)
        self.padding = [v for lo, h in reversed(list(zip(low, high))) for v in (-lo, h)]
        self.stride, self.out_channels = stride, outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, d, h, w = x.shape
        y = torch.nn.functional.conv3d(torch.nn.functional.pad(x, self.padding), self.weight, self.bias)
        sa, sb, sc = self.stride
        y = y.view(n, sa, sb, sc, self.out_channels, d, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
        return y.reshape(n, self.out_channels, d * sa, h * sb, w * sc)


def subpixel_eligible(conv: torch.nn.Module) -> bool:
    """A plain 3D transposed convolution whose output is exactly ``stride`` times its input on every axis."""
    if type(conv) is not torch.nn.ConvTranspose3d or conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    if any(int(d) != 1 for d in conv.dilation) or all(int(s) == 1 for s in conv.stride):
        return False
    for k, s, p, o in zip(conv.kernel_size, conv.stride, conv.padding, conv.output_padding):
        if int(k) + int(o) - 2 * int(p) != int(s):
            return False
        offsets = [d for phase in _phase_taps(int(k), int(s), int(p)) for d, _ in phase]
        if not offsets or min(offsets) > 0 or max(offsets) < 0:  # the padding below assumes 0 is among them
            return False
    return True


def folded_residual(unit: torch.nn.Module) -> torch.nn.Conv3d | None:
    """A MONAI ``ResidualUnit`` computing ``conv(x) + x`` with a single plain convolution, as one convolution whose
    centre taps hold the identity; None for any other module."""
    from monai.networks.blocks import ResidualUnit

    if type(unit) is not ResidualUnit or type(unit.residual) is not torch.nn.Identity:
        return None
    units = list(unit.conv.children())
    parts = list(units[0].children()) if len(units) == 1 else []
    if len(parts) != 1 or type(parts[0]) is not torch.nn.Conv3d:  # a conv-only unit: no norm, dropout or activation
        return None
    conv = parts[0]
    kernel = tuple(int(k) for k in conv.kernel_size)
    if conv.in_channels != conv.out_channels or conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    if any(int(s) != 1 for s in conv.stride) or any(int(d) != 1 for d in conv.dilation):
        return None
    if any(k % 2 == 0 or int(p) != k // 2 for k, p in zip(kernel, conv.padding)):  # output on the input's grid
        return None
    folded = torch.nn.Conv3d(
        conv.in_channels,
        conv.out_channels,
        kernel,
        padding=conv.padding,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        weight = conv.weight.detach().clone()
        centre = tuple(k // 2 for k in kernel)
        channels = torch.arange(conv.out_channels)
        weight[(channels, channels, *centre)] += 1.0
        folded.weight.copy_(weight)
        if conv.bias is not None:
            folded.bias.copy_(conv.bias.detach())
    return folded.eval().requires_grad_(False)


def _rewritten_module(child: torch.nn.Module, fold: bool) -> torch.nn.Module | None:
    if subpixel_eligible(child) and child.out_channels < SUBPIXEL_MAX_OUT_CHANNELS:
        return SubPixelConvTranspose3d(child)
    return folded_residual(child) if fold else None


def _replaced(module: torch.nn.Module, fold: bool) -> torch.nn.Module:
    """``module``, or a shallow copy sharing its parameters with rewritten descendants."""
    changed = {}
    for name, child in module._modules.items():
        if child is None:
            continue
        rewritten = _rewritten_module(child, fold)
        if rewritten is not None:
            changed[name] = rewritten
        else:
            new = _replaced(child, fold)
            if new is not child:
                changed[name] = new
    if not changed:
        return module
    clone = copy.copy(module)  # the same parameters and buffers; only the children on the way are new
    clone._modules = {**module._modules, **changed}
    return clone


def for_cpu(network: torch.nn.Module, *, float32: bool = True) -> torch.nn.Module:
    """``network`` with the rewrites of the module doc; ``network`` itself when none applies. Kept for the life of
    the network and rebuilt when its weights change.

    ``float32=False`` (windows in low precision) leaves identity residuals alone: a centre tap of 1 + w in
    bfloat16 would round the identity term, which the addition keeps exact.
    """
    state = weights_state(network)
    with _lock:
        held = _rewritten.setdefault(network, {})
        if held.get(float32, (None,))[0] == state:
            rewritten = held[float32][1]
            return network if rewritten is None else rewritten
        with torch.no_grad():
            rewritten = _replaced(network, fold=float32)
        held[float32] = (state, None if rewritten is network else rewritten)  # no strong reference to the key
        return rewritten
