"""Segmentation metrics per label: Dice, IoU, precision, recall, HD95 and ASSD (in mm).

Functions take labelmaps as numpy arrays of one shape (any axis order, as long as ``spacing`` follows it) or
as ``SimpleITK.Image`` via :func:`evaluate_images`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


@dataclass(frozen=True)
class LabelMetrics:
    dice: float
    iou: float
    precision: float
    recall: float
    #: mm: the larger of the two directed 95th-percentile surface distances (prediction to reference, reference
    #: to prediction); inf when exactly one of the two masks is empty, 0 when both are
    hd95: float
    assd: float  #: mm: the mean of both directions' surface distances; inf and 0 as hd95

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def overlap_metrics(prediction: np.ndarray, reference: np.ndarray) -> tuple[float, float, float, float]:
    """Dice, IoU, precision and recall of two boolean masks. Empty against empty scores 1 on each."""
    tp = int(np.count_nonzero(prediction & reference))
    fp = int(np.count_nonzero(prediction & ~reference))
    fn = int(np.count_nonzero(~prediction & reference))
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0, 1.0
    dice = 2 * tp / (2 * tp + fp + fn)
    iou = tp / (tp + fp + fn)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return dice, iou, precision, recall


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def directed_surface_distances(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of the prediction to the reference's surface, and back."""
    surface_p, surface_r = _surface(prediction), _surface(reference)
    to_r = ndimage.distance_transform_edt(~surface_r, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~surface_p, sampling=spacing)
    return to_r[surface_p], to_p[surface_r]


def surface_distances(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from each surface voxel of either mask to the other mask's surface, both directions."""
    return np.concatenate(directed_surface_distances(prediction, reference, spacing))


def label_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> LabelMetrics:
    """All metrics for one pair of boolean masks; ``spacing`` in mm, in the arrays' axis order."""
    prediction = prediction.astype(bool, copy=False)
    reference = reference.astype(bool, copy=False)
    dice, iou, precision, recall = overlap_metrics(prediction, reference)
    has_p, has_r = prediction.any(), reference.any()
    if not has_p and not has_r:
        hd95 = assd = 0.0
    elif not has_p or not has_r:
        hd95 = assd = float("inf")
    else:
        to_r, to_p = directed_surface_distances(prediction, reference, spacing)
        # the larger of the two directed 95th percentiles, as MONAI, medpy and DeepMind's surface-distance compute
        # it: pooled into one percentile, a false-positive blob on one side would be diluted by the other's voxels
        hd95 = float(max(np.percentile(to_r, 95), np.percentile(to_p, 95)))
        assd = float(np.concatenate([to_r, to_p]).mean())
    return LabelMetrics(dice, iou, precision, recall, hd95, assd)


def evaluate(
    prediction: np.ndarray, reference: np.ndarray, values: Sequence[int], spacing: Sequence[float]
) -> dict[int, LabelMetrics]:
    """Metrics for each label value of two labelmaps of the same shape."""
    if prediction.shape != reference.shape:
        raise ValueError(f"labelmaps differ in shape: {prediction.shape} and {reference.shape}")
    return {v: label_metrics(prediction == v, reference == v, spacing) for v in values}


def evaluate_images(prediction: sitk.Image, reference: sitk.Image, values: Sequence[int]) -> dict[int, LabelMetrics]:
    """Metrics for each label value of two labelmap images on one grid."""
    spacing = tuple(reversed(prediction.GetSpacing()))  # numpy order (z, y, x)
    return evaluate(sitk.GetArrayViewFromImage(prediction), sitk.GetArrayViewFromImage(reference), values, spacing)


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, values: Sequence[int]) -> dict[int, float]:
    """Dice only, for each label value; cheap enough for validation during training."""
    return {v: overlap_metrics(prediction == v, reference == v)[0] for v in values}
