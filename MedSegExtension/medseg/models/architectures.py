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
