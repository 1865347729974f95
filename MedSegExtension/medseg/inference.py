"""Sliding-window inference on the chosen device, built for speed and a small memory footprint.

The input is the preprocessed (C, X, Y, Z) float32 array; the output is (K, X, Y, Z) class probabilities
(softmax of the blended logits), K = labels + background.

The windows, their order-independent blending weights and the padding of small volumes are MONAI's
(``sliding_window_inference`` with the card's window, overlap and blend mode), so in float32 the result equals
plain MONAI's to rounding. What differs is how the work is done:

* **Window batches** that keep oneDNN on its fast path on the CPU (PyTorch runs a single 3D window through a much
  slower im2col convolution), and on a GPU a batch chosen after a one-window probe so that the batch, the blending
  slab and a result kept on the device fit the free memory and the run's budget (``gpu_memory_gib``, default
  :data:`DEFAULT_GPU_MEMORY_GIB`). On a GPU the windows run with cuDNN's autotuned convolutions in the
  networks' own layout (NCDHW: channels-last was slower on an H200, for both U-Net and DynUNet, whose instance
  norms dominate), and float16 windows are checked for overflow (a run that overflows is redone in float32).
* **Precision.** ``fp32``, ``bf16`` or ``fp16`` autocast, or ``auto``: the low precision the device runs fast
  (bf16 on CPUs with AMX/AVX-512-BF16, fp16 on GPUs), *checked against float32*. The window batch nearest the
  centre runs in both precisions first: on the CPU the central half of each of its windows (:func:`trial_crop`,
  an eighth of the work; whole windows where they are small or the network refuses that size), on a GPU its
  first :data:`GPU_TRIAL_WINDOWS` windows (a whole batch keeps its float32 logits). If the low precision changed
  more than :data:`DISAGREEMENT_BUDGET` of its labels (an unsure model: an untrained one, whose logits nearly tie
  everywhere), the run is float32. Otherwise the rest runs in low precision; the largest margin change seen in
  the trial is the error bound, and after blending the voxels within that bound of a tie, times the trial's label
  flips per such voxel, estimate how many labels could differ from float32. Above the budget, the run is redone
  in float32. A trained model runs at low-precision speed and agrees with float32 in all but a few voxels in
  10 000. The trial runs on every input, but for one exception: a trial that refuses the low precision
  decisively (:data:`REMEMBERED_REFUSAL_FACTOR`) is remembered for the network, and its later runs in the process
  go to float32 without one. Float32 is the reference, so what ran before can make a result float32, never less
  exact.
* **Slab streaming.** Windows run in order along the volume's longest axis; the part of the volume no later
  window touches is finished (normalised, softmax) at once. On a GPU only a slab of C × window-depth voxels
  accumulates on the device and finished slabs go to the host (in ``out_dtype``, float16 halves it) through pinned
  memory, the copy overlapping the next windows' work, so there is no C × X × Y × Z float32 buffer on the GPU; on
  the CPU the logits accumulate in the output array itself. A caller that carries on on the GPU can keep the
  result there (``keep_on_device``) when it fits the budget: the logits then accumulate in it. A caller that wants
  labels on the network's grid gets them slab by slab (``labels_only``: no class maps at all). The input goes to
  the GPU once, from pinned memory.
* **The CPU's windows run in OpenVINO** when it is installed (``backend="auto"``): float32 about twice PyTorch's
  speed for 3D U-Nets, within float32 rounding of PyTorch's logits (:mod:`medseg.backends`), and bfloat16, on a
  CPU that runs it fast, 1.6 to 1.8 times autocast's speed, with autocast's peak memory (since session 14; about
  75 MiB more held between runs). The trial compares PyTorch's float32 with OpenVINO's bf16 on the same crops (run
  by the same bf16 compilation as the windows), so it measures what runs. A network OpenVINO cannot take runs in
  PyTorch, with a note; ``backend="torch"`` keeps everything there.
* **Cached blending weights** per window size and mode.
* **Fewer channels blended** where the logits are a linear map of something smaller: a many-class DynUNet's
  features before its 1x1x1 head, a two-class network's logit difference (:func:`_feature_split`).
* **Test-time mirroring** (optional): each window is also run flipped along the chosen axes and the logits
  averaged, as nnU-Net does. Off by default.
* **Out of memory** on a GPU: the batch is halved down to 1, then the run moves to the CPU, and the log says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import logging
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from . import backends, rewrite
from .errors import MedSegError
from .models.card import InferenceSettings, valid_axes
from .progress import RunControl

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: The autocast dtype each forced precision runs in (None: float32, no autocast).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``auto`` keeps low precision only when it changes at most this fraction of the labels (trial batch and estimate).
DISAGREEMENT_BUDGET = 5e-4
#: The CPU default window batch: 2 keeps PyTorch on oneDNN's convolution (a batch of 1 takes a path about 2x slower).
CPU_WINDOW_BATCH = 2
#: ``auto`` runs volumes of fewer window batches in float32: the trial would cost more than it saves.
MIN_GROUPS_FOR_TRIAL = 3
#: Upper bound of the GPU window batch, whatever the free memory.
MAX_GPU_WINDOW_BATCH = 16
#: GPU memory a run may use by default (window batch, blending slab, a result kept on the device), in GiB: enough
#: for every bundled model at full speed, and room left on a shared workstation card. ``gpu_memory_gib`` changes it.
DEFAULT_GPU_MEMORY_GIB = 6.0
#: Windows in the float32 trial of ``auto`` on a GPU (on the CPU, the trial is one window batch of 2).
GPU_TRIAL_WINDOWS = 2
#: OpenVINO's float32 windows: at least this many labels are assumed to change per voxel within its rounding of a
#: tie. Its check window (seeded noise) shows 0.02 for the untrained U-Net and DynUNet, but on a CT the flat regions
#: tie together: there 0.16 (U-Net, 2 classes) and about 0.6 (DynUNet, 105 classes) changed per such voxel.
OPENVINO_MIN_FLIPS_PER_RISK = 0.25
#: The CPU trial runs on central crops of its windows only when a crop keeps at least this many voxels: enough
#: labels to resolve the 0.05 % budget (16 voxels in 32 768). A smaller window's whole trial costs little anyway.
MIN_TRIAL_CROP_VOXELS = 32**3
#: Finished slabs are normalised and turned into probabilities or labels in chunks of about this many bytes of
#: logits on a GPU, so their temporaries stay small next to the slab (105 classes on a 273 x 273 cross-section: 12
#: slices), with few kernel launches per chunk.
FLUSH_CHUNK_BYTES = 128 * 2**20
#: The same on the CPU, where a chunk's temporaries (its weights, margins, probabilities: about 2.5 times a 2-class
#: chunk) stay in the heap after it: 4 MiB chunks took the bf16-in-OpenVINO runs of a 256x256x160 CT from peaks
#: of 391 to 431 MiB to 364 to 375 (6 runs, twice each), where OpenVINO's working memory leaves the windows'
#: freed memory nothing to reuse; PyTorch's runs and the times were unchanged.
CPU_FLUSH_CHUNK_BYTES = 4 * 2**20
#: A trial that finds low precision changing more than this many times :data:`DISAGREEMENT_BUDGET` of the labels is
#: remembered for the network (its weights unchanged) in this process: its later runs go to float32 without another
#: trial. Such near ties are the network's, not one scan's (the untrained U-Net changed 0.23 to 0.37 % in the
#: README's measurements), while a narrow refusal, a float16 overflow or a pass is tried again on every input.
REMEMBERED_REFUSAL_FACTOR = 4.0


class DeviceError(MedSegError):
    """The requested compute device does not exist here."""


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA GPU when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as named."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} was asked for, but PyTorch sees no CUDA GPU here; use --device cpu or auto"
            )
        try:
            device = torch.device(name)
        except RuntimeError:  # cuda:abc, cuda:-1, cudax
            raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
        return device
    raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class InferenceOptions:
    """How to run the windows; none of it changes which windows run or how they are blended.

    Attributes:
        precision: ``auto`` (verified low precision, see the module doc), ``fp32``, ``bf16`` or ``fp16``.
        window_batch: windows per network call; None: :data:`CPU_WINDOW_BATCH` on the CPU, planned on a GPU.
        mirror_axes: spatial axes (0, 1, 2 = x, y, z) to mirror for test-time augmentation, among those the model
            card allows (``inference.mirror_axes``: the axes its training flipped); ``"model"`` for all of those;
            () for none. See :func:`mirror_axes_for`.
        backend: what runs the windows on the CPU: ``auto`` (float32 and, on a CPU with fast bf16, bf16 in
            OpenVINO when installed and the network converts, else PyTorch), ``torch``, or ``openvino`` (float32
            and bf16 in OpenVINO; an error when it cannot be used). GPUs and float16 always run in PyTorch.
        gpu_memory_gib: on a GPU, the memory the process may hold there during the run: the run's input and
            weights, its window batch, blending slab and a result kept on the device, and what else the process
            already holds (never more than is free); None for :data:`DEFAULT_GPU_MEMORY_GIB`.
        blend_features: where the network ends in a pointwise head with fewer input features than classes (a
            many-class DynUNet), blend the features and apply the head after blending; for a two-class MONAI
            network, blend the difference of its two logits. The same logits to float32 rounding, with a smaller
            slab and window output. False blends the logits, as MONAI does.
    """

    precision: str = "auto"
    window_batch: int | None = None
    mirror_axes: tuple[int, ...] | str = ()
    backend: str = "auto"
    gpu_memory_gib: float | None = None
    blend_features: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.window_batch is not None and self.window_batch < 1:
            raise ValueError(f"window_batch must be at least 1, got {self.window_batch}")
        if self.gpu_memory_gib is not None and not self.gpu_memory_gib > 0:
            raise ValueError(f"gpu_memory_gib must be positive, got {self.gpu_memory_gib}")
        if self.backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; use one of {', '.join(backends.BACKENDS)}")
        if self.backend == "openvino" and self.precision == "fp16":
            raise ValueError(
                "backend openvino runs float32 and bf16 windows; fp16 runs in PyTorch: use precision bf16 or "
                "backend auto or torch"
            )
        if isinstance(self.mirror_axes, str):
            if self.mirror_axes != "model":
                raise ValueError(f"mirror_axes must be axes among 0, 1, 2 or 'model', got {self.mirror_axes!r}")
        elif not valid_axes(self.mirror_axes):
            raise ValueError(f"mirror_axes must be distinct spatial axes among 0, 1, 2, got {self.mirror_axes}")


AXIS_NAMES = "xyz"


def mirror_axes_for(options: InferenceOptions, settings: InferenceSettings) -> tuple[int, ...]:
    """The axes test-time mirroring uses: the card's for ``"model"``, else the ones asked for if the card allows them.

    A network answers a mirrored input with the mirrored answer only along axes its training flipped; along any
    other averaging mirrored predictions ruins the result: mirrored along x, y and z, the bundled hippocampus
    model (trained with x flips) fell from Dice 0.89 / 0.87 to 0.09 / 0.06. So the card's ``inference.mirror_axes``
    bounds what may be asked for.

    Raises:
        ValueError: mirroring asked for along an axis the card does not allow, or ``"model"`` for a card allowing none.
    """
    allowed = tuple(settings.mirror_axes or ())
    asked = allowed if options.mirror_axes == "model" else tuple(sorted(options.mirror_axes))
    if options.mirror_axes == "model" and not allowed or set(asked) - set(allowed):
        if settings.mirror_axes is None:
            why = (
                "the model card does not list the axes its training flipped (inference.mirror_axes; cards written "
                "before MedSeg recorded them do not); add them to the card to mirror along them"
            )
        elif not allowed:
            why = "the model card allows no mirror axis (inference.mirror_axes is empty: its training flipped none)"
        else:
            names = ", ".join(AXIS_NAMES[a] for a in allowed)
            why = f"the model card allows only {names} (inference.mirror_axes, the axes its training flipped)"
        refused = ", ".join(AXIS_NAMES[a] for a in sorted(set(asked) - set(allowed)))
        raise ValueError(f"test-time mirroring{' along ' + refused if refused else ''}: {why}")
    return asked


@dataclass
class InferenceReport:
    """What a run did: for logs, the benchmark and the result's record."""

    device: str = "cpu"
    precision: str = "fp32"  #: the precision the result was computed in
    backend: str = "torch"  #: what ran the result's windows: ``torch`` or ``openvino``
    window_batch: int = 1
    windows: int = 0
    mirror_axes: tuple[int, ...] = ()  #: test-time mirroring's axes (each window ran 2 ** len times)
    blended_channels: int = 0  #: channels blended per voxel: the classes, or the features before a pointwise head
    # auto only:
    trial_shape: tuple[int, ...] | None = None  #: the trial windows' size: on the CPU their central half
    error_bound: float | None = None  #: largest change of a top-class margin in the trial batch
    calibration_disagreement: float | None = None  #: labels the low precision changed in the trial batch
    at_risk_fraction: float | None = None  #: voxels whose blended margin is within the error bound
    estimated_disagreement: float | None = None  #: at-risk fraction times the trial batch's flips per at-risk voxel
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- windows


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's window step per axis (``monai.inferers.utils._get_scan_interval``)."""
    steps = []
    for size, roi in zip(image_size, roi_size):
        steps.append(int(roi) if roi == size else max(int(roi * (1 - overlap)), 1))
    return tuple(steps)


