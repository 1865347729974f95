"""Test helpers: synthetic model folders, geometries, and a threshold network with a known answer."""

from __future__ import annotations

import json
import locale
import stat
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from medseg.models.card import card_from_dict
from medseg.models.folder import LoadedModel, sha256_of


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 fast (AMX or AVX-512-BF16): the engine's own probe."""
    from medseg.inference import low_precision_for

    return low_precision_for(torch.device("cpu")) is not None


def card_dict(**overrides) -> dict:
    card = {
        "format_version": 1,
        "id": "tiny-test",
        "version": "0.0.1",
        "name": "Tiny test model",
        "description": "untrained, for tests",
        "task": "segmentation",
        "modality": "MR",
        "licence": "Apache-2.0",
        "channels": [{"name": "T1", "modality": "MR"}],
        "labels": [
            {
                "value": 1,
                "name": "Bright",
                "color": [255, 0, 0],
                "terminology": {
                    "category": ["SCT", "91723000", "Anatomical Structure"],
                    "type": ["SCT", "5366008", "Hippocampus"],
                },
            },
            {"value": 2, "name": "Other", "color": [0, 128, 255]},
        ],
        "preprocessing": {
            "orientation": "RAS",
            "spacing": None,
            "normalization": {"method": "zscore", "clip_percentiles": [0.5, 99.5]},
            "crop": "none",
        },
        "network": {"architecture": "UNet", "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
        "inference": {"roi_size": [16, 16, 16], "overlap": 0.25, "blend_mode": "gaussian", "sw_batch_size": 2},
        "weights": {"file": "model.pt", "sha256": "0" * 64},
    }
    card.update(overrides)
    return card


def write_model_folder(folder: Path, **overrides) -> Path:
    """Write a valid model folder: card plus the state_dict of the network it describes (seeded)."""
    from medseg.models.architectures import build_network

    folder.mkdir(parents=True, exist_ok=True)
    data = card_dict(**overrides)
    card = card_from_dict(data)
    torch.manual_seed(0)
    network = build_network(
        card.network.architecture,
        in_channels=len(card.channels),
        out_channels=card.num_classes,
        kwargs=card.network.kwargs,
    )
    torch.save(network.state_dict(), folder / "model.pt")
    data["weights"]["sha256"] = sha256_of(folder / "model.pt")
    (folder / "model.json").write_text(json.dumps(data, indent=2))
    return folder


class Confident(torch.nn.Module):
    """A convolution whose logits are far apart except at the edge of a bright object (a trained model's shape)."""

    def __init__(self, gain: float = 40.0) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(gain / 27)

    def forward(self, x):
        score = self.conv(x - 0.5)
        return torch.cat([-score, score], dim=1)


def unsure_but_for_a_confident_middle() -> np.ndarray:
    """(1, 64, 24, 24): on :class:`Confident`'s decision boundary but for a confident middle, where the trial runs."""
    volume = np.full((1, 64, 24, 24), 0.5, np.float32)  # exactly on the decision boundary
    volume += np.random.default_rng(0).normal(0, 0.01, volume.shape).astype(np.float32)
    volume[:, 24:40] = 1.0
    return volume


class ThresholdNet(torch.nn.Module):
    """Logits that make class 1 where the normalised input is above ``level``, else background.

    Class 2 is never chosen. Voxel-wise, so sliding windows and blending must reproduce it exactly.
    """

    def __init__(self, level: float = 1.0) -> None:
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        signal = 8.0 * (x[:, :1] - self.level)
        return torch.cat([-signal, signal, torch.full_like(signal, -20.0)], dim=1)


def threshold_model(tmp_path: Path, **preprocessing) -> LoadedModel:
    """A LoadedModel whose network is :class:`ThresholdNet`, with a card customised by ``preprocessing``."""
    prep = {
        "orientation": "RAS",
        "spacing": None,
        "crop": "none",
        "normalization": {"method": "zscore", "clip_percentiles": None},
    }
    prep.update(preprocessing)
    card = card_from_dict(card_dict(preprocessing=prep))
    return LoadedModel(card=card, folder=tmp_path, network=ThresholdNet())


def oblique_direction(degrees: float = 20.0) -> tuple[float, ...]:
    """A rotation about an oblique axis, with one flipped axis, as a flat 3x3 direction matrix."""
    angle = np.deg2rad(degrees)
    axis = np.array([1.0, 2.0, 0.5])
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return tuple((rotation @ np.diag([1.0, -1.0, 1.0])).ravel())


DIRECTIONS = {
    "LPS": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    "RAS": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    "permuted": (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    "oblique": oblique_direction(),
}


def with_direction(image: sitk.Image, direction) -> sitk.Image:
    out = sitk.Image(image)
    out.SetDirection(direction)
    return out


def physical_points_of_label(image: sitk.Image, value: int = 1) -> np.ndarray:
    """LPS coordinates (mm) of every voxel with ``value``, sorted, for comparing placements across grids."""
    indices = np.argwhere(sitk.GetArrayViewFromImage(image) == value)[:, ::-1]  # (z,y,x) -> (x,y,z)
    points = np.array([image.TransformIndexToPhysicalPoint(tuple(int(v) for v in idx)) for idx in indices])
    return points[np.lexsort(points.T[::-1])] if len(points) else points


def write_dicom_series(array_zyx: np.ndarray, folder: Path, *, spacing, origin, tilt_mm: float = 0.0) -> Path:
    """Write an int16 (z, y, x) array as a DICOM series of axial slices, one file per slice; with ``tilt_mm``,
    each slice is shifted that far along y from the one before (a gantry-tilted acquisition's positions).

    GDCM's writer sets the process locale to "C", which makes Python's default text encoding ASCII for every later
    test in the process (torch.compile then fails to read its UTF-8 templates); the locale is restored after.
    """
    previous = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_series(array_zyx, folder, spacing=spacing, origin=origin, tilt_mm=tilt_mm)
    finally:
        locale.setlocale(locale.LC_ALL, previous)


def _write_dicom_series(array_zyx: np.ndarray, folder: Path, *, spacing, origin, tilt_mm: float) -> Path:
    image = sitk.GetImageFromArray(array_zyx.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array_zyx.shape[0]):
        slice_ = image[:, :, k]
        tags = {
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.1",  # series instance UID
            "0020|0032": "\\".join(
                str(v) for v in np.add(image.TransformIndexToPhysicalPoint((0, 0, k)), (0.0, k * tilt_mm, 0.0))
            ),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k + 1),
            "0008|0060": "MR",
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)
    return folder


def shell_launcher(path: Path, script: str) -> str:
    """An executable shell script at ``path`` (POSIX): a stand-in for the engine's interpreter, which
    ``EngineProcess`` runs as ``<interpreter> -m medseg ...`` (the script may ignore those arguments)."""
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (Linux: reads /proc); a zombie has, only its exit status is uncollected."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except FileNotFoundError:
        return True
    return "State:\tZ" in status
