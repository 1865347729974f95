"""Preprocessing and its inverse: orientation, resampling, crops, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import DIRECTIONS, physical_points_of_label, with_direction
from medseg.errors import InputImageError
from medseg.models.card import Normalization, Preprocessing
from medseg.postprocessing import restore_labels, restore_probabilities
from medseg.preprocessing import (
    IndexBox,
    image_to_network_array,
    label_to_network_grid,
    normalize_intensity,
    orientation_code,
    preprocess,
    resample_to_spacing,
)


def labelled_volume(direction) -> tuple[sitk.Image, sitk.Image]:
    """An asymmetric image and a label with three values, on an anisotropic grid with ``direction``."""
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.normal(50, 10, (11, 17, 23)).astype(np.float32))
    labels = np.zeros((11, 17, 23), np.uint8)
    labels[2:5, 3:9, 4:7] = 1
    labels[6:10, 10:15, 15:21] = 2
    labels[0, 0, 0] = 3  # a corner voxel: catches any off-by-one flip
    label = sitk.GetImageFromArray(labels)
    for im in (image, label):
        im.SetSpacing((0.6, 0.9, 3.0))
        im.SetOrigin((-40.0, 12.5, 100.0))
        im.SetDirection(direction)
    return image, label


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
@pytest.mark.parametrize("target", ["RAS", "LPS", "PIR"])
def test_label_round_trip_is_exact_without_resampling(direction, target):
    image, label = labelled_volume(direction)
    spec = Preprocessing(orientation=target, spacing=None, normalization=Normalization(method="none"))
    volume, record = preprocess([image], spec)
    assert orientation_code(record.network_reference) == target
    on_network = label_to_network_grid(label, record)
    assert on_network.shape == volume.shape[1:]
    back = restore_labels(on_network, record)
    assert back.GetSize() == label.GetSize()
    assert back.GetSpacing() == label.GetSpacing()
    assert back.GetOrigin() == label.GetOrigin()
    assert back.GetDirection() == label.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_reorientation_keeps_every_voxel_at_its_physical_point(direction):
    image, label = labelled_volume(direction)
    spec = Preprocessing(orientation="RAS", spacing=None, normalization=Normalization(method="none"))
    _, record = preprocess([image], spec)
    on_network = label_to_network_grid(label, record)
    network_label = sitk.GetImageFromArray(on_network.transpose(2, 1, 0))
    record.network_reference.apply(network_label)
    for value in (1, 2, 3):
        np.testing.assert_allclose(
            physical_points_of_label(network_label, value), physical_points_of_label(label, value), atol=1e-6
        )


def test_probabilities_round_trip_exactly_without_resampling():
    image, label = labelled_volume(DIRECTIONS["oblique"])
    spec = Preprocessing(orientation="RAS", spacing=None, normalization=Normalization(method="none"))
    _, record = preprocess([image], spec)
    on_network = label_to_network_grid(label, record)
    one_hot = np.stack([(on_network == v).astype(np.float32) for v in range(4)])
    restored = restore_probabilities(one_hot, record)
    expected = sitk.GetArrayFromImage(label).transpose(2, 1, 0)
    np.testing.assert_array_equal(np.argmax(restored, 0), expected)


def test_resampling_to_isotropic_and_back_keeps_the_labels():
    image, label = labelled_volume(DIRECTIONS["LPS"])
    spec = Preprocessing(orientation="RAS", spacing=(1.0, 1.0, 1.0), normalization=Normalization(method="none"))
    volume, record = preprocess([image], spec)
    assert record.resampled
    np.testing.assert_allclose(record.network_reference.GetSpacing(), (1.0, 1.0, 1.0))
    # 23*0.6, 17*0.9, 11*3.0 mm -> 14, 15, 33 voxels at 1 mm
    assert volume.shape[1:] == (14, 15, 33)
    on_network = label_to_network_grid(label, record)
    one_hot = np.stack([(on_network == v).astype(np.float32) for v in range(3)])
    restored = np.argmax(restore_probabilities(one_hot, record), 0)
    expected = sitk.GetArrayFromImage(label).transpose(2, 1, 0)
    for value in (1, 2):
        a, b = restored == value, expected == value
        dice = 2 * np.sum(a & b) / (a.sum() + b.sum())
        assert dice > 0.8, f"label {value}: Dice {dice:.3f} after 1 mm resampling and back"


def test_resample_to_spacing_keeps_extent_and_origin():
    image, _ = labelled_volume(DIRECTIONS["oblique"])
    resampled = resample_to_spacing(image, (1.2, 1.8, 1.5))
    assert resampled.GetSize() == (12, 8, 22)
    assert resampled.GetOrigin() == image.GetOrigin()
    assert resampled.GetDirection() == image.GetDirection()


def test_roi_restricts_the_network_input_and_maps_back():
    image, label = labelled_volume(DIRECTIONS["permuted"])
    box = IndexBox(start=(2, 1, 1), size=(10, 12, 6))
    spec = Preprocessing(orientation="LPS", spacing=None, normalization=Normalization(method="none"))
    volume, record = preprocess([image], spec, roi=box)
    assert sorted(volume.shape[1:]) == sorted(box.size)
    restored = sitk.GetArrayFromImage(restore_labels(label_to_network_grid(label, record), record))
    expected = np.zeros_like(sitk.GetArrayFromImage(label))
    inside = (slice(1, 7), slice(1, 13), slice(2, 12))  # (z, y, x) of the box
    expected[inside] = sitk.GetArrayFromImage(label)[inside]
    np.testing.assert_array_equal(restored, expected)


def test_roi_from_physical_corners():
    image, _ = labelled_volume(DIRECTIONS["LPS"])
    a = image.TransformIndexToPhysicalPoint((3, 2, 1))
    b = image.TransformIndexToPhysicalPoint((9, 8, 4))
    box = IndexBox.from_physical(image, a, b)
    assert box == IndexBox(start=(3, 2, 1), size=(7, 7, 4))


def test_foreground_crop_and_uncrop():
    array = np.zeros((20, 20, 20), np.float32)
    array[5:12, 6:10, 8:15] = np.random.default_rng(0).uniform(1, 2, (7, 4, 7))
    image = sitk.GetImageFromArray(array)
    label = sitk.GetImageFromArray((array > 1.5).astype(np.uint8))
    spec = Preprocessing(orientation=None, spacing=None, normalization=Normalization(method="none"), crop="foreground")
    volume, record = preprocess([image], spec)
    assert volume.shape[1:] == (7 + 8, 4 + 8, 7 + 8)  # (x, y, z) with a 4-voxel margin
    back = restore_labels(label_to_network_grid(label, record), record)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))


def test_zscore_puts_scales_of_different_magnitude_on_one_scale():
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 1.0, (10, 10, 10)).astype(np.float32)
    spec = Normalization(method="zscore", clip_percentiles=(0.5, 99.5))
    small = normalize_intensity(base * 89, spec)
    large = normalize_intensity(base * 500000, spec)
    np.testing.assert_allclose(small, large, atol=1e-4)
    assert abs(float(small.mean())) < 0.05 and abs(float(small.std()) - 1) < 0.05


def test_range_normalisation_for_ct():
    hu = np.array([-2000.0, -1000.0, 0.0, 400.0, 3000.0], np.float32)
    out = normalize_intensity(hu, Normalization(method="range", clip_percentiles=None, a_min=-1000, a_max=400))
    np.testing.assert_allclose(out, [0.0, 0.0, 1000 / 1400, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize(
    "spec",
    [
        Normalization(method="range", clip_percentiles=None, a_min=-57, a_max=164),
        Normalization(method="zscore", clip_percentiles=(0.5, 99.5), nonzero=True),
        Normalization(method="none", clip_percentiles=None),
    ],
    ids=["range", "zscore", "none"],
)
def test_normalisation_in_place_gives_the_textbook_float32_numbers(spec):
    """Written into the network array in place, the values are, bit for bit, the usual expressions in float32."""
    array = np.random.default_rng(12).normal(40, 300, (30, 20, 10)).astype(np.float32)
    array[::3] = 0
    if spec.method == "range":
        expected = ((np.clip(array, spec.a_min, spec.a_max) - spec.a_min) / (spec.a_max - spec.a_min)).astype(
            np.float32
        )
    elif spec.method == "zscore":
        sample = array[array != 0]
        low, high = np.percentile(sample, spec.clip_percentiles)
        clipped, sample = np.clip(array, low, high), np.clip(sample, low, high)
        expected = np.where(array != 0, (clipped - float(sample.mean())) / float(sample.std()), 0.0).astype(np.float32)
    else:
        expected = array.copy()
    out = np.full((2, *array.shape), np.nan, np.float32)
    assert normalize_intensity(array, spec, out=out[1]) is not None
    assert np.isnan(out[0]).all(), "only its own channel is written"
    np.testing.assert_array_equal(out[1], expected)
    np.testing.assert_array_equal(normalize_intensity(array, spec), expected)


def test_network_array_is_x_y_z():
    image = sitk.Image(4, 5, 6, sitk.sitkFloat32)
    image[3, 1, 2] = 7.0
    array = image_to_network_array(image)
    assert array.shape == (4, 5, 6)
    assert array[3, 1, 2] == 7.0


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
@pytest.mark.parametrize(
    "spacing",
    [(1.3, 0.9, 2.0), (1.0, 1.0, 1.0), (0.5, 2.2, 3.1), (0.4, 0.55, 1.25)],
)
def test_the_device_resampling_gives_simpleitks_network_input(blob_image, direction, spacing):
    """The GPU's resampling (torch, axis by axis), run here on the CPU, against SimpleITK's. Half the input's
    spacing puts the last output point exactly half a voxel past the last input voxel: outside, as for ITK."""
    import torch

    image = with_direction(blob_image, direction)
    spec = Preprocessing(orientation="RAS", spacing=spacing)
    expected, expected_record = preprocess([image], spec, roi=IndexBox((1, 2, 0), (17, 20, 14)))
    volume, record = preprocess([image], spec, roi=IndexBox((1, 2, 0), (17, 20, 14)), device=torch.device("cpu"))
    assert record == expected_record
    np.testing.assert_allclose(volume, expected, atol=1e-4)


@pytest.mark.parametrize(
    "dtype,low,high",
    [
        (np.int16, -1024, 3000),
        (np.uint8, 0, 255),
        (np.int32, -1024, 3000),
        (np.int32, -(2**30), 2**30),
        (np.float64, -1, 1),
    ],
)
@pytest.mark.parametrize("direction", ["LPS", "oblique"])
def test_network_input_is_the_float32_inputs_whatever_the_stored_type(dtype, low, high, direction):
    """Integers float32 holds exactly are resampled in their own type (half the memory of float32 for a CT's
    int16); the network input must be, bit for bit, that of the input cast to float32 first."""
    rng = np.random.default_rng(11)
    if np.issubdtype(dtype, np.integer):
        array = rng.integers(low, high, (14, 19, 23), endpoint=True).astype(dtype)
    else:
        array = rng.uniform(low, high, (14, 19, 23)) * (1 + 1e-12)  # float64 digits float32 cannot hold
    image = with_direction(sitk.GetImageFromArray(array), DIRECTIONS[direction])
    image.SetSpacing((0.8, 0.7, 2.5))
    spec = Preprocessing(orientation="RAS", spacing=(1.1, 1.3, 1.7))
    volume, record = preprocess([image], spec)
    expected, expected_record = preprocess([sitk.Cast(image, sitk.sitkFloat32)], spec)
    assert record == expected_record
    assert volume.dtype == np.float32
    np.testing.assert_array_equal(volume, expected)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.uint16, np.float64])
def test_device_resampling_uploads_the_stored_voxels_and_gets_the_same_numbers(dtype):
    """The GPU path sends (Z, Y, X) voxels in their own type and converts them there; run here on the CPU, it
    must give, bit for bit, what the float32 (X, Y, Z) copy it replaced gave."""
    import torch
    from medseg.preprocessing import resample_to_spacing_on, resampled_geometry
    from medseg.resampling import AxisAlignedResampler

    array = np.random.default_rng(13).integers(0, 250, (12, 17, 21)).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 1.1, 2.5))
    spacing = (1.3, 0.9, 1.7)
    maps = [(j, spacing[j] / image.GetSpacing()[j], 0.0) for j in range(3)]
    size = resampled_geometry(image, spacing).size
    resample = AxisAlignedResampler(maps, size, "cpu")
    expected = resample(torch.from_numpy(image_to_network_array(image))).numpy()
    values = resample_to_spacing_on(image, spacing, torch.device("cpu"))
    assert values.dtype == np.float32 and values.shape == expected.shape == (13, 21, 18)
    np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_the_grid_border_takes_the_edge_values_not_zero(direction):
    """A grid over the image's extent keeps the first voxel's centre, so its last points can lie half a voxel past
    the image's last one (every exact 2x upsampling does). Those take the edge's values on the CPU and on the
    device alike; ITK alone gave 0 there, or not, as its rounding of that border point fell."""
    import torch
    from medseg.postprocessing import restore_argmax, restore_argmax_on
    from medseg.preprocessing import label_to_network_grid, resample_to_spacing, resample_to_spacing_on

    array = np.random.default_rng(3).uniform(10, 20, (6, 7, 8)).astype(np.float32)  # (z, y, x): all nonzero
    image = with_direction(sitk.GetImageFromArray(array), direction)
    image.SetSpacing((2.2, 1.6, 5.0))
    half = (1.1, 0.8, 2.5)
    on_cpu = sitk.GetArrayFromImage(resample_to_spacing(image, half)).transpose(2, 1, 0)
    on_device = resample_to_spacing_on(image, half, torch.device("cpu"))
    assert on_cpu.shape == (16, 14, 12) and on_cpu.min() >= 10 and on_device.min() >= 10
    np.testing.assert_allclose(on_device, on_cpu, atol=1e-4)
    # the last x: half a voxel past the last input voxel, the edge's values (as at the last input voxel's centre)
    np.testing.assert_allclose(on_cpu[-1], on_cpu[-2], atol=1e-4)

    # the other way: a result on a grid of twice the input's spacing, restored onto the input's grid
    image.SetSpacing(half)
    volume, record = preprocess([image], Preprocessing(orientation="RAS", spacing=(2.2, 1.6, 5.0)))
    probabilities = np.zeros((2, *volume.shape[1:]), np.float32)
    probabilities[1] = 1.0  # foreground everywhere
    assert restore_argmax(probabilities, record).min() == 1
    assert restore_argmax_on(probabilities, record, torch.device("cpu")).min() == 1
    label = sitk.Cast(image > 0, sitk.sitkUInt8)  # foreground everywhere: so on the network grid too
    assert label_to_network_grid(label, record).min() == 1


def test_zscore_of_non_zero_voxels_keeps_a_skull_stripped_background_at_zero():
    """Every voxel of a skull-stripped brain is above 0: clipping lifts the background's zeros to the low
    percentile, and the mask of voxels that count must be the input's, not the clipped array's."""
    rng = np.random.default_rng(3)
    brain = np.zeros((24, 20, 16), np.float32)
    brain[4:20, 3:17, 2:14] = rng.gamma(4.0, 60.0, (16, 14, 12)) + 1.0
    spec = Normalization(method="zscore", clip_percentiles=(0.5, 99.5), nonzero=True)
    out = normalize_intensity(brain, spec)
    inside = brain != 0
    assert np.all(out[~inside] == 0.0), f"background became {np.unique(out[~inside])[:3]}"
    low, high = np.percentile(brain[inside], spec.clip_percentiles)
    sample = np.clip(brain[inside], low, high)
    np.testing.assert_allclose(out[inside], (sample - sample.mean()) / sample.std(), rtol=1e-5, atol=1e-5)
    # without ``nonzero`` (the bundled model's) every voxel counts, the background too, as before
    everywhere = Normalization(method="zscore", clip_percentiles=(0.5, 99.5), nonzero=False)
    clipped = np.clip(brain, *np.percentile(brain, everywhere.clip_percentiles))
    expected = ((clipped - float(clipped.mean())) / float(clipped.std())).astype(np.float32)
    np.testing.assert_array_equal(normalize_intensity(brain, everywhere), expected)


def test_a_roi_outside_the_volume_is_refused_not_clipped_to_an_edge_slab():
    image, _ = labelled_volume(DIRECTIONS["LPS"])
    spec = Preprocessing(orientation=None, spacing=None, normalization=Normalization(method="none"))
    size = "x".join(str(n) for n in image.GetSize())
    for box in (IndexBox(start=(40, 0, 0), size=(5, 5, 5)), IndexBox(start=(-9, 2, 2), size=(4, 3, 3))):
        with pytest.raises(InputImageError, match=rf"region of interest .* lies outside the {size} volume"):
            preprocess([image], spec, roi=box)
    volume, _ = preprocess([image], spec, roi=IndexBox(start=(-9, 2, 2), size=(10, 3, 3)))  # one column inside
    assert volume.shape[1:] == (1, 3, 3)


def test_the_tensor_path_keeps_a_flat_background_flat_so_the_foreground_crop_matches_itks():
    """The GPU path's interpolation (run here on the CPU) keeps a constant exact, as ITK does: -3024 interpolated as
    a (1 - w) + b w came out a rounding step lower in about 7 % of voxels, and the foreground crop ("above the
    minimum") then took the whole grid."""
    import torch

    array = np.full((12, 40, 40), -3024, np.int16)
    array[5:8, 18:24, 18:24] = 40
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.625, 0.625, 2.5))
    spec = Preprocessing(
        orientation=None, spacing=(0.8, 0.8, 1.5), normalization=Normalization(method="none"), crop="foreground"
    )
    itk_volume, itk_record = preprocess([image], spec)
    volume, record = preprocess([image], spec, device=torch.device("cpu"))
    assert record.foreground_box == itk_record.foreground_box
    assert record.foreground_box.size != tuple(record.resampled_reference.GetSize())  # a crop, not the whole grid
    volume = volume.cpu().numpy() if isinstance(volume, torch.Tensor) else volume
    assert volume.shape == itk_volume.shape and float(volume.min()) == -3024.0
    np.testing.assert_allclose(volume, itk_volume, atol=1e-3)


