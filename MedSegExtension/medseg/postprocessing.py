"""Postprocessing: from the network's output on its grid back to a labelmap on the input's exact grid.

Arrays here are in (C, X, Y, Z) or (X, Y, Z) order like the network's (see :mod:`medseg.preprocessing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .preprocessing import PreprocessRecord, network_array_to_image, reorient


def _uncrop_foreground(array: np.ndarray, record: PreprocessRecord, fill: Sequence[float]) -> np.ndarray:
    """Pad a (C, X, Y, Z) array cropped to the foreground back to the resampled grid."""
    box = record.foreground_box
    if box is None:
        return array
    full = np.empty((array.shape[0], *record.resampled_reference.GetSize()), dtype=array.dtype)
    full[:] = np.asarray(fill, dtype=array.dtype).reshape(-1, 1, 1, 1)
    full[(slice(None), *(slice(s, s + n) for s, n in zip(box.start, box.size)))] = array
    return full


def _to_cropped_input_grid(
    channel: np.ndarray, record: PreprocessRecord, *, interpolator: int, default: float
) -> np.ndarray:
    """Map one (X, Y, Z) channel from the (uncropped) network grid to the ROI-cropped input grid."""
    image = network_array_to_image(channel, record.resampled_reference)
    if record.resampled:
        image = sitk.Resample(
            image, record.cropped_reference, sitk.Transform(), interpolator, default, image.GetPixelID()
        )
    else:
        # Only axes were permuted and flipped: undo exactly, then snap the geometry to the input's.
        image = reorient(image, record.original_orientation)
        image.CopyInformation(record.cropped_reference)
    return _xyz(image)


def _xyz(image: sitk.Image) -> np.ndarray:
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))


def _paste_roi(array: np.ndarray, record: PreprocessRecord, fill: float) -> np.ndarray:
    """Put a (X, Y, Z) array on the ROI-cropped grid into the full input grid."""
    if record.roi is None:
        return array
    full = np.full(record.input_reference.GetSize(), fill, dtype=array.dtype)
    full[tuple(slice(s, s + n) for s, n in zip(record.roi.start, record.roi.size))] = array
    return full


def restore_probabilities(probabilities: np.ndarray, record: PreprocessRecord) -> np.ndarray:
    """Put (C, X, Y, Z) class probabilities from the network grid onto the input grid (linear interpolation).

    Outside the network's field of view (foreground crop, ROI) the background has probability 1.
    """
    background = [1.0] + [0.0] * (probabilities.shape[0] - 1)
    probabilities = _uncrop_foreground(probabilities.astype(np.float32, copy=False), record, background)
    restored = [
        _paste_roi(_to_cropped_input_grid(channel, record, interpolator=sitk.sitkLinear, default=fill), record, fill)
        for channel, fill in zip(probabilities, background)
    ]
    return np.stack(restored)


def restore_labels(labels: np.ndarray, record: PreprocessRecord) -> sitk.Image:
    """Put a (X, Y, Z) labelmap from the network grid onto the input grid (nearest neighbour), as an image."""
    labels = _uncrop_foreground(labels[None].astype(np.uint8), record, [0])[0]
    restored = _paste_roi(
        _to_cropped_input_grid(labels, record, interpolator=sitk.sitkNearestNeighbor, default=0), record, 0
    )
    return labels_to_image(restored, record.input_reference)


def labels_to_image(labels_xyz: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A uint8 labelmap image on ``reference``'s grid from a (X, Y, Z) array."""
    return network_array_to_image(labels_xyz.astype(np.uint8, copy=False), reference)


def argmax_labels(probabilities: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) probabilities → (X, Y, Z) uint8 labels (class index; 0 is background)."""
    return np.argmax(probabilities, axis=0).astype(np.uint8)


def keep_largest_component(labels: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Keep, for each label value, only its largest 26-connected component; the rest becomes background."""
    out = labels.copy()
    for value in label_values:
        mask = labels == value
        if not mask.any():
            continue
        components = sitk.GetArrayFromImage(  # a copy: a view would outlive the temporary image
            sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
        )
        counts = np.bincount(components.ravel())
        if len(counts) <= 2:
            continue
        largest = int(np.argmax(counts[1:]) + 1)
        out[mask & (components != largest)] = 0
    return out


@dataclass(frozen=True)
class LabelStatistics:
    value: int
    name: str
    voxels: int
    volume_ml: float


def label_statistics(labelmap: sitk.Image, names: dict[int, str]) -> list[LabelStatistics]:
    """Voxel count and volume (mL) of each named label in ``labelmap``."""
    counts = np.bincount(sitk.GetArrayViewFromImage(labelmap).ravel(), minlength=max(names, default=0) + 1)
    voxel_ml = float(np.prod(labelmap.GetSpacing())) / 1000.0
    return [
        LabelStatistics(value=v, name=n, voxels=int(counts[v]), volume_ml=float(counts[v]) * voxel_ml)
        for v, n in sorted(names.items())
    ]
