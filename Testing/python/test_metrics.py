"""Metrics with answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from medseg.metrics import evaluate_images, label_metrics, overlap_metrics


def test_overlap_metrics_by_hand():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[0:4] = True  # 400 voxels
    b[2:6] = True  # 400 voxels, 200 shared
    dice, iou, precision, recall = overlap_metrics(a, b)
    assert dice == pytest.approx(0.5)
    assert iou == pytest.approx(200 / 600)
    assert precision == pytest.approx(0.5) and recall == pytest.approx(0.5)


def test_surface_distances_of_shifted_boxes_respect_spacing():
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 2, axis=0)  # shifted by 2 voxels along the first axis
    m = label_metrics(a, b, spacing=(3.0, 1.0, 1.0))
    assert m.hd95 == pytest.approx(6.0)  # 2 voxels of 3 mm
    assert 0 < m.assd < 6.0
    assert label_metrics(a, a, spacing=(3.0, 1.0, 1.0)).hd95 == 0.0


def test_empty_cases():
    empty = np.zeros((5, 5, 5), bool)
    full = np.ones((5, 5, 5), bool)
    both_empty = label_metrics(empty, empty, (1, 1, 1))
    assert both_empty.dice == 1.0 and both_empty.hd95 == 0.0
    one_empty = label_metrics(empty, full, (1, 1, 1))
    assert one_empty.dice == 0.0 and math.isinf(one_empty.hd95)


def test_evaluate_images_uses_image_spacing_in_numpy_order():
    array = np.zeros((10, 12, 14), np.uint8)
    array[2:6, 3:8, 4:9] = 1
    shifted = np.roll(array, 1, axis=0)  # one slice along z
    a, b = sitk.GetImageFromArray(array), sitk.GetImageFromArray(shifted)
    for image in (a, b):
        image.SetSpacing((0.5, 0.5, 4.0))
    metrics = evaluate_images(a, b, [1])[1]
    assert metrics.hd95 == pytest.approx(4.0)
    assert metrics.dice == pytest.approx(0.75)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI deprecates an argument it passes itself
def test_hd95_is_the_larger_directed_percentile_not_one_pooled_percentile():
    """A false-positive plate beside a cube: 36 of the prediction's 524 surface voxels (6.9 %) are 12 mm from the
    reference, so the prediction-to-reference 95th percentile is 12 mm and reference-to-prediction's 0 mm. Pooled
    with the reference's 488 zeros, the plate is 36 of 1012 distances (3.6 %) and a pooled percentile says 0."""
    reference = np.zeros((30, 30, 30), bool)
    reference[5:15, 5:15, 5:15] = True  # 10^3 - 8^3 = 488 surface voxels
    prediction = reference.copy()
    prediction[20, 7:13, 7:13] = True  # 6 x 6, all surface, 6 voxels of 2 mm beyond the cube's face at index 14
    spacing = (2.0, 1.0, 1.0)
    m = label_metrics(prediction, reference, spacing)
    assert m.hd95 == pytest.approx(12.0)
    assert label_metrics(reference, prediction, spacing).hd95 == pytest.approx(12.0), "symmetric"
    assert m.assd == pytest.approx(36 * 12.0 / (524 + 488)), "ASSD still averages both directions together"
    try:
        import torch
        from monai.metrics import compute_hausdorff_distance
    except ImportError:
        return
    as_tensor = lambda mask: torch.from_numpy(mask[None, None].astype(np.float32))  # noqa: E731
    monai = compute_hausdorff_distance(
        as_tensor(prediction), as_tensor(reference), include_background=True, percentile=95, spacing=spacing
    )
    assert float(monai) == pytest.approx(m.hd95)
