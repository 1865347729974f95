"""Training augmentation: every transform keeps shapes, moves image and label together, and is seeded."""

from __future__ import annotations

import numpy as np
import pytest

from training.augment import augment
from training.config import Augmentation

OFF = {"intensity_scale": 0.0, "intensity_shift": 0.0, "noise_std": 0.0}


def _ball():
    grid = np.indices((24, 28, 20)).astype(np.float32)
    centre = np.array([10, 16, 9], np.float32)[:, None, None, None]
    radius = np.sqrt(((grid - centre) ** 2 * np.array([1.0, 0.6, 1.4])[:, None, None, None]).sum(0))
    label = (radius < 7).astype(np.uint8) + (radius < 3).astype(np.uint8)
    volume = (label.astype(np.float32) * 100.0)[None]
    return volume, label


SPATIAL = [
    {"flip_axes": (0, 1, 2)},
    {"rotation_degrees": 30.0, "rotation_probability": 1.0},
    {"scale": 0.3, "scale_probability": 1.0},
    {"elastic_probability": 1.0, "elastic_sigma": (3.0, 4.0), "elastic_magnitude": (80.0, 120.0)},
]


@pytest.mark.parametrize("settings", SPATIAL, ids=["flip", "rotation", "scale", "elastic"])
def test_spatial_transforms_move_image_and_label_together(settings):
    volume, label = _ball()
    changed = 0
    for seed in range(4):
        out_v, out_l = augment(volume, label, Augmentation(**settings, **OFF), np.random.default_rng(seed))
        assert out_v.shape == volume.shape and out_l.shape == label.shape and out_l.dtype == np.uint8
        assert set(np.unique(out_l)) <= {0, 1, 2}
        # the image was 100 x label: after the move, the image's level still tells the label almost everywhere
        agreement = np.mean(np.rint(out_v[0] / 100.0).clip(0, 2) == out_l)
        assert agreement > 0.97, f"image and label drifted apart ({agreement:.3f})"
        changed += not np.array_equal(out_l, label)
    assert changed >= 2, "the transform never changed the label"


@pytest.mark.parametrize(
    "settings",
    [
        {"noise_std": 0.5},
        {"intensity_scale": 0.5},
        {"intensity_shift": 0.5},
        {"gamma_probability": 1.0, "gamma": (0.5, 0.6)},
        {"bias_field_probability": 1.0, "bias_field_coefficients": 0.8},
    ],
    ids=["noise", "contrast", "brightness", "gamma", "bias_field"],
)
def test_intensity_transforms_change_the_image_only(settings):
    volume, label = _ball()
    volume = volume / 100.0 + 0.5
    out_v, out_l = augment(volume, label, Augmentation(**{**OFF, **settings}), np.random.default_rng(0))
    assert np.array_equal(out_l, label)
    assert out_v.shape == volume.shape and out_v.dtype == np.float32 and np.isfinite(out_v).all()
    assert np.abs(out_v - volume).mean() > 0.02


def test_all_transforms_off_leave_the_patch_as_it_was():
    volume, label = _ball()
    out_v, out_l = augment(volume, label, Augmentation(**OFF), np.random.default_rng(0))
    assert np.array_equal(out_v, volume) and np.array_equal(out_l, label)


def test_augmentation_is_a_function_of_its_seed():
    volume, label = _ball()
    everything = Augmentation(
        flip_axes=(0,),
        rotation_degrees=20,
        rotation_probability=1,
        scale=0.2,
        elastic_probability=1,
        bias_field_probability=1,
        gamma_probability=1,
    )
    a = augment(volume, label, everything, np.random.default_rng([0, 1, 2]))
    b = augment(volume, label, everything, np.random.default_rng([0, 1, 2]))
    c = augment(volume, label, everything, np.random.default_rng([0, 1, 3]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_the_default_bias_field_is_a_gentle_one():
    """The field multiplies the image by exp(a smooth polynomial): with the default coefficients it stays within a
    few times the image across a patch. The old default (0.5) gave fields from 0.2x to over 100x."""
    ones = np.ones((1, 48, 64, 48), np.float32)
    ratios = []
    for seed in range(10):
        aug = Augmentation(bias_field_probability=1.0, **OFF)
        out, _ = augment(ones, np.zeros(ones.shape[1:], np.uint8), aug, np.random.default_rng(seed))
        ratios.append(float(out.max() / out.min()))
    assert max(ratios) < 10.0 and min(ratios) > 1.05  # a field, and a gentle one
