"""The allow-list of network architectures a model card may name.

Loading a model never imports code from its folder: the card names an architecture from this list and its
keyword arguments, and the engine builds the network itself. Every architecture takes ``in_channels`` and
``out_channels`` (the card's channel count and label count plus background), which the engine sets.

Torch is imported only to build a network: reading a card (which checks its window, :func:`window_problem`) needs
none, so the Slicer module lists models before torch is installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import MedSegError

if TYPE_CHECKING:
    import torch


def _monai_network(class_name: str) -> Callable[..., torch.nn.Module]:
    """A factory for one of MONAI's 3D networks, importing MONAI only when it is built."""

    def build(**kwargs: Any) -> torch.nn.Module:
        from monai.networks import nets

        return getattr(nets, class_name)(spatial_dims=3, **kwargs)

    build.__name__ = class_name
    return build


def _medseg_network(class_name: str) -> Callable[..., torch.nn.Module]:
    """A factory for one of the engine's own networks (:mod:`medseg.models.networks`, built from MONAI's blocks)."""

    def build(**kwargs: Any) -> torch.nn.Module:
        from . import networks

        return getattr(networks, class_name)(spatial_dims=3, **kwargs)

    build.__name__ = class_name
    return build


#: Card name -> factory. Extending the list is a code change reviewed like any other, never a model file.
ARCHITECTURES: dict[str, Callable[..., torch.nn.Module]] = {
    **{
        name: _monai_network(name)
        for name in ("UNet", "BasicUNet", "AttentionUnet", "SegResNet", "DynUNet", "UNETR", "SwinUNETR")
    },
    **{name: _medseg_network(name) for name in ("SEUNet", "DeepLab3D", "FCN3D")},
}


class ArchitectureError(MedSegError):
    """The card names an architecture that is not allowed, or arguments it does not accept."""