def test_labels_on_a_grid_twice_as_fine_sit_where_the_image_does():
    """3 mm slices on a 1.5 mm network grid: every other network slice lies halfway between two input slices. Such
    ties go the same way on both sides of a structure (ITK's nearest neighbour rounds them all up: the label sat a
    quarter of an input slice off the image), so the label is symmetric where the image is."""
    array = np.zeros((16, 6, 6), np.float32)
    array[5:8] = 100.0  # input slices 5, 6 and 7
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 3.0))
    label = sitk.GetImageFromArray((array > 0).astype(np.uint8))
    label.CopyInformation(image)
    spec = Preprocessing(orientation=None, spacing=(1.0, 1.0, 1.5), normalization=Normalization(method="none"))
    volume, record = preprocess([image], spec)
    on_network = label_to_network_grid(label, record)[2, 2]  # along z
    profile = volume[0, 2, 2]
    inside = np.flatnonzero(on_network)
    assert len(inside) > 0
    # symmetric about the image's centre of mass along z, as the image itself is
    centre = float(np.sum(np.arange(len(profile)) * profile) / np.sum(profile))
    assert inside.min() + inside.max() == pytest.approx(2 * centre, abs=1e-6)
    assert set(np.unique(on_network)) == {0, 1}


def test_labels_keep_every_value_and_later_labels_win_ties():
    array = np.zeros((8, 8, 8), np.uint8)
    array[:, :, :4], array[:, :, 4:] = 2, 5  # two labels meeting halfway
    label = sitk.GetImageFromArray(array)
    image = sitk.Cast(label, sitk.sitkFloat32)
    spec = Preprocessing(orientation=None, spacing=(0.5, 1.0, 1.0), normalization=Normalization(method="none"))
    _, record = preprocess([image], spec)
    on_network = label_to_network_grid(label, record)
    assert on_network.dtype == np.uint8 and set(np.unique(on_network)) == {2, 5}  # no background between them
