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

**The top of the U-Net on the coarse grid.** After both rewrites the same U-Net still spent a sixth of a window
at full resolution on 2 channels: the sub-pixel convolution's depth-to-space shuffle, its instance norm and PReLU,
and the folded 2-to-2 convolution (7.5 ms of a 67 ms window in OpenVINO, at a tenth of its convolution speed: its
blocked layouts pad 2 channels to 16). :class:`PhaseSpaceTail` keeps the sub-pixel convolution's 8 phases of each
class as channels instead (16 channels at 48^3 instead of 2 at 96^3). An instance norm over a class's full-resolution
voxels is then a group norm over its 8 phase channels (the same voxels, hence the same mean and variance), a
channel-wise activation stays one, and the 3x3x3 convolution becomes a 2x2x2 one between phase channels on a coarse
grid shifted by one fine voxel: fine output ``2c - 1 + q`` (``q`` = 0 or 1) reads fine inputs ``2c - 2 + q`` to
``2c + q``, which lie in coarse cells ``c - 1`` and ``c`` for both phases. That is 2.4 times the multiply-adds
(8 x 256 per coarse voxel against 8 x 108), at full vector width; one depth-to-space shuffle and a crop of the shifted
grid's extra voxel end it. On this project's 2-core AMD EPYC (Zen 4), 96^3 windows: 67 -> 63 ms in OpenVINO. Float32
only: it needs the folded residual.

**Reductions instead of a reshape, two convolutions instead of a concatenation.** In OpenVINO the tail's group norm
over phase channels (a reshape to groups around an MVN) cost two reorders of the tensor, and the top skip
connection's concatenation ran in its reference kernel: :func:`phase_group_norm` computes the norm from per-channel
means, and :class:`SkipIntoTail` splits the tail's first convolution over the concatenation's two parts: 64 -> 61
ms per window (medians of 15 alternated runs, twice). A two-class network's logit difference
(:class:`TwoClassDifference`, what the engine blends for it) is computed by the tail's last convolution itself:
61 -> 59 ms.

The rewritten network shares every weight of the original except the rearranged transposed-convolution weights
and folded convolutions (a few kilobytes on that U-Net), and is rebuilt when the original's weights change. Used
for the CPU's OpenVINO conversion (all the rewrites) and its low-precision windows (the sub-pixel one only: see
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


