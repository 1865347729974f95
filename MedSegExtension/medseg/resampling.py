"""Linear resampling between axis-aligned grids with torch, on any device (the GPU path of pre- and postprocessing).

Two grids are axis-aligned when each axis of one maps onto one axis of the other: the reorientation MedSeg does
(a permutation and flips) and the resampling to the card's spacing (a scale per axis) keep grids so. Then
trilinear interpolation is three 1D interpolations, each a pair of ``index_select`` calls, and SimpleITK's
``Resample`` (identity transform, linear, a default value outside) is reproduced: neighbours are clamped at the
border, and points more than half a voxel outside the source grid take the default value, as ITK does.
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
    return values.index_select(axis, i0) * (1 - weight) + values.index_select(axis, i1) * weight


class AxisAlignedResampler:
    """Resamples (X, Y, Z) tensors from a source grid onto an output grid of ``out_size`` through ``maps``."""

    def __init__(
        self,
        maps: Sequence[AxisMap],
        source_size: Sequence[int],
        out_size: Sequence[int],
        device,
        *,
        extrapolate: bool = False,
    ) -> None:
        """``extrapolate``: points outside the source take the nearest voxel's value (as
        :meth:`medseg.preprocessing.Geometry.resample` with ``extrapolate``); else the call's ``fill``."""
        self.order = [a for a, _, _ in maps]
        if sorted(self.order) != [0, 1, 2]:
            raise ValueError(f"each output axis must come from a different source axis, got {self.order}")
        self.coords = []
        self.inside = None
        for j, (axis, scale, offset) in enumerate(maps):
            u = torch.arange(int(out_size[j]), dtype=torch.float64, device=device) * scale + offset
            # inside as ITK's interpolators count it (ImageFunction::IsInsideBuffer): from half a voxel before the
            # first voxel, to strictly less than half a voxel past the last (an exact 2x upsampling's last point)
            valid = (u >= -0.5) & (u < source_size[axis] - 0.5)
            self.coords.append(u)
            if extrapolate:  # interpolate_axis clamps to the edge voxels
                continue
            shape = [1, 1, 1]
            shape[j] = -1
            self.inside = valid.reshape(shape) if self.inside is None else self.inside & valid.reshape(shape)

    def __call__(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        values = values.permute(*self.order)
        for j in range(3):
            values = interpolate_axis(values, j, self.coords[j])
        if self.inside is None:
            return values
        return torch.where(self.inside, values, torch.tensor(fill, dtype=values.dtype, device=values.device))