def axis_starts(size: int, roi: int, step: int) -> list[int]:
    """Window starts along one axis, as MONAI's ``dense_patch_slices`` places them (last one flush with the end)."""
    roi = min(roi, size)
    count = next((d for d in range(math.ceil(size / step)) if d * step + roi >= size), 0) + 1
    return [i * step - max(i * step + roi - size, 0) for i in range(count)]


def window_starts(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[tuple[int, int, int]]:
    """Every window's start (x, y, z) on an image already padded to at least the window size."""
    steps = scan_interval(image_size, roi_size, overlap)
    per_axis = [axis_starts(s, r, t) for s, r, t in zip(image_size, roi_size, steps)]
    return [tuple(p) for p in itertools.product(*per_axis)]


def padding_for(shape: Sequence[int], roi_size: Sequence[int]) -> list[tuple[int, int]]:
    """MONAI's symmetric padding (before, after) per axis of a volume smaller than the window."""
    pads = []
    for size, roi in zip(shape, roi_size):
        diff = max(int(roi) - int(size), 0)
        pads.append((diff // 2, diff - diff // 2))
    return pads


def count_windows(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Number of sliding windows MONAI makes for ``shape`` (spatial dims only)."""
    padded = [max(s, r) for s, r in zip(shape, roi_size)]
    return len(window_starts(padded, roi_size, overlap))


@functools.lru_cache(maxsize=8)
def _blend_weights(roi_size: tuple[int, ...], mode: str) -> torch.Tensor:
    """MONAI's importance map for one window (on the CPU), cached per size and mode."""
    from monai.data.utils import compute_importance_map

    weights = compute_importance_map(roi_size, mode=mode, sigma_scale=0.125, device="cpu", dtype=torch.float32)
    return weights.to(torch.float32)


# ------------------------------------------------------------------------------------------------- precision


def low_precision_for(device: torch.device) -> torch.dtype | None:
    """The autocast dtype this device runs faster than float32, or None when there is none.

    On a GPU float16: its tensor cores run it as fast as bfloat16, and its 3 more mantissa bits change fewer labels
    (on the CPU, a U-Net's fp16 windows agreed with float32 on 99.96 % of the voxels, bf16's on 99.7 %). Its
    narrower range is guarded: a window batch that overflows sends the run back to float32.
    """
    if device.type == "cuda":
        return torch.float16
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and (_probe(cpu, "_is_amx_tile_supported") or _probe(cpu, "_is_avx512_bf16_supported")):
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """The name of the precision that runs in an autocast ``dtype`` (None: ``"fp32"``)."""
    return next(name for name, value in AUTOCAST_DTYPES.items() if value == dtype)


def _probe(module, name: str) -> bool:
    function = getattr(module, name, None)
    try:
        return bool(function()) if function is not None else False
    except RuntimeError:  # pragma: no cover - probes that fail mean "not supported"
        return False


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def top_two(logits: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The index of the largest logit along ``dim`` (first one on ties, as ``argmax``) and its margin over the next.

    On the CPU a running pass over the classes (PyTorch's CPU ``argmax``/``topk`` along a leading axis are many times
    slower); on a GPU three reductions, since the running pass launches a few kernels per class (105 classes: over
    400 launches per finished chunk).
    """
    return _top_two_running(logits, dim) if logits.device.type == "cpu" else _top_two_reduced(logits, dim)


def _index_dtype(classes: int) -> torch.dtype:
    return torch.uint8 if classes < 256 else torch.int64


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a NumPy dtype."""
    return torch.from_numpy(np.zeros(0, dtype)).dtype


def _top_two_running(logits: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    classes = logits.unbind(dim)
    if len(classes) == 2:  # two classes: one comparison and one difference
        first, second = classes
        return (second > first).to(torch.uint8), (second - first).abs_()
    best = classes[0].clone()
    index = torch.zeros(best.shape, dtype=_index_dtype(len(classes)), device=best.device)
    second = torch.full_like(best, float("-inf"))
    for k, value in enumerate(classes[1:], start=1):
        better = value > best
        second = torch.where(better, best, torch.maximum(second, value))
        best = torch.where(better, value, best)
        index.masked_fill_(better, k)
    return index, best - second


def _top_two_reduced(logits: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    best, index = logits.max(dim)  # the first maximum on ties
    second = logits.scatter(dim, index.unsqueeze(dim), float("-inf")).amax(dim)
    return index.to(_index_dtype(logits.shape[dim])), best - second


def top_two_margin(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Difference between the largest and the second largest logit along ``dim`` (0 where they tie)."""
    return top_two(logits, dim)[1]


# ------------------------------------------------------------------------------------------------ window batch


def window_batch_for(available: int, per_window: int, slab_bytes, windows: int) -> int:
    """The largest GPU window batch whose windows (``per_window`` bytes each) and blending slab fit ``available``.

    ``slab_bytes(batch)`` is the slab's size for that batch: a batch spanning more window positions along the
    streaming axis keeps a deeper slab open.
    """
    for batch in range(min(MAX_GPU_WINDOW_BATCH, windows), 0, -1):
        if slab_bytes(batch) + batch * max(per_window, 0) <= available:
            return batch
    return 1


def slab_depth(starts: Sequence[Sequence[int]], batch: int, roi: Sequence[int], axis: int, size: int) -> int:
    """Voxels along ``axis`` the blending slab must hold for windows (sorted along it) run ``batch`` at a time."""
    spans = [max(s[axis] for s in g) - min(s[axis] for s in g) for g in _batches(list(starts), batch)]
    return min(size, max(spans) + roi[axis])


@dataclass
class _GpuPlan:
    """What a GPU run may allocate, from a one-window probe: its window batch, and where the result can live."""

    batch: int
    available: int  #: bytes the run may allocate beyond what the process held before it
    per_window: int  #: a window's working memory (activations, logits) measured by the probe
    classes: int
    voxels: int  #: of the padded volume
    slab_bytes: object  #: batch -> bytes of the blending slab
    held: int = 0  #: bytes the process held on the card before the probe (its input, weights, other tensors)

    def working(self, batch: int) -> int:
        """Bytes a batch of windows and its blending slab take."""
        return self.slab_bytes(batch) + batch * self.per_window

    def output_dtype(self, batch: int, requested: np.dtype) -> np.dtype | None:
        """The dtype of a result kept on the GPU (``requested``, else float16), or None: it goes to the host."""
        working = self.working(batch)
        for dtype in dict.fromkeys([np.dtype(requested), np.dtype(np.float16)]):
            if working + self.classes * self.voxels * dtype.itemsize <= self.available:
                return dtype
        return None


def _plan_gpu_memory(runner, one, device, starts, roi, axis, shape, options, classes=None) -> _GpuPlan | None:
    """On a GPU, probe one window's memory and plan the batch within the memory budget; None on the CPU.

    ``classes``: of the result. The slab blends as many channels as a window returns (the features before a
    pointwise head, or the logits).
    """
    if device.type != "cuda":
        return None
    before = torch.cuda.memory_allocated(device)
    logits, per_window = _peak_bytes(device, lambda: runner(one))
    blended = int(logits.shape[1])
    classes = classes or blended
    del logits
    free, _ = torch.cuda.mem_get_info(device)
    # what PyTorch's allocator holds but has not handed out (the GPU preprocessing's freed blocks) is free to this run
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    limit = (options.gpu_memory_gib or DEFAULT_GPU_MEMORY_GIB) * 2**30
    # the budget covers what the process holds on the card (as a peak measured there does); none left is batch 1
    available = max(0, int(min(free * 0.9, limit - before)))
    cross = math.prod(shape) // shape[axis]

    def slab_bytes(batch: int) -> int:  # accumulator and weights, a finished chunk's temporaries, the labels
        depth = slab_depth(starts, batch, roi, axis, shape[axis])
        slab = (blended + 1) * cross * depth * 4
        # a finished chunk's logits: after a pointwise head, all the classes (as _flush sizes its chunks)
        channels = max(blended, classes)
        chunk = min(channels * cross * depth * 4, max(FLUSH_CHUNK_BYTES, channels * cross * 4))
        return slab + 4 * chunk + math.prod(shape)

    batch = window_batch_for(available, per_window, slab_bytes, len(starts))
    return _GpuPlan(batch, available, per_window, classes, math.prod(shape), slab_bytes, before)


def _peak_bytes(device: torch.device, function):
    """``function()``, and the most device memory it held at once beyond what was allocated before (0 on the CPU)."""
    if device.type != "cuda":
        return function(), 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = function()
    return result, torch.cuda.max_memory_allocated(device) - before


# ------------------------------------------------------------------------------------------ feature blending


class _PointwiseHead:
    """A network's last layer when it is a 1x1x1 convolution: logits = W features + b, applied after blending.

    Blending is linear, so blending the features the head reads and applying the head once per voxel gives the
    blended logits (to float32 rounding). For an nnU-Net-like DynUNet with 105 classes the slab then holds its 32
    features instead of 106 channels, and a window returns 32 channels instead of 105.
    """

    def __init__(self, conv: torch.nn.Conv3d, device: torch.device) -> None:
        self.weight = conv.weight.detach().to(device, torch.float32)
        self.bias = None if conv.bias is None else conv.bias.detach().to(device, torch.float32)
        self.classes, self.features = int(self.weight.shape[0]), int(self.weight.shape[1])

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of (N, F, ...) or (F, ...) features, in float32."""
        single = features.dim() == 4
        x = features[None] if single else features
        logits = torch.nn.functional.conv3d(x.float(), self.weight, self.bias)
        return logits[0] if single else logits


class _DifferenceHead:
    """The logits ``(0, d)`` of a two-class network's blended difference ``d = l1 - l0`` (a
    :class:`medseg.rewrite.TwoClassDifference`): the same argmax, first class on a tie, and softmax as ``(l0, l1)``."""

    classes, features = 2, 1

    def __init__(self, device: torch.device) -> None:
        # as a pointwise head's weights (0 and 1 times d): what OpenVINO's cache key reads of a head
        self.weight = torch.tensor([0.0, 1.0], device=device).view(2, 1, 1, 1, 1)
        self.bias = None

    def __call__(self, difference: torch.Tensor) -> torch.Tensor:
        """Logits of (N, 1, ...) or (1, ...) differences, in float32."""
        difference = difference.float()
        return torch.cat([torch.zeros_like(difference), difference], dim=difference.dim() - 4)


def _logit_channels(network: torch.nn.Module) -> int | None:
    """How many logits a MONAI U-Net, DynUNet, Attention U-Net or SegResNet returns in evaluation; None for another
    network (whose count only a run would tell)."""
    from monai.networks import nets

    if type(network) in (nets.UNet, nets.DynUNet, nets.AttentionUnet):
        return int(network.out_channels)
    if type(network) is nets.SegResNet:
        convs = [m for m in network.conv_final.modules() if isinstance(m, torch.nn.Conv3d)]
        return int(convs[-1].out_channels) if convs else None
    return None


def _feature_split(network: torch.nn.Module, channels: int, device: torch.device):
    """``(body, head)`` where blending ``body``'s features and then applying ``head`` gives the blended logits and
    blends fewer channels than the logits have; None otherwise (the whole network's logits are blended).

    MONAI's DynUNet ends in a 1x1x1 convolution (its output block) on its last features. The split is checked on a
    seeded input before it is used: ``head(body(x))`` must equal ``network(x)``. A two-class MONAI U-Net,
    SegResNet, DynUNet or Attention U-Net blends the difference of its two logits (:class:`_DifferenceHead`).
    """
    from monai.networks import nets

    if type(network) is nets.DynUNet and (split := _dynunet_split(network, channels, device)) is not None:
        return split
    if _logit_channels(network) == 2:
        return rewrite.two_class_difference(network), _DifferenceHead(device)
    return None


def _dynunet_split(network, channels: int, device: torch.device):
    convs = [m for m in network.output_block.modules() if isinstance(m, torch.nn.Conv3d)]
    if len(convs) != 1 or tuple(convs[0].kernel_size) != (1, 1, 1) or convs[0].groups != 1:
        return None
    if tuple(convs[0].stride) != (1, 1, 1) or convs[0].out_channels <= convs[0].in_channels:
        return None  # as many features as classes: nothing to gain
    factor = [1, 1, 1]
    for stride in network.strides:
        stride = [stride] * 3 if isinstance(stride, int) else list(stride)
        factor = [f * int(s) for f, s in zip(factor, stride)]
    head = _PointwiseHead(convs[0], device)
    generator = torch.Generator().manual_seed(20261127)
    x = torch.randn((1, channels, *(2 * f for f in factor)), generator=generator).to(device)
    with torch.inference_mode():
        expected, split = network(x).float(), head(network.skip_layers(x))
    scale = float(expected.abs().max()) or 1.0
    if split.shape != expected.shape or float((split - expected).abs().max()) > 1e-4 * scale:
        logger.debug("blending DynUNet's logits: its output block is not a plain pointwise head")
        return None
    return network.skip_layers, head


def window_parts(network: torch.nn.Module, channels: int, blend_features: bool = True) -> tuple:
    """``(body, head)``: what the engine runs on each window of a ``channels``-channel input and blends, and what
    turns the blended result into logits (None: the body's output is the logits). The body is the part of
    ``network`` before a pointwise head whose features it blends, or a two-class network's logit difference (see
    :func:`_feature_split`), else the whole network. A benchmark that prepares OpenVINO's cache converts the body,
    with the head (part of the cache's key)."""
    split = _feature_split(network.eval(), channels, torch.device("cpu")) if blend_features else None
    return split or (network, None)


# ---------------------------------------------------------------------------------------------------- running


class _Runner:
    """Runs window batches through the network in one precision, with optional mirroring."""

    def __init__(self, network: torch.nn.Module, device: torch.device, dtype: torch.dtype | None, mirror_axes):
        self.network = network
        self.device = device
        self.dtype = dtype
        self.flips = [
            tuple(2 + a for a in combo)
            for r in range(len(mirror_axes) + 1)
            for combo in itertools.combinations(sorted(mirror_axes), r)
        ]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """The batch's logits; in the autocast dtype without mirroring (blending adds them into float32)."""
        with _autocast(self.device, self.dtype):
            if len(self.flips) == 1:
                return self.network(batch)
            total = None
            for flip in self.flips:
                x = torch.flip(batch, flip) if flip else batch
                out = self.network(x)
                out = torch.flip(out, flip) if flip else out
                total = out.float() if total is None else total + out.float()
                del out
        return total / len(self.flips)

    def release_memory(self) -> None:
        """The windows are done: a network in OpenVINO gives its working memory back (PyTorch's already went)."""
        release = getattr(self.network, "release_memory", None)
        if release is not None:
            release()


def _slab_axis(shape: Sequence[int]) -> int:
    """The spatial axis (0, 1, 2) along which windows are streamed: the one with the most voxels."""
    return int(np.argmax(shape))


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def sliding_window_probabilities(
    network: torch.nn.Module,
    volume: np.ndarray,
    settings: InferenceSettings,
    *,
    device: torch.device,
    control: RunControl | None = None,
    sw_batch_size: int | None = None,
    options: InferenceOptions | None = None,
    out_dtype: np.dtype | type = np.float32,
    report: InferenceReport | None = None,
    keep_on_device: bool = False,
    labels_only: bool = False,
) -> np.ndarray | torch.Tensor:
    """Run ``network`` over ``volume`` (C, X, Y, Z) window by window, blend the logits, return probabilities.

    Windows larger than the volume are padded as MONAI pads them; the result has the volume's spatial shape.
    ``sw_batch_size`` (kept for callers of the first version) is the same as ``options.window_batch``.
    ``report``, when given, is filled with what the run did. With ``keep_on_device``, on a GPU the result is a
    tensor there when it fits the memory budget (in ``out_dtype``, else float16), for a caller that carries on on
    the GPU; otherwise, and always on the CPU, a NumPy array. With ``labels_only`` the result is the (X, Y, Z)
    argmax of the blended logits instead (uint8 below 256 classes, first class on ties), taken slab by slab as
    the windows finish: no C x X x Y x Z buffer at all. See :func:`sliding_window_labels`.
    """
    options = options or InferenceOptions()
    options = replace(options, mirror_axes=mirror_axes_for(options, settings))
    if sw_batch_size is not None and options.window_batch is None:
        options = replace(options, window_batch=sw_batch_size)
    report = report if report is not None else InferenceReport()
    control = control or RunControl()
    attempts: list[tuple[torch.device, int | None]] = [(device, options.window_batch)]
    while True:
        dev, batch = attempts[-1]
        # on the run's GPU, not the current one: its streams, events, pinned copies and memory queries (cuda:1)
        on_device = torch.cuda.device(dev) if dev.type == "cuda" and dev.index is not None else contextlib.nullcontext()
        _clear_attempt(report)
        try:
            with on_device:
                return _run(
                    network,
                    volume,
                    settings,
                    dev,
                    batch,
                    options,
                    control,
                    out_dtype,
                    report,
                    keep_on_device,
                    labels_only,
                )
        except torch.cuda.OutOfMemoryError:
            if dev.type != "cuda":
                raise
            torch.cuda.empty_cache()
            used = report.window_batch  # 0: before the windows, moving the network and the input to the GPU
            where = f"with a window batch of {used}" if used else f"moving the network and the input to {dev}"
            used = used or batch or 1  # every retry asks for less than the attempt before: the loop ends
            if used > 1:
                attempts.append((dev, used // 2))
                message = f"GPU out of memory {where}; retrying with a window batch of {used // 2}"
            else:
                attempts.append((torch.device("cpu"), None))
                message = f"GPU out of memory {where}; retrying on the CPU"
            logger.warning(message)
            report.notes.append(message)


def _clear_attempt(report: InferenceReport) -> None:
    """Before an attempt: what an earlier one (out of GPU memory) recorded goes, but for its notes; the window batch
    is 0 until the attempt knows it (what a retry halves)."""
    fresh = InferenceReport()
    for item in fields(InferenceReport):
        if item.name != "notes":
            setattr(report, item.name, getattr(fresh, item.name))
    report.window_batch = 0


def _float32_runner(network, device, options, input_shape, fallback: _Runner, report, head=None) -> _Runner:
    """The runner for a whole volume's float32 windows: OpenVINO's on the CPU where it can be, else ``fallback``."""
    if device.type != "cpu" or options.backend == "torch":
        return fallback
    if options.backend == "auto" and not backends.openvino_available():
        return fallback
    try:
        compiled = backends.openvino_network(network, input_shape, head=head)
    except backends.BackendUnavailableError as error:
        if options.backend == "openvino":
            raise MedSegError(f"backend openvino: {error}") from None
        _note(report, f"{error}; float32 windows run in PyTorch")
        return fallback
    report.backend = "openvino"
    return _Runner(compiled, device, None, options.mirror_axes)


def sliding_window_labels(network, volume, settings, *, device, **kwargs) -> np.ndarray:
    """The labels of :func:`sliding_window_probabilities` on the network's grid, (X, Y, Z), streamed slab by slab.

    For a caller that needs labels on the network's grid (a preview, a volume already on the model's grid, a
    benchmark against MONAI's ``argmax``): the class maps never exist in full, on the device or the host.
    """
    labels = sliding_window_probabilities(network, volume, settings, device=device, labels_only=True, **kwargs)
    return labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels


def _run(network, volume, settings, device, batch, options, control, out_dtype, report, keep_on_device, labels_only):
    if options.backend == "openvino" and device.type != "cpu":
        raise DeviceError(f"backend openvino runs on the CPU only, not on {device}; use backend auto or torch")
    report.backend = "torch"
    roi = tuple(int(r) for r in settings.roi_size)
    spatial = tuple(volume.shape[1:])
    pads = padding_for(spatial, roi)
    padded_shape = tuple(s + a + b for s, (a, b) in zip(spatial, pads))
    starts = window_starts(padded_shape, roi, settings.overlap)
    axis = _slab_axis(padded_shape)
    starts.sort(key=lambda s: (s[axis], s))
    cuda = device.type == "cuda"
    network.to(device).eval()
    # a network ending in a pointwise head with fewer features than classes: blend the features, then the head
    split = _feature_split(network, volume.shape[0], device) if options.blend_features else None
    body, head = split or (network, None)

    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    if any(a or b for a, b in pads):
        x = torch.nn.functional.pad(x, [v for a, b in reversed(pads) for v in (a, b)])
    if cuda:
        x = (x.pin_memory() if torch.cuda.is_available() else x).to(device, non_blocking=True)
    weights = _blend_weights(roi, settings.blend_mode).to(device)

    low = AUTOCAST_DTYPES.get(options.precision)
    if options.precision == "auto":
        low = low_precision_for(device)
    fp32 = _Runner(body, device, None, options.mirror_axes)  # PyTorch's: the trial's reference

    refused = []  # why OpenVINO could not take the network, found converting it for the bf16 windows

    @functools.cache
    def whole_fp32() -> _Runner:  # what runs a volume's float32 windows; converted only when first needed
        if refused:  # the same conversion would fail again, a second time as slowly
            return fp32
        return _float32_runner(body, device, options, (volume.shape[0], *roi), fp32, report, head)

    runner = None
    if low is not None:  # bf16 windows on the CPU: in OpenVINO where it can (before inference mode: it traces)
        try:
            runner = _bf16_openvino_runner(body, device, low, options, (volume.shape[0], *roi), report, head)
        except backends.BackendUnavailableError as error:  # backend auto: everything runs in PyTorch
            refused.append(error)
            _note(report, f"{error}; the windows run in PyTorch")
    if low is not None and runner is None:
        # low-precision windows on the CPU: few-channel transposed convolutions as sub-pixel ones (faster)
        low_body = rewrite.for_cpu(body, float32=False) if device.type == "cpu" else body
        runner = _Runner(low_body, device, low, options.mirror_axes)

    def window(start) -> torch.Tensor:
        return x[(slice(None), *(slice(s, s + r) for s, r in zip(start, roi)))]

    def stacked(group) -> torch.Tensor:
        return torch.stack([window(s) for s in group])

    if runner is None:  # before inference mode: a conversion traces the network
        runner = whole_fp32()

    def opened() -> list[_Runner]:  # what may hold OpenVINO's working memory (whole_fp32's runner once made)
        made = whole_fp32() if whole_fp32.cache_info().currsize else None
        return [runner] if made in (None, runner) else [runner, made]

    with torch.inference_mode(), _cudnn_autotuned(device), _released_on_error(opened):
        report.window_batch = batch or 1  # what an out-of-memory during the probe below halves from
        plan = None
        if batch is None:
            first = window(starts[0])[None]
            classes = head.classes if head is not None else None
            plan = _plan_gpu_memory(runner, first, device, starts, roi, axis, padded_shape, options, classes)
            batch = plan.batch if plan is not None else min(CPU_WINDOW_BATCH, len(starts))
        batch = min(batch, len(starts))  # a batch asked for above the windows there are: what runs, and is halved
        report.device, report.window_batch, report.windows = str(device), batch, len(starts)
        report.mirror_axes = tuple(options.mirror_axes)
        report.precision = precision_name(low)
        groups = list(_batches(starts, batch))
        trial_size = min(batch, GPU_TRIAL_WINDOWS) if cuda else batch
        calibration = None
        known: dict[int, torch.Tensor] = {}  # float32 logits of the trial batch
        float32_window: list[int] = []  # a float32 window's device memory, where the trial measured it

        def float32_batch() -> int:
            """The GPU batch planned again on float32's activations (the plan probed the low precision's)."""
            if not float32_window:
                float32_window.append(_peak_bytes(device, lambda: whole_fp32()(window(starts[0])[None]))[1])
            plan.per_window = max(plan.per_window, float32_window[0])
            return window_batch_for(plan.available, plan.per_window, plan.slab_bytes, len(starts))

        def in_float32(why: str | None = None) -> None:
            """The windows run in float32 from here (a GPU's batch planned again on its memory); ``why``: the
            low precision was refused, said in the notes, its working memory given back."""
            nonlocal runner, batch, groups
            if why is not None:
                _note(report, why)
                runner.release_memory()  # the trial's low-precision working memory, if it ran
            runner, report.precision = whole_fp32(), "fp32"
            if why is not None:
                report.backend = "openvino" if _openvino_precision(runner) else "torch"
            if plan is not None and (replanned := float32_batch()) != batch:
                batch = report.window_batch = replanned
                groups = list(_batches(starts, batch))
                known.clear()  # its index was the old grouping's

        refusal = None  # where a trial could run: what identifies it to the remembered refusals
        if options.precision == "auto" and low is not None:
            refusal = _refusal_key(body, roi, volume.shape[0], low, runner, device)
        if options.precision == "auto" and low is not None and len(starts) < MIN_GROUPS_FOR_TRIAL * trial_size:
            in_float32()  # the trial would cost more than low precision saves
        elif refusal is not None and (earlier := _remembered_refusal(body, refusal)) is not None:
            in_float32(
                f"{report.precision} changed {earlier:.3%} of the labels of a trial window batch in an earlier run of "
                f"this network (budget {DISAGREEMENT_BUDGET:.3%}); running in float32 without another trial"
            )
        elif options.precision == "auto" and low is not None:
            group = _central_group(groups, padded_shape, roi)
            trial = groups[group][:trial_size]
            crops = None if cuda or plan is not None else _calibrate_on_crops(stacked(trial), fp32, runner, head)
            if crops is not None:
                (calibration, report.trial_shape), trial_bytes = crops, 0
            else:
                report.trial_shape = roi
                (calibration, reference), trial_bytes = _peak_bytes(
                    device, lambda: _calibrate(stacked(trial), fp32, runner, head)
                )
                if len(trial) == len(groups[group]):  # the whole batch: the stream reuses its float32 logits
                    known[group] = reference
                float32_window.append(trial_bytes // len(trial))  # both precisions' windows: float32's the larger
                del reference
                # whole float32 trial windows' activations: give them back before the batches allocate theirs (not
                # after crops: small, and memory given back is faulted in again by the next windows, 0.04 s)
                release_memory()
            report.error_bound = calibration.bound
            report.calibration_disagreement = calibration.disagreement
            overflowed = not math.isfinite(calibration.bound)  # float16's range: no error bound to go by
            if overflowed or calibration.disagreement > DISAGREEMENT_BUDGET:
                if not overflowed:  # an overflow may be one scan's extreme values: tried again on the next
                    _remember_refusal(body, refusal, calibration.disagreement)
                in_float32(
                    f"{report.precision} overflowed in a trial window batch; running in float32"
                    if overflowed
                    else f"{report.precision} changed {calibration.disagreement:.3%} of the labels of a trial window "
                    f"batch (budget {DISAGREEMENT_BUDGET:.3%}); running in float32"
                )
                calibration = None
        if plan is not None and plan.working(batch) > plan.available:  # batch 1 is the least a run can do
            gib = [plan.per_window / 2**30, plan.slab_bytes(batch) / 2**30, plan.available / 2**30]
            budget = "gpu_memory_gib"
            if plan.held:
                budget += f", less the {plan.held / 2**30:.1f} GiB the process already holds there"
            _note(
                report,
                f"one window ({gib[0]:.1f} GiB) and its blending slab ({gib[1]:.1f} GiB for {plan.classes} classes) "
                f"need more than the {gib[2]:.1f} GiB this run may use on the GPU ({budget}); running at a "
                "window batch of 1 regardless",
            )
        on_device = None
        if plan is not None and keep_on_device and not labels_only:
            on_device = plan.output_dtype(batch, np.dtype(out_dtype))
        rounding = _openvino_rounding(runner)  # float32 in OpenVINO: how near a tie its rounding could flip a label
        calibration = rounding or calibration
        stream = _SlabStream(
            groups, roi, axis, padded_shape, weights, np.dtype(out_dtype), calibration, on_device, head=head
        )
        stream.labels_only = labels_only
        stream.kept = tuple((a, n) for (a, _), n in zip(pads, spatial))  # MONAI's padding is cropped away below
        stream.check_finite = report.precision == "fp16"  # float16's range: an overflow sends the run to float32

        # the trial batch keeps its float32 logits (the same batch as in the stream: the same numbers)
        at_risk = stream.run(
            lambda i, g: known.pop(i) if i in known else runner(stacked(g)), control, runner.release_memory
        )
        redo = None
        if stream.nonfinite:
            redo = (
                f"{report.precision} overflowed in {stream.nonfinite} voxels (float16's range); recomputing in float32"
            )
        elif calibration is not None and _estimate(report, at_risk, calibration) > DISAGREEMENT_BUDGET:
            redo = _too_near_ties(report, calibration, openvino=rounding is not None)
        if redo is not None:
            _note(report, redo)
            report.precision = "fp32"
            stream.check_finite = False
            quiet = RunControl(cancel_event=control.cancel_event)  # progress already reached 1; keep cancel
            rerun = fp32 if rounding is not None else whole_fp32()
            report.backend = "openvino" if _openvino_precision(rerun) else "torch"
            if plan is not None and (replanned := float32_batch()) < batch:
                batch = report.window_batch = replanned
                stream.regroup(list(_batches(starts, batch)))
            stream.calibration = _openvino_rounding(rerun)  # a low-precision run redone in OpenVINO: check it too
            at_risk = stream.run(lambda i, g: rerun(stacked(g)), quiet, rerun.release_memory)
            if stream.calibration is not None and _estimate(report, at_risk, stream.calibration) > DISAGREEMENT_BUDGET:
                _note(report, _too_near_ties(report, stream.calibration, openvino=True))
                report.backend, stream.calibration = "torch", None
                stream.run(lambda i, g: fp32(stacked(g)), quiet)
    report.blended_channels = stream.blended
    out = stream.out
    if any(a or b for a, b in pads):
        lead = () if labels_only else (slice(None),)
        out = out[(*lead, *(slice(a, a + s) for (a, _), s in zip(pads, spatial)))]
        out = out.contiguous() if isinstance(out, torch.Tensor) else np.ascontiguousarray(out)
    return out


@contextlib.contextmanager
def _released_on_error(runners):
    """A run cancelled or failed inside gives back the working memory of the runners ``runners()`` returns (a
    finished run gives it back after its last window batch, in :meth:`_SlabStream.run`)."""
    try:
        yield
    except BaseException:
        for runner in runners():
            runner.release_memory()
        raise


def _openvino_precision(runner: _Runner) -> str | None:
    """What a runner in OpenVINO computes in ("f32" or "bf16"); None for PyTorch."""
    network = runner.network
    return network.precision if isinstance(network, (backends.OpenVINONetwork, _OpenVINOLowPrecision)) else None


class _OpenVINOLowPrecision:
    """bf16 windows in OpenVINO, for the network's windows and the trial's central crops alike, so the trial
    measures what runs: one compilation for both where the network converted with dynamic spatial dimensions, else
    one per shape (held by :func:`medseg.backends.openvino_network`, looked up once per shape and run)."""

    precision = "bf16"

    def __init__(self, network: torch.nn.Module, input_shape: tuple, head=None) -> None:
        self.network, self.input_shape, self.head = network, input_shape, head
        self._compiled: dict[tuple, backends.OpenVINONetwork] = {}

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.compiled_for(tuple(batch.shape[1:]))(batch)

    def compiled_for(self, shape: tuple) -> backends.OpenVINONetwork:
        """The network compiled for inputs of ``shape`` (C, X, Y, Z).

        Raises:
            BackendUnavailableError: OpenVINO cannot compile it for that shape in bf16.
        """
        if shape not in self._compiled:
            self._compiled[shape] = backends.openvino_network(
                self.network, shape, head=self.head, precision=self.precision, converted_for=self.input_shape
            )
        return self._compiled[shape]

    def release_memory(self) -> None:
        for compiled in self._compiled.values():
            compiled.release_memory()


def _bf16_openvino_runner(body, device, low, options, input_shape, report, head=None) -> _Runner | None:
    """The runner of bfloat16 windows on the CPU in OpenVINO: with ``backend="auto"`` where OpenVINO is installed
    and the CPU runs bf16 fast (AMX or AVX-512-BF16), and with ``backend="openvino"``. None for PyTorch's autocast
    (``backend="torch"``, a GPU, another precision).

    1.6 to 1.8 times autocast's speed on the project's CPUs, with its labels, and since session 14 with its peak
    memory (the figures: :mod:`medseg.backends` and the README's *Speed and memory*). The network is converted (or
    read from the cache) and compiled for bf16 here, for the windows (the trial's crops share that compilation
    where the network converted with dynamic spatial dimensions), so that a failure shows before any window runs.
    A network that converts but does not compile in bf16 runs its bf16 windows in PyTorch's autocast, with a note
    (``backend="auto"``; its float32 may still run in OpenVINO).

    Raises:
        BackendUnavailableError: with ``backend="auto"``, OpenVINO cannot convert the network (the caller runs it in
            PyTorch); with ``backend="openvino"`` that, or a failed compilation, is a :class:`MedSegError`.
    """
    if device.type != "cpu" or low != torch.bfloat16 or options.backend == "torch":
        return None
    if options.backend == "auto" and (low_precision_for(device) != low or not backends.openvino_available()):
        return None  # bf16 forced on a CPU without fast bf16, or no OpenVINO: autocast, as before
    network = _OpenVINOLowPrecision(body, tuple(input_shape), head)
    try:
        backends.openvino_model(body, input_shape, head=head)
    except backends.BackendUnavailableError as error:
        if options.backend == "openvino":
            raise MedSegError(f"backend openvino: {error}") from None
        raise
    try:
        network.compiled_for(tuple(input_shape))
    except backends.BackendUnavailableError as error:
        if options.backend == "openvino":
            raise MedSegError(f"backend openvino, bf16: {error}") from None
        _note(report, f"bf16: {error}; bf16 windows run in PyTorch")
        return None
    report.backend = "openvino"
    return _Runner(network, device, None, options.mirror_axes)


def _openvino_rounding(runner: _Runner) -> _Calibration | None:
    """For a runner in OpenVINO's float32, its rounding as an error bound (from its conversion check); else None."""
    compiled = runner.network
    if _openvino_precision(runner) != "f32":
        return None
    flips = max(compiled.flips_per_risk, OPENVINO_MIN_FLIPS_PER_RISK)
    return _Calibration(bound=compiled.bound, disagreement=0.0, flips_per_risk=flips)


def _estimate(report: InferenceReport, at_risk: float, calibration: _Calibration) -> float:
    """The fraction of labels that could differ from float32 in PyTorch: the voxels within the error bound of a
    tie, times the flips per such voxel. Recorded in ``report``."""
    report.at_risk_fraction, report.estimated_disagreement = at_risk, at_risk * calibration.flips_per_risk
    return report.estimated_disagreement


def _too_near_ties(report: InferenceReport, calibration: _Calibration, openvino: bool) -> str:
    """Why a run that :func:`_estimate` found too near ties is redone."""
    at_risk, estimate = report.at_risk_fraction, report.estimated_disagreement
    if openvino:
        return (
            f"{at_risk:.3%} of the voxels are within OpenVINO's float32 rounding ({calibration.bound:.1e} of a logit "
            f"margin) of a tie, about {estimate:.3%} could differ from PyTorch's; recomputing in PyTorch"
        )
    return (
        f"{at_risk:.3%} of the voxels are within {report.precision}'s error bound, about {estimate:.3%} could differ "
        "from float32; recomputing in float32"
    )


@contextlib.contextmanager
def _cudnn_autotuned(device: torch.device):
    """cuDNN picks the fastest convolution for each window shape (timed once per shape and process) on a GPU."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps large freed blocks that other sizes may not reuse)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _note(report: InferenceReport, message: str) -> None:
    logger.info(message)
    report.notes.append(message)


#: network -> {(its weights' state, window, channels, precision, mirroring, device type, backend): labels changed}:
#: the trials that refused a low precision decisively (:data:`REMEMBERED_REFUSAL_FACTOR`), forgotten with the network
_refusals: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _refusal_key(body, roi, channels: int, low: torch.dtype, runner: _Runner, device: torch.device) -> tuple:
    state = rewrite.weights_state(body)
    backend = _openvino_precision(runner) or "torch"
    return (state, tuple(roi), int(channels), precision_name(low), tuple(runner.flips), device.type, backend)


def _remember_refusal(body: torch.nn.Module, key: tuple, disagreement: float) -> None:
    if disagreement > REMEMBERED_REFUSAL_FACTOR * DISAGREEMENT_BUDGET:
        try:
            _refusals.setdefault(body, {})[key] = disagreement
        except TypeError:  # a module that refuses weak references: tried again on every run
            pass


def _remembered_refusal(body: torch.nn.Module, key: tuple) -> float | None:
    try:
        return _refusals.get(body, {}).get(key)
    except TypeError:
        return None


@dataclass
class _Calibration:
    bound: float  #: the largest change of a top-class margin seen between the precisions
    disagreement: float  #: fraction of its voxels whose label differed
    flips_per_risk: float  #: labels that differed per voxel within ``bound`` of a tie (at least one voxel's worth)


def _central_group(groups, shape, roi) -> int:
    """The window batch holding the window nearest the volume's centre: the trial should see anatomy, not air."""
    centre = np.array(shape) / 2
    return min(
        range(len(groups)),
        key=lambda i: min(float(np.linalg.norm(np.array(s) + np.array(roi) / 2 - centre)) for s in groups[i]),
    )


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> _Calibration:
    """How far ``candidate``'s (N, K, ...) logits moved from ``reference``'s: the largest change of a top-class margin
    (the error bound), the labels that changed, and the changes per voxel within the bound of a tie. Used for low
    precision (the trial) and for OpenVINO's float32 (its conversion check)."""
    top, margin = top_two(reference, 1)
    change = candidate - reference
    bound = float((change - change.gather(1, top[:, None].long())).abs().max())
    flips = int((top_two(candidate, 1)[0] != top).sum())
    at_risk = int((margin < bound).sum())
    return _Calibration(bound=bound, disagreement=flips / top.numel(), flips_per_risk=max(flips, 1) / max(at_risk, 1))


def _calibrate(batch: torch.Tensor, fp32: _Runner, low: _Runner, head=None) -> tuple[_Calibration, torch.Tensor]:
    """Run one window batch in float32 and in low precision and compare their logits (``head`` turns the runners'
    features into logits); also returns what the float32 runner returned, for the stream to blend."""
    output = fp32(batch)
    reference = head(output) if head is not None else output
    candidate = head(low(batch)) if head is not None else low(batch)
    return compare_logits(reference, candidate), output


def trial_crop(roi: Sequence[int]) -> tuple[int, ...] | None:
    """The central crop of a window that the CPU trial runs on, or None for the whole window.

    About half the window along each axis (an eighth of the work), rounded down to a multiple of the largest power
    of two, up to 16, that divides the window, so that a network's downsampling still fits the crop: 96 -> 48,
    128 -> 64, 40 -> 16, 56 -> 24. None when that leaves fewer than :data:`MIN_TRIAL_CROP_VOXELS`.

    Not a third: on the CT-fitted U-Net (96^3 windows) 32^3 crops made bfloat16 look worse than it is (0.105 % of
    the crops' labels changed, against 0.017 % on 48^3 crops and 0.004 % over the whole run), because so
    small a crop leaves the network's deepest level with 2^3 voxels of mostly padding.
    """
    size = []
    for r in roi:
        step = min(r & -r, 16)  # the largest power of two dividing r, at most 16
        size.append(r // 2 // step * step)
    return tuple(size) if math.prod(size) >= MIN_TRIAL_CROP_VOXELS else None


def _calibrate_on_crops(
    batch: torch.Tensor, fp32: _Runner, low: _Runner, head=None
) -> tuple[_Calibration, tuple] | None:
    """The CPU trial: :func:`_calibrate` on the :func:`trial_crop` of each window; with the crops' size.

    On a 2-core CPU a whole trial batch in PyTorch's float32 costs as much as 4 OpenVINO windows, and keeping its
    logits saves little: a trained model's run is low precision, and an unsure one's float32 windows run faster in
    OpenVINO. The crops hold the same anatomy under the same network, so the precisions compare alike, and the
    after-run estimate still covers the whole volume. None where the windows are too small to crop, where the
    network refuses the crop's size (a fixed input size, such as UNETR's) or returns another size: the caller then
    runs the trial on the whole windows.
    """
    roi = batch.shape[2:]
    size = trial_crop(roi)
    if size is None:
        return None
    crop = batch[(slice(None), slice(None), *(slice((r - c) // 2, (r - c) // 2 + c) for r, c in zip(roi, size)))]
    try:
        calibration, reference = _calibrate(crop.contiguous(), fp32, low, head)
    except (RuntimeError, ValueError, AssertionError) as error:  # how PyTorch and MONAI refuse an input size
        logger.debug("the trial runs on whole windows: the network refused a %s crop (%s)", size, error)
        return None
    if tuple(reference.shape[2:]) != size:
        return None
    return calibration, size


class _SlabStream:
    """Blends window logits slab by slab along ``axis`` and leaves finished slabs' probabilities in ``out``.

    Windows arrive sorted by their start along ``axis``. When a batch's lowest start passes the slab's start,
    everything before it is final (no later window reaches back): normalised, checked against the error bound,
    turned into probabilities and written out. ``out`` is a NumPy array on the host, or with ``on_device`` (its
    dtype) a tensor on the windows' device. When ``out`` is float32 on the windows' device (the CPU, or a GPU
    keeping the result) the logits accumulate in ``out`` itself, so the only extra buffer is the slab's blending
    weights; otherwise a slab-sized accumulator lives on the device and finished slabs are copied out of it (to
    the host through pinned memory, the copy overlapping the next windows' work).
    """

    def __init__(self, groups, roi, axis, shape, weights, out_dtype, calibration, on_device=None, head=None):
        self.groups, self.roi, self.axis, self.shape = groups, roi, axis, shape
        self.weights, self.out_dtype, self.calibration = weights, out_dtype, calibration
        self.on_device = on_device
        self.head = head  #: a :class:`_PointwiseHead`: windows return features, blended, then turned into logits
        self.blended = 0  #: channels blended per voxel
        self.constant = bool(torch.all(weights == weights.flatten()[0]))  # MONAI's constant map: plain sums
        self.regroup(groups)
        self.out: np.ndarray | torch.Tensor | None = None
        self.labels_only = False  #: keep the argmax of the blended logits instead of the probabilities
        #: (start, size) per axis of the voxels the caller keeps (the volume inside MONAI's padding): the only ones
        #: counted near a tie, and what :meth:`run`'s fraction is of
        self.kept = tuple((0, n) for n in shape)
        self.check_finite = False  #: count non-finite logits (float16 overflow) in :attr:`nonfinite`
        self.nonfinite = 0
        self._pending: list = []  # (target slices, host tensor, CUDA event) of slabs still being copied

    def regroup(self, groups) -> None:
        """Run these window batches from now on (a float32 redo's smaller ones): the slab's depth follows them."""
        self.groups = groups
        self.depth = slab_depth(
            [s for g in groups for s in g], len(groups[0]), self.roi, self.axis, self.shape[self.axis]
        )

    def run(self, compute, control: RunControl, done=None) -> float:
        """Blend every batch ``compute(index, group)`` returns; the fraction of the kept voxels within the error bound.

        ``done()``, where given, is called once the last batch is computed, before the last slab is finished.
        """
        acc = norm = None
        start = self.groups[0][0][self.axis]
        at_risk = nonfinite = 0
        for index, group in enumerate(self.groups):
            control.check()
            logits = compute(index, group)
            if norm is None:
                acc, norm = self._buffers(logits)
            lowest = min(s[self.axis] for s in group)
            if lowest > start:
                risky, bad = self._flush(acc, norm, start, lowest - start)
                at_risk, nonfinite = at_risk + risky, nonfinite + bad
                start = lowest
            view = acc if self.slab else acc[self._along(start, start + self.depth, True)]
            for corner, piece in zip(group, logits):
                local = list(corner)
                local[self.axis] -= start
                region = tuple(slice(c, c + r) for c, r in zip(local, self.roi))
                if self.constant:
                    view[(slice(None), *region)].add_(piece)
                    norm[region].add_(1.0)
                else:
                    view[(slice(None), *region)].addcmul_(piece, self.weights)
                    norm[region].add_(self.weights)
            control.report("inference", (index + 1) / len(self.groups))
        del logits
        if done is not None:
            done()
        risky, bad = self._flush(acc, norm, start, self.shape[self.axis] - start)
        self._drain(keep=0)
        self.nonfinite = int(nonfinite + bad)
        return float(at_risk + risky) / float(math.prod(n for _, n in self.kept))

    def _copy_out(self, probabilities: torch.Tensor, target: tuple[slice, ...]) -> None:
        """Write a finished slab out; to the host the copy overlaps the next windows' work on a GPU."""
        if isinstance(self.out, torch.Tensor):
            self.out[target] = probabilities
            return
        dtype = _torch_dtype(self.out_dtype)
        cuda = probabilities.device.type == "cuda"
        host = torch.empty(probabilities.shape, dtype=dtype, pin_memory=cuda)
        host.copy_(probabilities.to(dtype), non_blocking=cuda)
        event = None
        if cuda:  # on the stream the copy was queued on: the tensor's device's
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(probabilities.device))
        self._pending.append((target, host, event))
        self._drain(keep=1)  # at most one copy in flight

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            target, host, event = self._pending.pop(0)
            if event is not None:
                event.synchronize()
            self.out[target] = host.numpy()

    def _buffers(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.blended = logits.shape[1]
        classes = self.head.classes if self.head is not None else self.blended
        slab = list(self.shape)
        slab[self.axis] = self.depth
        if self.labels_only:  # labels on the windows' device (small); logits always in a slab
            if self.out is None:
                dtype = _index_dtype(classes)
                self.out = torch.empty(self.shape, dtype=dtype, device=logits.device)
            in_place = False
        elif self.on_device is not None:  # the result stays on the windows' device
            dtype = _torch_dtype(self.on_device)
            if self.out is None:
                self.out = torch.empty((classes, *self.shape), dtype=dtype, device=logits.device)
            in_place = dtype == torch.float32
        else:
            in_place = logits.device.type == "cpu" and self.out_dtype == np.float32
            if self.out is None:
                self.out = np.empty((classes, *self.shape), dtype=np.float32 if in_place else self.out_dtype)
        in_place = in_place and self.head is None  # features accumulate in a slab of their own
        self.slab = not in_place
        if in_place:
            acc = self.out if isinstance(self.out, torch.Tensor) else torch.from_numpy(self.out)
            acc.zero_()
        else:
            acc = torch.zeros((self.blended, *slab), dtype=torch.float32, device=logits.device)
        return acc, torch.zeros(slab, dtype=torch.float32, device=logits.device)

    def _along(self, start: int, stop: int, channels: bool) -> tuple[slice, ...]:
        index = [slice(None)] * 3
        index[self.axis] = slice(start, stop)
        return (slice(None), *index) if channels else tuple(index)

    def _kept(self, start: int, stop: int) -> tuple[slice, ...]:
        """Of a chunk from ``start`` to ``stop`` along the axis, the voxels the caller keeps, as spatial slices."""
        index = []
        for dim, (first, size) in enumerate(self.kept):
            if dim == self.axis:
                lo = min(max(first - start, 0), stop - start)
                index.append(slice(lo, max(min(first + size, stop) - start, lo)))
            else:
                index.append(slice(first, first + size))
        return tuple(index)

    def _flush(self, acc: torch.Tensor, norm: torch.Tensor, start: int, length: int):
        """Finish ``length`` voxels along the axis from the slab's front, then move the slab forward.

        The finished part is done in chunks of about :data:`FLUSH_CHUNK_BYTES` of logits (on the CPU
        :data:`CPU_FLUSH_CHUNK_BYTES`). Returns the voxels within the error bound of a tie and the non-finite
        logits, as counts on the device.
        """
        bound = None if self.calibration is None else self.calibration.bound
        cross = int(np.prod(self.shape)) // self.shape[self.axis]
        channels = max(acc.shape[0], self.head.classes if self.head is not None else 0)
        chunk = FLUSH_CHUNK_BYTES if acc.device.type == "cuda" else CPU_FLUSH_CHUNK_BYTES
        step = max(1, chunk // max(1, channels * cross * 4))
        risky = bad = 0
        for offset in range(0, length, step):
            stop = min(offset + step, length)
            weights = norm[self._along(offset, stop, False)].clamp_min(1e-12)
            if self.slab:
                logits = acc[self._along(offset, stop, True)] / weights
            else:
                logits = acc[self._along(start + offset, start + stop, True)]
                logits.div_(weights)
            if self.check_finite:
                bad = bad + (~torch.isfinite(logits)).sum()
            if self.head is not None:  # blended features: the head gives the blended logits
                logits = self.head(logits)
            target = self._along(start + offset, start + stop, True)
            kept = self._kept(start + offset, start + stop)
            if self.labels_only:
                index, margin = top_two(logits, 0)
                self.out[target[1:]] = index
                if bound is not None:
                    risky = risky + (margin[kept] < bound).sum()  # summed on the device
                continue
            if bound is not None:
                risky = risky + (top_two_margin(logits, 0)[kept] < bound).sum()
            probabilities = torch.softmax(logits, dim=0)
            if self.slab:
                self._copy_out(probabilities, target)
            else:
                logits.copy_(probabilities)
            del probabilities, logits
        rest = self.depth - length
        slabs = (norm, acc) if self.slab else (norm,)
        for buffer in slabs:
            channels = buffer.dim() == 4
            if rest > 0:
                buffer[self._along(0, rest, channels)] = buffer[self._along(length, self.depth, channels)].clone()
            buffer[self._along(max(rest, 0), self.depth, channels)] = 0
        return risky, bad
