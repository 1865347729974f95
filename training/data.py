"""Dataset readers for training: Medical Segmentation Decathlon layout (``dataset.json``, ``imagesTr/``,
``labelsTr/``), preprocessed with the engine's own :func:`medseg.preprocessing.preprocess`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from medseg import io
from medseg.errors import MedSegError
from medseg.models.card import Preprocessing
from medseg.preprocessing import label_to_network_grid, preprocess


class DatasetError(MedSegError):
    """The dataset is incomplete or inconsistent; raised before training starts."""


@dataclass
class Case:
    case_id: str
    images: list[Path]
    label: Path


@dataclass
class PreparedCase:
    case_id: str
    volume: np.ndarray  #: (C, X, Y, Z) float32, normalised
    label: np.ndarray  #: (X, Y, Z) uint8


def read_msd_dataset(root: str | Path) -> tuple[list[Case], dict[int, str]]:
    """Cases and label names of an MSD-layout dataset.

    Raises:
        DatasetError: missing ``dataset.json``, image or label files.
    """
    root = Path(root)
    description = root / "dataset.json"
    if not description.is_file():
        raise DatasetError(f"{description}: missing; an MSD dataset folder holds dataset.json, imagesTr/, labelsTr/")
    meta = json.loads(description.read_text())
    labels = {int(k): v for k, v in meta.get("labels", {}).items()}
    cases = []
    for entry in meta.get("training", []):
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve()
        for path in (image, label):
            if not path.is_file():
                raise DatasetError(f"{path}: listed in {description} but missing")
        case_id = image.name.removesuffix(".nii.gz").removesuffix(".nii")
        cases.append(Case(case_id=case_id, images=[image], label=label))
    if not cases:
        raise DatasetError(f"{description}: lists no training cases")
    return cases, labels


def split_cases(case_ids: list[str], *, validation_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A fixed, seeded train/validation split of case ids (sorted first, so the order on disk does not matter)."""
    ids = sorted(case_ids)
    random.Random(seed).shuffle(ids)
    n_val = max(1, round(len(ids) * validation_fraction))
    return sorted(ids[n_val:]), sorted(ids[:n_val])


def read_label(path: Path, valid_values: set[int]) -> sitk.Image:
    """Read a labelmap, cast to uint8, refusing non-integer values or values the dataset does not declare."""
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
        raise DatasetError(f"{path}: label values must be whole numbers")
    present = {int(v) for v in np.unique(array)}
    unknown = present - valid_values
    if unknown:
        raise DatasetError(
            f"{path}: label value(s) {sorted(unknown)} not in dataset.json labels {sorted(valid_values)}"
        )
    return sitk.Cast(image, sitk.sitkUInt8)


def prepare_case(case: Case, spec: Preprocessing, valid_values: set[int]) -> PreparedCase:
    """Preprocess one case exactly as the engine will at inference."""
    images = io.read_channels(case.images)
    label = read_label(case.label, valid_values)
    problem = io.grid_mismatch(images[0], label)
    if problem:
        raise DatasetError(f"{case.label}: its grid differs from {case.images[0]}: {problem}")
    volume, record = preprocess(images, spec)
    return PreparedCase(case.case_id, volume, label_to_network_grid(label, record))
