"""Dataset readers for training, preprocessed with the engine's own :func:`medseg.preprocessing.preprocess`.

Three layouts, each with one or more input channels:

- ``msd``: the Medical Segmentation Decathlon's ``dataset.json``, ``imagesTr/``, ``labelsTr/``. A case lists one
  image, or (MedSeg's extension) a list of images, one per channel.
- ``folders``: ``images/`` and ``labels/`` folders paired by file name; several channels as nnU-Net names
  them (``case_0000.nii.gz``, ``case_0001.nii.gz`` for ``case.nii.gz``), and ``labels`` maps values to names.
- ``case_folders``: one folder per case holding the channel files and the label file by name, as BRATS ships.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
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
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  #: mm along X, Y, Z of the network grid


def read_msd_dataset(root: str | Path) -> tuple[list[Case], dict[int, str]]:
    """Cases and label names of an MSD-layout dataset.

    Raises:
        DatasetError: missing ``dataset.json``, image or label files.
    """
    root = Path(root)
    description = root / "dataset.json"
    if not description.is_file():
        raise DatasetError(f"{description}: missing; an MSD dataset folder holds dataset.json, imagesTr/, labelsTr/")
    meta = json.loads(description.read_text(encoding="utf-8"))
    labels = {int(k): v for k, v in meta.get("labels", {}).items()}
    cases = []
    for entry in meta.get("training", []):
        names = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        images = [(root / name).resolve() for name in names]
        label = (root / entry["label"]).resolve()
        for path in (*images, label):
            if not path.is_file():
                raise DatasetError(f"{path}: listed in {description} but missing")
        cases.append(Case(case_id=_stem(images[0]), images=images, label=label))
    if not cases:
        raise DatasetError(f"{description}: lists no training cases")
    return cases, labels


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _stem(path: Path) -> str:
    """The file name without its image suffix (``.nii.gz`` kept whole), as the engine reads suffixes."""
    return path.name[: len(path.name) - len(io.image_suffix(path))]


def _label_names(spec: dict, where: str) -> dict[int, str]:
    labels = spec.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{where}: the dataset needs 'labels', a mapping of label values to names")
    return {int(k): str(v) for k, v in labels.items()}


def read_folder_pairs(spec: dict) -> tuple[list[Case], dict[int, str]]:
    """``{"layout": "folders", "images": DIR, "labels_dir": DIR, "labels": {...}, "channels": N}``."""
    images_dir, labels_dir = Path(spec["images"]), Path(spec["labels_dir"])
    channels = int(spec.get("channels", 1))
    labels = _label_names(spec, str(images_dir))
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: missing; a folder-pair dataset has an images and a labels folder")
    cases = []
    for label in sorted(p for p in labels_dir.iterdir() if p.name.endswith(IMAGE_SUFFIXES)):
        case_id = _stem(label)
        suffix = label.name[len(case_id) :]
        if channels == 1 and (images_dir / label.name).is_file():
            images = [images_dir / label.name]
        else:
            images = [images_dir / f"{case_id}_{c:04d}{suffix}" for c in range(channels)]
        for path in images:
            if not path.is_file():
                raise DatasetError(f"{path}: the image for label {label} is missing")
        cases.append(Case(case_id, images, label))
    labelled = {c.case_id for c in cases}
    unlabelled = set()
    for path in images_dir.iterdir():
        if not path.name.endswith(IMAGE_SUFFIXES):
            continue
        stem = _stem(path)
        nnunet = re.fullmatch(r"(.+)_\d{4}", stem)  # case_0000: a channel of case, single-channel data included
        if stem not in labelled and (nnunet is None or nnunet[1] not in labelled):
            unlabelled.add(nnunet[1] if nnunet else stem)
    if unlabelled:
        raise DatasetError(f"{labels_dir}: no label file for image(s) {sorted(unlabelled)[:5]} in {images_dir}")
    if not cases:
        raise DatasetError(f"{labels_dir}: holds no label images")
    return cases, labels


def read_case_folders(spec: dict) -> tuple[list[Case], dict[int, str]]:
    """``{"layout": "case_folders", "root": DIR, "channels": [FILE, ...], "label": FILE, "labels": {...}}``."""
    root = Path(spec["root"])
    channel_files, label_file = list(spec.get("channels", [])), spec.get("label")
    if not channel_files or not label_file:
        raise DatasetError(f"{root}: a case-folder dataset names its channel files ('channels') and 'label' file")
    labels = _label_names(spec, str(root))
    if not root.is_dir():
        raise DatasetError(f"{root}: missing")
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = [folder / name for name in channel_files]
        for path in (*images, folder / label_file):
            if not path.is_file():
                raise DatasetError(f"{path}: missing (case folder {folder.name})")
        cases.append(Case(folder.name, images, folder / label_file))
    if not cases:
        raise DatasetError(f"{root}: holds no case folders")
    return cases, labels


def read_dataset(spec) -> tuple[list[Case], dict[int, str]]:
    """The cases and label names of a dataset given as an MSD folder or a layout mapping (see the module doc).

    Raises:
        DatasetError: as each layout's reader does, or two cases share a case id (``x.nii.gz`` and ``x.nrrd``).
    """
    layout = spec.get("layout", "msd") if isinstance(spec, dict) else "msd"
    if layout == "folders":
        cases, labels = read_folder_pairs(spec)
    elif layout == "case_folders":
        cases, labels = read_case_folders(spec)
    else:
        cases, labels = read_msd_dataset(spec["root"] if isinstance(spec, dict) else spec)
    seen: dict[str, Case] = {}
    for case in cases:
        other = seen.setdefault(case.case_id, case)
        if other is not case:
            raise DatasetError(
                f"{case.label}: its case id {case.case_id!r} is also that of {other.label}; splits and results "
                "name cases by id, so each case needs its own (rename or remove one)"
            )
    return cases, labels


def split_cases(case_ids: list[str], *, validation_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A fixed, seeded train/validation split of case ids (sorted first, so the order on disk does not matter)."""
    ids = sorted(case_ids)
    random.Random(seed).shuffle(ids)
    n_val = max(1, round(len(ids) * validation_fraction))
    return sorted(ids[n_val:]), sorted(ids[:n_val])


