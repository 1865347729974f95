"""The allow-list of network architectures a model card may name.

Loading a model never imports code from its folder: the card names an architecture from this list and its
keyword arguments, and the engine builds the network itself. Every architecture takes ``in_channels`` and
``out_channels`` (the card's channel count and label count plus background), which the engine sets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import MedSegError


def _unet(**kwargs: Any) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, **kwargs)


def _basic_unet(**kwargs: Any) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, **kwargs)


def _attention_unet(**kwargs: Any) -> torch.nn.Module:
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(spatial_dims=3, **kwargs)


def _segresnet(**kwargs: Any) -> torch.nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, **kwargs)


def _dynunet(**kwargs: Any) -> torch.nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(spatial_dims=3, **kwargs)


def _unetr(**kwargs: Any) -> torch.nn.Module:
    from monai.networks.nets import UNETR

    return UNETR(spatial_dims=3, **kwargs)


def _swinunetr(**kwargs: Any) -> torch.nn.Module:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(spatial_dims=3, **kwargs)


ARCHITECTURES: dict[str, Callable[..., torch.nn.Module]] = {
    "UNet": _unet,
    "BasicUNet": _basic_unet,
    "AttentionUnet": _attention_unet,
    "SegResNet": _segresnet,
    "DynUNet": _dynunet,
    "UNETR": _unetr,
    "SwinUNETR": _swinunetr,
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
    except (TypeError, ValueError, AssertionError) as exc:
        raise ArchitectureError(f"{architecture} rejects the keyword arguments {sorted(kwargs)}: {exc}") from None
