"""On-the-fly augmentation of training patches: spatial (flips, rotations, scaling, elastic) and intensity (noise,
bias field, gamma, contrast, brightness), each chosen and sized by the config's ``augmentation``.

Every random draw comes from the ``numpy.random.Generator`` the caller passes, which the training loop seeds by
(seed, epoch, batch, position in the batch). A sample's augmentation is therefore a pure function of where it
sits in the run: a resumed run and a run split over several processes see exactly the samples one
uninterrupted process sees. MONAI's own random transforms are reseeded from that generator before each use.
"""

from __future__ import annotations

import math

import numpy as np

from .config import Augmentation


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _affine(volume: np.ndarray, label: np.ndarray, aug: Augmentation, rng: np.random.Generator):
    rotate = aug.rotation_degrees > 0 and rng.random() < aug.rotation_probability
    scale = aug.scale > 0 and rng.random() < aug.scale_probability
    if not rotate and not scale:
        return volume, label
    from monai.transforms import Affine

    limit = math.radians(aug.rotation_degrees)
    angles = [float(rng.uniform(-limit, limit)) for _ in range(3)] if rotate else None
    zoom = float(rng.uniform(1 - aug.scale, 1 + aug.scale)) if scale else None
    affine = Affine(
        rotate_params=angles,
        scale_params=[zoom] * 3 if zoom else None,
        padding_mode="zeros",
        image_only=True,
    )
    volume = np.asarray(affine(volume, mode="bilinear"), dtype=np.float32)
    label = np.asarray(affine(label[None].astype(np.float32), mode="nearest"))[0].round().astype(np.uint8)
    return volume, label


def _elastic(volume: np.ndarray, label: np.ndarray, aug: Augmentation, rng: np.random.Generator):
    if aug.elastic_probability <= 0 or rng.random() >= aug.elastic_probability:
        return volume, label
    from monai.transforms import Rand3DElasticd

    elastic = Rand3DElasticd(
        keys=("image", "label"),
        sigma_range=tuple(aug.elastic_sigma),
        magnitude_range=tuple(aug.elastic_magnitude),
        prob=1.0,
        mode=("bilinear", "nearest"),
        padding_mode="zeros",
    )
    elastic.set_random_state(seed=_seed(rng))
    out = elastic({"image": volume, "label": label[None].astype(np.float32)})
    return (
        np.asarray(out["image"], dtype=np.float32),
        np.asarray(out["label"])[0].round().astype(np.uint8),
    )


def _intensity(volume: np.ndarray, aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    if aug.bias_field_probability > 0 and rng.random() < aug.bias_field_probability:
        from monai.transforms import RandBiasField

        bias = RandBiasField(coeff_range=(0.0, aug.bias_field_coefficients), prob=1.0)
        bias.set_random_state(seed=_seed(rng))
        volume = np.stack([np.asarray(bias(channel[None]))[0] for channel in volume]).astype(np.float32)
    if aug.gamma_probability > 0 and rng.random() < aug.gamma_probability:
        gamma = float(rng.uniform(*aug.gamma))
        low = volume.min(axis=(1, 2, 3), keepdims=True)
        span = np.maximum(volume.max(axis=(1, 2, 3), keepdims=True) - low, 1e-7)
        volume = (((volume - low) / span) ** gamma * span + low).astype(np.float32)
    scale = 1 + rng.uniform(-aug.intensity_scale, aug.intensity_scale)
    shift = rng.uniform(-aug.intensity_shift, aug.intensity_shift)
    volume = volume * np.float32(scale) + np.float32(shift)
    if aug.noise_std > 0 and rng.random() < aug.noise_probability:
        volume = volume + rng.normal(0, aug.noise_std, volume.shape).astype(np.float32)
    return volume


def augment(volume: np.ndarray, label: np.ndarray, aug: Augmentation, rng: np.random.Generator):
    """Augment one (C, X, Y, Z) float32 patch and its (X, Y, Z) uint8 label; shapes are kept."""
    for axis in aug.flip_axes:
        if rng.random() < 0.5:
            volume = np.flip(volume, axis=axis + 1)
            label = np.flip(label, axis=axis)
    volume, label = _affine(np.ascontiguousarray(volume), np.ascontiguousarray(label), aug, rng)
    volume, label = _elastic(volume, label, aug, rng)
    volume = _intensity(volume, aug, rng)
    return np.ascontiguousarray(volume, dtype=np.float32), np.ascontiguousarray(label, dtype=np.uint8)