def kfold_splits(case_ids: list[str], *, folds: int, seed: int) -> list[dict[str, list[str]]]:
    """k seeded, disjoint validation folds covering every case once (nnU-Net's ``splits_final.json`` shape)."""
    if folds > len(case_ids):
        raise DatasetError(f"{folds} folds need at least {folds} cases; the dataset has {len(case_ids)}")
    ids = sorted(case_ids)
    random.Random(seed).shuffle(ids)
    parts = [sorted(ids[i::folds]) for i in range(folds)]
    return [{"train": sorted(set(ids) - set(part)), "val": part} for part in parts]


def load_or_make_splits(path: Path, case_ids: list[str], *, folds: int, validation_fraction: float, seed: int):
    """The splits saved at ``path``, or new seeded ones written there, so later runs compare on the same cases.

    Raises:
        DatasetError: the case ids repeat; the saved splits name cases the dataset lacks, leave some out, name a
            case twice in one split, put a case in both a split's train and val, or validate a case in two folds.
    """
    path = Path(path)
    repeated = sorted(c for c, n in Counter(case_ids).items() if n > 1)
    if repeated:
        raise DatasetError(f"case id(s) {repeated[:5]} name more than one case; each case needs its own id")
    if path.is_file():
        splits = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(splits, list) or not all(
            isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list) for s in splits
        ):
            raise DatasetError(
                f'{path}: not a splits file; it holds a list of {{"train": [case ids], "val": [case ids]}}, one '
                "per fold"
            )
        if len(splits) != max(folds, 1):
            raise DatasetError(
                f"{path}: holds {len(splits)} split(s), the config asks for {max(folds, 1)} "
                f"({'folds' if folds else 'one validation fraction'}); delete the file or point splits_file elsewhere"
            )
        named = {c for split in splits for part in ("train", "val") for c in split[part]}
        if named != set(case_ids):
            missing, extra = sorted(set(case_ids) - named), sorted(named - set(case_ids))
            raise DatasetError(
                f"{path}: the saved splits do not match the dataset (not in the splits: {missing[:5]}, "
                f"not in the dataset: {extra[:5]}); delete the file or point splits_file elsewhere"
            )
        _refuse_leaks(splits, path)
        return splits
    if folds:
        splits = kfold_splits(case_ids, folds=folds, seed=seed)
    else:
        train, val = split_cases(case_ids, validation_fraction=validation_fraction, seed=seed)
        splits = [{"train": train, "val": val}]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(splits, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return splits


def _refuse_leaks(splits: list[dict[str, list[str]]], path: Path) -> None:
    """Refuse a split that validates on a case it trains on, names a case twice, or folds whose val parts overlap:
    a leaked case inflates the validation score silently."""
    for i, split in enumerate(splits):
        for part in ("train", "val"):
            twice = sorted(c for c, n in Counter(split[part]).items() if n > 1)
            if twice:
                raise DatasetError(f"{path}: split {i} names case(s) {twice[:5]} more than once in {part}")
        both = sorted(set(split["train"]) & set(split["val"]))
        if both:
            raise DatasetError(
                f"{path}: split {i} has case(s) {both[:5]} in both train and val; a case used to train cannot "
                "validate; fix the file or delete it to make new splits"
            )
    for i, first in enumerate(splits):
        for j in range(i + 1, len(splits)):
            shared = sorted(set(first["val"]) & set(splits[j]["val"]))
            if shared:
                raise DatasetError(
                    f"{path}: case(s) {shared[:5]} validate in both fold {i} and fold {j}; k-fold validation parts "
                    "must not overlap; fix the file or delete it to make new splits"
                )


def read_label(path: Path, valid_values: set[int]) -> sitk.Image:
    """Read a labelmap, cast to uint8, refusing non-integer values or values the dataset does not declare.

    Read as the engine reads its inputs: a truncated or corrupt file is refused, not zero-filled by ITK."""
    image = io.read_any_image(path)
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
    spacing = tuple(float(v) for v in record.network_reference.GetSpacing())
    return PreparedCase(case.case_id, volume, label_to_network_grid(label, record), spacing)


def random_patch(case: PreparedCase, patch: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A patch of ``patch`` size at a random place, zero-padded where the volume is smaller (as MONAI pads)."""
    volume, label = case.volume, case.label
    out_v = np.zeros((volume.shape[0], *patch), np.float32)
    out_l = np.zeros(patch, np.uint8)
    src, dst = [], []
    for size, p in zip(label.shape, patch):
        if size >= p:
            s = int(rng.integers(0, size - p + 1))
            src.append(slice(s, s + p))
            dst.append(slice(0, p))
        else:
            d = int(rng.integers(0, p - size + 1))
            src.append(slice(0, size))
            dst.append(slice(d, d + size))
    out_v[(slice(None), *dst)] = volume[(slice(None), *src)]
    out_l[tuple(dst)] = label[tuple(src)]
    return out_v, out_l
