"""Configure MONAI's DynUNet from a dataset's geometry, following nnU-Net's rules (Isensee et al. 2021).

- Target spacing: the card's, or the median spacing of the training images.
- Patch: the median image size at that spacing, shrunk along its longest physical axis until it fits the voxel
  budget, and rounded (up where the budget allows, as nnU-Net does) to a multiple of the network's total
  downsampling on each axis.
- Downsampling: at each level, an axis is halved when its current spacing is at most twice the finest one and
  its feature map stays at least 8 voxels (4 after the halving); a coarse axis keeps a 1-voxel kernel until its
  spacing is comparable, so an anisotropic scan is first pooled in plane.
- Filters: 32 doubled per level, at most 320 (nnU-Net's; ``base_filters`` and ``max_filters`` change them).

Only headers are read (``ReadImageInformation``), so planning a large dataset takes seconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

MIN_FEATURE = 4  #: voxels per axis at the bottom of the network
MAX_LEVELS = 6  #: downsamplings per axis at most (nnU-Net's 5 in plane for 3D, plus one)
BASE_FILTERS = 32
MAX_FILTERS = 320
ANISOTROPY = 2.0  #: an axis takes part once its spacing is within this factor of the finest


def _ras_geometry(path) -> tuple[np.ndarray, np.ndarray]:
    """Spacing and size of an image file along the RAS-oriented axes the engine's preprocessing produces."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    direction = np.array(reader.GetDirection()).reshape(3, 3)
    order = np.argmax(np.abs(direction), axis=1)  # for each physical axis, the file axis that runs along it
    return np.array(reader.GetSpacing())[order], np.array(reader.GetSize())[order]


def plan_layers(spacing, patch) -> tuple[list[list[int]], list[list[int]]]:
    """DynUNet kernel sizes and strides per level for a voxel spacing and a patch size."""
    spacing = np.asarray(spacing, float)
    size = np.asarray(patch, float)
    kernels, strides = [], [[1, 1, 1]]
    current = spacing.copy()
    for _ in range(MAX_LEVELS):
        finest = current.min()
        kernels.append([3 if s <= ANISOTROPY * finest else 1 for s in current])
        pool = [s <= ANISOTROPY * finest and n / 2 >= MIN_FEATURE for s, n in zip(current, size)]
        if not any(pool):
            break
        strides.append([2 if p else 1 for p in pool])
        current = np.where(pool, current * 2, current)
        size = np.where(pool, size / 2, size)
    finest = current.min()
    kernels.append([3 if s <= ANISOTROPY * finest else 1 for s in current])
    return kernels[: len(strides)], strides


def _fit_patch(shape, spacing, max_voxels: int) -> list[int]:
    """``shape`` shrunk along its longest physical axis (of those above 8 voxels) until it fits ``max_voxels``.

    Raises:
        ValueError: the budget is below the smallest patch, 8 voxels along each axis.
    """
    smallest = MIN_FEATURE * 2
    if max_voxels < smallest**3:
        raise ValueError(
            f"plan dynunet: a patch budget of {max_voxels} voxels (the product of patch_size) is below the smallest "
            f"patch the plan makes, {smallest}^3 = {smallest**3} voxels; raise patch_size"
        )
    patch = np.maximum(np.asarray(shape, float), smallest)
    while np.prod(patch) > max_voxels:
        # an axis already at the floor cannot shrink: the longest of the others does
        physical = np.where(patch > smallest, patch * np.asarray(spacing), -np.inf)
        axis = int(np.argmax(physical))
        patch[axis] = max(smallest, patch[axis] * 0.9)
    return [int(p) for p in patch]


def plan_dynunet(
    images: list,
    *,
    spacing=None,
    max_patch_voxels: int = 128**3,
    base_filters: int = BASE_FILTERS,
    max_filters: int = MAX_FILTERS,
) -> dict[str, Any]:
    """The DynUNet card kwargs, patch size and spacing for a dataset given by one image file per case.

    Returns:
        ``{"spacing": [...], "median_shape": [...], "patch_size": [...], "kwargs": {...}}``.
    """
    geometry = [_ras_geometry(path) for path in images]
    spacings = np.array([g[0] for g in geometry])
    sizes = np.array([g[1] for g in geometry])
    target = np.asarray(spacing, float) if spacing is not None else np.median(spacings, axis=0)
    median_shape = np.median(sizes * spacings / target, axis=0)
    patch = _fit_patch(median_shape, target, max_patch_voxels)
    kernels, strides = plan_layers(target, patch)
    total = np.prod(np.array(strides), axis=0)
    up = [int(-(-p // t) * t) for p, t in zip(patch, total)]  # nnU-Net rounds up and pads the images
    patch = up if np.prod(up) <= max_patch_voxels else [max(int(p // t * t), int(t) * 2) for p, t in zip(patch, total)]
    filters = [min(base_filters * 2**level, max_filters) for level in range(len(strides))]
    return {
        "spacing": [round(float(s), 4) for s in target],
        "median_shape": [round(float(s), 1) for s in median_shape],
        "patch_size": patch,
        "kwargs": {
            "kernel_size": kernels,
            "strides": strides,
            "upsample_kernel_size": strides[1:],
            "filters": filters,
            "norm_name": "instance",
            "res_block": True,
        },
    }
