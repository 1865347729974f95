"""Networks MONAI does not ship in 3D, written from MONAI's blocks: a U-Net with squeeze-and-excitation, a
DeepLab-style network with atrous spatial pyramid pooling, and a fully convolutional network (FCN-8s style).

They live in the engine (not in model folders), so a card may name them like MONAI's and a trained model loads
without code from its folder. All take ``spatial_dims``, ``in_channels`` and ``out_channels`` like MONAI's
networks; the engine sets those three. Inputs must be divisible by the product of the strides, as for MONAI's
U-Net; the sliding-window size takes care of that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import ChannelSELayer, Convolution, ResidualUnit, SimpleASPP
from monai.networks.nets import UNet
from torch import nn


class SEUNet(UNet):
    """MONAI's residual U-Net with a squeeze-and-excitation block (Hu et al. 2018) after every encoder stage.

    Args:
        se_reduction: the channel reduction of the excitation's bottleneck.
        Other arguments: as :class:`monai.networks.nets.UNet`.
    """

    def __init__(self, *args, se_reduction: int = 4, **kwargs) -> None:
        self.se_reduction = se_reduction
        super().__init__(*args, **kwargs)

    def _get_down_layer(self, in_channels: int, out_channels: int, strides: int, is_top: bool) -> nn.Module:
        layer = super()._get_down_layer(in_channels, out_channels, strides, is_top)
        reduction = max(1, min(self.se_reduction, out_channels))
        return nn.Sequential(layer, ChannelSELayer(self.dimensions, out_channels, r=reduction))


class _FourScaleEncoder(nn.Module):
    """Four encoder stages at full, 1/2, 1/4 and 1/8 resolution, each built by ``stage(in, out, stride)``."""

    def __init__(self, name: str, in_channels: int, channels: Sequence[int], stage) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"{name} takes 4 encoder widths, got {list(channels)}")
        widths = [in_channels, *channels]
        self.stages = nn.ModuleList(stage(widths[i], widths[i + 1], 1 if i == 0 else 2) for i in range(4))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class DeepLab3D(nn.Module):
    """A 3D DeepLabv3+-style network: a residual encoder to 1/8 resolution, atrous spatial pyramid pooling
    (MONAI's ``SimpleASPP``), and a decoder that joins the ASPP output with the 1/2-resolution features.

    Args:
        channels: encoder widths at full, 1/2, 1/4 and 1/8 resolution.
        dilations: the ASPP branches' dilation rates (a 1x1 branch for rate 1).
        norm: normalisation of every block (MONAI's names).
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        dilations: Sequence[int] = (1, 2, 4, 6),
        norm: str | tuple = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = _FourScaleEncoder(
            "DeepLab3D",
            in_channels,
            channels,
            lambda a, b, stride: ResidualUnit(spatial_dims, a, b, strides=stride, subunits=2, norm=norm),
        )
        branch = max(channels[3] // 4, 4)
        kernels = [1 if d == 1 else 3 for d in dilations]
        self.aspp = SimpleASPP(spatial_dims, channels[3], branch, kernels, dilations, norm_type=norm)
        aspp_out = branch * len(dilations)
        self.low = Convolution(spatial_dims, channels[1], channels[1], kernel_size=1, norm=norm)
        self.decoder = nn.Sequential(
            Convolution(spatial_dims, aspp_out + channels[1], channels[1], kernel_size=3, norm=norm),
            Convolution(spatial_dims, channels[1], channels[1], kernel_size=3, norm=norm, dropout=dropout),
        )
        self.head = Convolution(spatial_dims, channels[1], out_channels, kernel_size=1, conv_only=True)
        self.mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        features = self.encoder(x)
        low = self.low(features[1])
        context = self.aspp(features[3])
        context = nn.functional.interpolate(context, size=low.shape[2:], mode=self.mode, align_corners=False)
        out = self.head(self.decoder(torch.cat([context, low], dim=1)))
        return nn.functional.interpolate(out, size=size, mode=self.mode, align_corners=False)


class FCN3D(nn.Module):
    """A fully convolutional network in the manner of FCN-8s (Long et al. 2015), in 3D: a strided convolutional
    encoder, a class score at each of the three coarsest scales, and upsampling with skip sums to full resolution.

    Args:
        channels: encoder widths at full, 1/2, 1/4 and 1/8 resolution.
        norm: normalisation of every block (MONAI's names).
        dropout: dropout before the coarsest score.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        norm: str | tuple = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = _FourScaleEncoder(
            "FCN3D",
            in_channels,
            channels,
            lambda a, b, stride: nn.Sequential(
                Convolution(spatial_dims, a, b, strides=stride, norm=norm), Convolution(spatial_dims, b, b, norm=norm)
            ),
        )
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scores = nn.ModuleList(
            Convolution(spatial_dims, channels[i], out_channels, kernel_size=1, conv_only=True) for i in (3, 2, 1)
        )
        self.mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        features = self.encoder(x)
        out = self.scores[0](self.drop(features[3]))
        for score, skip in zip(self.scores[1:], (features[2], features[1])):
            out = nn.functional.interpolate(out, size=skip.shape[2:], mode=self.mode, align_corners=False)
            out = out + score(skip)
        return nn.functional.interpolate(out, size=size, mode=self.mode, align_corners=False)