class PhaseSpaceTail(torch.nn.Module):
    """A stride-2 sub-pixel up-sampling to few channels, channel-wise norms and activations, and a 3x3x3 convolution
    (a folded identity residual), computed on the up-sampling's input grid; see the module doc. Same function, to
    float32 rounding. Build it with :func:`phase_space_tail`."""

    def __init__(self, up: SubPixelConvTranspose3d, between: list[torch.nn.Module], conv: torch.nn.Conv3d) -> None:
        super().__init__()
        classes, phases = up.out_channels, 8
        weight = up.weight.view(phases, classes, *up.weight.shape[1:]).transpose(0, 1)  # (class, phase) order
        self.register_buffer("up_weight", weight.reshape(classes * phases, *up.weight.shape[1:]).contiguous())
        bias = None if up.bias is None else up.bias.view(phases, classes).T.reshape(-1).contiguous()
        self.register_buffer("up_bias", bias)
        self.up_padding = up.padding
        self.steps = [(kind, value) for kind, value, _, _ in between]  # what runs between, in order
        self.register_buffer("group_average", group_average(classes * phases, classes).to(weight))
        for i, (_, _, weight, bias) in enumerate(between):  # weights repeated per phase
            self.register_buffer(f"step_weight_{i}", weight)
            self.register_buffer(f"step_bias_{i}", bias)
        kernel = conv.weight.detach()  # (out, in, 3, 3, 3)
        outputs = int(kernel.shape[0])
        shifted = kernel.new_zeros((outputs, 2, 2, 2, classes, 2, 2, 2, 2, 2, 2))  # out, q, in, phase, coarse tap
        for q in itertools.product((0, 1), repeat=3):
            for tap in itertools.product((0, 1, 2), repeat=3):
                fine = [a + t - 2 for a, t in zip(q, tap)]  # fine input 2c + fine, for fine output 2c - 1 + q
                phase, coarse = [f % 2 for f in fine], [f // 2 + 1 for f in fine]
                shifted[(slice(None), *q, slice(None), *phase, *coarse)] += kernel[(slice(None), slice(None), *tap)]
        self.register_buffer("conv_weight", shifted.reshape(outputs * 8, classes * 8, 2, 2, 2).contiguous())
        bias = None if conv.bias is None else conv.bias.detach().repeat_interleave(8).contiguous()
        self.register_buffer("conv_bias", bias)
        self.out_channels = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional = torch.nn.functional
        return self.after_up(functional.conv3d(functional.pad(x, self.up_padding), self.up_weight, self.up_bias))

    def after_up(self, y: torch.Tensor) -> torch.Tensor:
        """The block after its up-sampling's convolution: ``y`` holds 8 phase channels per class."""
        functional = torch.nn.functional
        for i, (kind, value) in enumerate(self.steps):
            weight, bias = getattr(self, f"step_weight_{i}"), getattr(self, f"step_bias_{i}")
            if kind == "norm":  # a class's full-resolution voxels are its 8 phase channels
                y = phase_group_norm(y, self.group_average, weight, bias, value)
            elif kind == "prelu":
                y = functional.prelu(y, weight)
            elif kind == "leaky":
                y = functional.leaky_relu(y, value)
            elif kind == "relu":
                y = functional.relu(y)
        z = functional.conv3d(functional.pad(y, [1] * 6), self.conv_weight, self.conv_bias)
        n, _, d, h, w = z.shape  # the shifted grid: one coarse cell more per axis
        z = z.view(n, self.out_channels, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        z = z.reshape(n, self.out_channels, 2 * d, 2 * h, 2 * w)
        return z[:, :, 1:-1, 1:-1, 1:-1]


def phase_group_norm(y: torch.Tensor, average: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """A group norm of ``y`` from per-channel reductions over its spatial axes. ``average`` (C, C, 1, 1, 1) maps
    per-channel values to their group's mean (see :func:`group_average`): every channel of a group has as many
    voxels, so the group's mean is the mean of its channels' means and its variance the mean of their mean squared
    deviations from it (two passes, as PyTorch's ``group_norm``).

    OpenVINO converts ``group_norm`` to a reshape to (N, groups, -1) around its MVN; on its blocked channel layout
    that reshape costs two reorders of the whole tensor (3 ms of a 64 ms 96^3 window of the U-Net of the module doc,
    by its per-layer profile); these reductions and per-channel maps run in that layout."""
    functional = torch.nn.functional
    deviation = y - functional.conv3d(y.mean((2, 3, 4), keepdim=True), average)
    variance = functional.conv3d((deviation * deviation).mean((2, 3, 4), keepdim=True), average)
    scale = torch.rsqrt(variance + eps)
    channels = y.shape[1]
    if weight is not None:
        scale = scale * weight.view(1, channels, 1, 1, 1)
    out = deviation * scale
    return out if bias is None else out + bias.view(1, channels, 1, 1, 1)


def group_average(channels: int, groups: int) -> torch.Tensor:
    """The (C, C, 1, 1, 1) pointwise convolution that replaces each channel's value by its group's mean."""
    size = channels // groups
    same = torch.arange(channels)[:, None] // size == torch.arange(channels)[None, :] // size
    return (same.float() / size).view(channels, channels, 1, 1, 1)


class SkipIntoTail(torch.nn.Module):
    """A MONAI U-Net's top skip connection (``cat([x, inner(x)])``) and the :class:`PhaseSpaceTail` that reads it,
    as two convolutions whose sum is the tail's up-sampling convolution of the concatenation: no concatenated
    tensor. OpenVINO ran that concatenation (32 channels at 48^3 on the U-Net of the module doc) with its reference
    kernel, 1.7 ms of a 64 ms window. Same function, to float32 rounding."""

    def __init__(self, inner: torch.nn.Module, tail: PhaseSpaceTail) -> None:
        super().__init__()
        self.inner, self.tail = inner, tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional, tail = torch.nn.functional, self.tail
        skipped, weight = self.inner(x), tail.up_weight
        channels = x.shape[1]  # the concatenation's first channels; its weights' first input channels
        y = functional.conv3d(functional.pad(x, tail.up_padding), weight[:, :channels], tail.up_bias)
        return tail.after_up(y + functional.conv3d(functional.pad(skipped, tail.up_padding), weight[:, channels:]))


def _skip_into_tail(children: dict) -> dict:
    """A Sequential's children with each ``cat`` skip connection followed by a :class:`PhaseSpaceTail` merged into
    one :class:`SkipIntoTail`."""
    from monai.networks.layers import SkipConnection

    names, merged, i = list(children), {}, 0
    while i < len(names):
        child = children[names[i]]
        following = children[names[i + 1]] if i + 1 < len(names) else None
        if (
            type(child) is SkipConnection
            and child.mode == "cat"
            and child.dim == 1
            and type(following) is PhaseSpaceTail
        ):
            merged[names[i]] = SkipIntoTail(child.submodule, following)
            i += 2
        else:
            merged[names[i]] = child
            i += 1
    return merged


class TwoClassDifference(torch.nn.Module):
    """A two-class network's logit difference ``l1 - l0``, in float32: one channel where the network returns two.

    Blending is linear, so blending the difference gives the difference of the blended logits, and ``(0, d)`` has
    the same argmax (the first class on a tie) and softmax as ``(l0, l1)``. The engine blends it for MONAI's
    two-class U-Nets and the like (see ``medseg.inference``): half the blending, and in :func:`for_cpu`'s float32
    rewrite a :class:`PhaseSpaceTail` computes the difference itself (its last convolution with half the outputs).
    Get it with :func:`two_class_difference`, which keeps one per network."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x)
        if logits.shape[1] != 2:
            raise ValueError(f"a two-class difference of a network returning {logits.shape[1]} channels")
        return logits[:, 1:2].float() - logits[:, 0:1].float()


def two_class_difference(network: torch.nn.Module) -> TwoClassDifference:
    """The :class:`TwoClassDifference` of ``network``, the same object on every call (caches key on it). Held in the
    network's ``__dict__``, outside its modules and state dict: a copy of the network gets its own (a shallow copy
    shares the dictionary's entry, which is then not its own and is replaced)."""
    held = network.__dict__.get("_medseg_two_class_difference")
    if held is None or held.network is not network:
        held = network.__dict__["_medseg_two_class_difference"] = TwoClassDifference(network)
    return held


def _difference_tail(tail: PhaseSpaceTail) -> PhaseSpaceTail | None:
    """``tail`` returning its two classes' difference (the last convolution's class-1 minus class-0 phase kernels:
    the same sums, half the outputs); None for another class count."""
    if tail.out_channels != 2:
        return None
    weight = tail.conv_weight.view(2, 8, *tail.conv_weight.shape[1:])
    difference = copy.copy(tail)
    difference._buffers = dict(tail._buffers)  # the copy's own: the original keeps its buffers
    difference.conv_weight = (weight[1] - weight[0]).contiguous()
    if tail.conv_bias is not None:
        bias = tail.conv_bias.view(2, 8)
        difference.conv_bias = (bias[1] - bias[0]).contiguous()
    difference.out_channels = 1
    return difference


def _folded_difference(rewritten: torch.nn.Module) -> torch.nn.Module | None:
    """A rewritten MONAI U-Net whose top block is a two-class :class:`PhaseSpaceTail` (alone or in a
    :class:`SkipIntoTail`), returning the difference itself; None for any other network."""
    from monai.networks.nets import UNet

    if type(rewritten) is not UNet or type(rewritten.model) is not torch.nn.Sequential or not len(rewritten.model):
        return None
    names = list(rewritten.model._modules)
    last = rewritten.model._modules[names[-1]]
    if type(last) is SkipIntoTail and (tail := _difference_tail(last.tail)) is not None:
        replaced = SkipIntoTail(last.inner, tail)
    elif type(last) is PhaseSpaceTail and (tail := _difference_tail(last)) is not None:
        replaced = tail
    else:
        return None
    model = copy.copy(rewritten.model)
    model._modules = {**rewritten.model._modules, names[-1]: replaced}
    network = copy.copy(rewritten)
    network._modules = {**rewritten._modules, "model": model}
    return network


def _phase_wise(module: torch.nn.Module, classes: int) -> tuple | None:
    """``module`` as a :class:`PhaseSpaceTail` step (kind, eps or slope, weight, bias), weights repeated per phase;
    None for a module that is not channel-wise in evaluation."""
    kind = type(module)
    if kind is torch.nn.Identity:
        return ("identity", 0.0, None, None)
    if kind in (torch.nn.Dropout, torch.nn.Dropout3d):
        return None if module.training and module.p else ("identity", 0.0, None, None)
    if kind is torch.nn.InstanceNorm3d:
        if module.num_features != classes or module.track_running_stats:
            return None  # running statistics: a per-channel affine map in evaluation (MONAI's default keeps none)
        weight = bias = None
        if module.affine:
            weight = module.weight.detach().repeat_interleave(8).contiguous()
            bias = module.bias.detach().repeat_interleave(8).contiguous()
        return ("norm", float(module.eps), weight, bias)
    if kind is torch.nn.PReLU:
        weight = module.weight.detach()
        if weight.numel() not in (1, classes):
            return None
        return ("prelu", 0.0, (weight if weight.numel() == 1 else weight.repeat_interleave(8)).contiguous(), None)
    if kind is torch.nn.LeakyReLU:
        return ("leaky", float(module.negative_slope), None, None)
    if kind is torch.nn.ReLU:
        return ("relu", 0.0, None, None)
    return None


def phase_space_tail(module: torch.nn.Module) -> PhaseSpaceTail | None:
    """A MONAI U-Net's top up-sampling block (``Sequential(Convolution(transposed, stride 2, norm and activation),
    ResidualUnit(conv(x) + x))``) as a :class:`PhaseSpaceTail`; None for any other module."""
    if type(module) is not torch.nn.Sequential or len(module) != 2:
        return None
    first, unit = module[0], module[1]
    children = dict(first.named_children()) if isinstance(first, torch.nn.Sequential) else {}
    up = children.get("conv")
    if up is None or set(children) - {"conv", "adn"} or not subpixel_eligible(up):
        return None
    if up.out_channels >= SUBPIXEL_MAX_OUT_CHANNELS:
        return None
    if tuple(int(s) for s in up.stride) != (2, 2, 2):
        return None
    conv = folded_residual(unit)
    if conv is None or tuple(conv.kernel_size) != (3, 3, 3) or conv.in_channels != up.out_channels:
        return None
    adn = children.get("adn")
    steps = []
    for step in [] if adn is None else list(adn.children()):
        converted = _phase_wise(step, up.out_channels)
        if converted is None:
            return None
        if converted[0] != "identity":
            steps.append(converted)
    return PhaseSpaceTail(SubPixelConvTranspose3d(up), steps, conv)


def _rewritten_module(child: torch.nn.Module, fold: bool) -> torch.nn.Module | None:
    if fold and (tail := phase_space_tail(child)) is not None:
        return tail
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
    children = {**module._modules, **changed}
    if fold and type(module) is torch.nn.Sequential:
        children = _skip_into_tail(children)
    if fold and type(module) is TwoClassDifference and (folded := _folded_difference(children["network"])):
        return folded
    clone = copy.copy(module)  # the same parameters and buffers; only the children on the way are new
    clone._modules = children
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
