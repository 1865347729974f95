"""Linear resampling between axis-aligned grids with torch, on any device (the GPU path of pre- and postprocessing).

Two grids are axis-aligned when each axis of one maps onto one axis of the other: the reorientation MedSeg does
(a permutation and flips) and the resampling to the card's spacing (a scale per axis) keep grids so. Then
trilinear interpolation is three 1D interpolations, each a pair of ``index_select`` calls, and SimpleITK's
``Resample`` as :meth:`medseg.preprocessing.Geometry.resample` calls it is reproduced: neighbours are clamped at the
border, so points past it (less than a voxel, between grids over the same extent) take the edge's values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: For each output axis j: (source axis, scale, offset), the source's continuous index u = scale * i + offset.
AxisMap = tuple[int, float, float]


def interpolate_axis(values: torch.Tensor, axis: int, coords: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``values`` along ``axis`` at continuous indices ``coords``, neighbours clamped."""
    size = values.shape[axis]
    low = torch.floor(coords)
    weight = (coords - low).to(values.dtype)
    low = low.long()
    i0 = low.clamp(0, size - 1)
    i1 = (low + 1).clamp(0, size - 1)
    shape = [1] * values.dim()
    shape[axis] = -1
    weight = weight.reshape(shape)
    low_values = values.index_select(axis, i0)
    # as ITK interpolates: a + (b - a) w keeps a flat region exactly flat (a (1 - w) + b w is off by a rounding step
    # in about 7 % of voxels of -1000 or -3024, and a foreground crop's "above the minimum" then takes every voxel)
    return low_values + (values.index_select(axis, i1) - low_values) * weight


class AxisAlignedResampler:
    """Resamples (X, Y, Z) tensors from a source grid onto an output grid of ``out_size`` through ``maps``."""

    def __init__(self, maps: Sequence[AxisMap], out_size: Sequence[int], device) -> None:
        """Points past the source's border take the edge's values (:func:`interpolate_axis` clamps), as
        :meth:`medseg.preprocessing.Geometry.resample` gives them: the grids resampled here span the same extent,
        so such points lie less than a voxel past it."""
        self.order = [a for a, _, _ in maps]
        if sorted(self.order) != [0, 1, 2]:
            raise ValueError(f"each output axis must come from a different source axis, got {self.order}")
        self.coords = [
            torch.arange(int(out_size[j]), dtype=torch.float64, device=device) * scale + offset
            for j, (_, scale, offset) in enumerate(maps)
        ]

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        values = values.permute(*self.order)
        for j in range(3):
            values = interpolate_axis(values, j, self.coords[j])
        return values