def build_network(
    architecture: str, *, in_channels: int, out_channels: int, kwargs: dict[str, Any] | None = None
) -> torch.nn.Module:
    """Build an allow-listed 3D network.

    Raises:
        ArchitectureError: unknown architecture, or keyword arguments it rejects.
    """
    try:
        factory = ARCHITECTURES[architecture]
    except KeyError:
        raise ArchitectureError(
            f"unknown architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    kwargs = dict(kwargs or {})
    for reserved in ("spatial_dims", "in_channels", "out_channels"):
        if reserved in kwargs:
            raise ArchitectureError(f"'{reserved}' is set by MedSeg from the card; remove it from network.kwargs")
    try:
        return factory(in_channels=in_channels, out_channels=out_channels, **kwargs)
    except ImportError as exc:
        raise ArchitectureError(
            f"{architecture} needs a package that is not installed: {exc}".splitlines()[0]
        ) from None
    except (TypeError, ValueError, AssertionError) as exc:
        raise ArchitectureError(f"{architecture} rejects the keyword arguments {sorted(kwargs)}: {exc}") from None


#: SegResNet's default ``blocks_down``: one block per level, so 3 downsamplings by 2.
SEGRESNET_BLOCKS_DOWN = (1, 2, 2, 4)
#: BasicUNet max-pools 4 times by 2, whatever its arguments.
BASICUNET_POOLINGS = 4
#: Architectures whose deepest level is normalised per instance unless the card says otherwise: card argument
#: naming the normalisation. Instance normalisation refuses a single voxel.
INSTANCE_NORMALISED = {
    "UNet": "norm",
    "SEUNet": "norm",
    "BasicUNet": "norm",
    "DynUNet": "norm_name",
    "SwinUNETR": "norm_name",
    "DeepLab3D": "norm",
    "FCN3D": "norm",
}


def window_problem(architecture: str, kwargs: dict[str, Any], roi_size: Sequence[int]) -> str | None:
    """Why the network a card describes cannot take sliding windows of ``roi_size`` voxels (x, y, z); None if it can.

    Read from the card alone, without building the network, so that a window the network cannot take is refused
    when the card is read, not by a bare error in the first window. The U-Nets that add or concatenate encoder and
    decoder features (``UNet``, ``SEUNet``, ``AttentionUnet``, ``DynUNet``) need a multiple of the product of their
    strides along each axis, ``SegResNet`` of 2 per downsampling (one per ``blocks_down`` after the first),
    ``SwinUNETR`` of ``patch_size ** 5``; ``BasicUNet`` pads odd sizes but pools 4 times (16 voxels at least);
    ``DeepLab3D`` and ``FCN3D`` interpolate back to the input's size from any. Where the deepest level is normalised
    per instance (the default of all but ``AttentionUnet`` and ``SegResNet``), it must hold more than one voxel.
    ``UNETR`` takes its ``img_size`` only. Arguments that cannot be read here are left to :func:`build_network` to
    refuse.
    """
    roi = tuple(int(v) for v in roi_size)
    if architecture == "UNETR":
        size = _per_axis(kwargs.get("img_size"))
        if size is not None and size != roi:
            return f"UNETR takes windows of its size only, network.kwargs.img_size {list(size)}"
        return None
    divisible = True  # the decoder gives back the window's size only from a multiple of the downsampling
    if architecture in ("UNet", "SEUNet", "AttentionUnet", "DynUNet"):
        strides = kwargs.get("strides")
        factors = [_per_axis(s) for s in strides] if isinstance(strides, (list, tuple)) else [None]
        if any(f is None for f in factors):
            return None
        multiple = tuple(math.prod(f[axis] for f in factors) for axis in range(3))
        source = "the product of network.kwargs.strides"
    elif architecture == "SegResNet":
        blocks = kwargs.get("blocks_down", SEGRESNET_BLOCKS_DOWN)
        if not isinstance(blocks, (list, tuple)) or not blocks:
            return None
        multiple = (2 ** (len(blocks) - 1),) * 3
        source = "2 per network.kwargs.blocks_down after the first"
    elif architecture == "SwinUNETR":
        patch = _per_axis(kwargs.get("patch_size", 2))
        if patch is None:
            return None
        multiple = tuple(p**5 for p in patch)
        source = "network.kwargs.patch_size to the 5th power"
    elif architecture == "BasicUNet":
        multiple, divisible = (2**BASICUNET_POOLINGS,) * 3, False  # it pads what odd sizes lose
        source = f"{BASICUNET_POOLINGS} poolings by 2"
    elif architecture in ("DeepLab3D", "FCN3D"):
        multiple, divisible = (8, 8, 8), False  # strided convolutions: the deepest level rounds up
        source = "3 strided convolutions by 2"
    else:
        return None
    fitting = [max(-(-r // m), 1) * m for r, m in zip(roi, multiple)]
    if architecture in ("DeepLab3D", "FCN3D"):
        deepest = [-(-r // m) for r, m in zip(roi, multiple)]
    else:
        deepest = [r // m for r, m in zip(roi, multiple)]
    if not divisible and min(deepest) < 1:
        return (
            f"{architecture} downsamples by {list(multiple)} along x, y, z ({source}), so a window must be at least "
            f"that along each axis; the nearest larger window that fits is {fitting}"
        )
    if divisible and any(r % m for r, m in zip(roi, multiple)):
        return (
            f"{architecture} downsamples by {list(multiple)} along x, y, z ({source}), so a window must be a "
            f"multiple of that along each axis; the nearest larger window that fits is {fitting}"
        )
    if math.prod(deepest) == 1 and _instance_normalised(architecture, kwargs):
        larger = [fitting[0] + multiple[0], *fitting[1:]]
        return (
            f"{architecture} downsamples by {list(multiple)} along x, y, z ({source}), which leaves one voxel at "
            f"its deepest level, and instance normalisation needs more than one; a window that fits is {larger}"
        )
    return None


def _instance_normalised(architecture: str, kwargs: dict[str, Any]) -> bool:
    key = INSTANCE_NORMALISED.get(architecture)
    if key is None:
        return False
    norm = kwargs.get(key, "instance")
    name = norm[0] if isinstance(norm, (list, tuple)) and norm else norm
    return isinstance(name, str) and name.lower() == "instance"


def _per_axis(value: Any) -> tuple[int, int, int] | None:
    """A positive whole number or three of them as (x, y, z); None for anything else."""
    if type(value) is int:
        value = (value,) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(type(v) is int and v > 0 for v in value):
        return tuple(value)
    return None
