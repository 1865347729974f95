"""Graph-cut refinement of files: ``medseg refine IMAGE SEGMENTATION_OR_PROBABILITIES -o OUT``.

Reads the image, the segmentation (a labelmap, a single probability map, or per-class probabilities as a vector
image) and optional stroke masks, checks that they share one voxel grid, refines with
:func:`medseg.graphcut.refine_labelmap`, and writes the labelmap atomically. Every error names its file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import io
from .errors import InputImageError
from .graphcut import GraphCutOptions, probabilities_from_labelmap, refine_labelmap


@dataclass
class RefineSummary:
    volumes_ml: dict[int, tuple[float, float]]  #: label value -> (before, after)
    seconds: float


def read_segmentation(path: Path, image: sitk.Image) -> tuple[np.ndarray, list[int], np.ndarray]:
    """(probabilities (C, z, y, x), label values, labelmap before refinement) from a labelmap, one probability
    map, or a vector image."""
    segmentation = io.read_any_image(path)
    _check_grid(image, segmentation, path)
    array = sitk.GetArrayFromImage(segmentation)
    if segmentation.GetNumberOfComponentsPerPixel() > 1:
        probabilities = np.moveaxis(array, -1, 0).astype(np.float32)
        labels = list(range(1, probabilities.shape[0]))
    elif array.dtype.kind == "f" and array.size and float(np.nanmax(array)) <= 1.0 and not _is_integral(array):
        probabilities = np.stack([1.0 - array, array]).astype(np.float32)  # one structure's probability
        labels = [1]
    else:
        if array.dtype.kind == "f" and not np.isfinite(array).all():  # NaN would be cast to a label silently
            raise InputImageError(path, "the segmentation holds NaN or infinite values")
        if array.min() < 0 or not _is_integral(array):
            raise InputImageError(path, "a labelmap must hold whole label values 0, 1, 2, ...")
        labels = sorted(int(v) for v in np.unique(array) if v > 0)
        if not labels:
            raise InputImageError(path, "the segmentation is empty: there is nothing to refine")
        if labels[-1] > 255:
            raise InputImageError(path, f"label values go up to {labels[-1]}; refinement supports 1 to 255")
        probabilities = probabilities_from_labelmap(array.astype(np.int32), labels, image.GetSpacing())
        return _checked(probabilities, path), labels, array.astype(np.uint8)
    if len(labels) > 255:
        raise InputImageError(path, f"{len(labels)} classes; refinement supports up to 255 labels")
    return _checked(probabilities, path), labels, np.argmax(probabilities, axis=0).astype(np.uint8)


def _checked(probabilities: np.ndarray, path: Path) -> np.ndarray:
    if not np.isfinite(probabilities).all() or probabilities.min() < -1e-6 or probabilities.max() > 1 + 1e-6:
        raise InputImageError(path, "probabilities must be finite and lie in [0, 1]")
    return probabilities


def _check_grid(image: sitk.Image, other: sitk.Image, path: Path) -> None:
    mismatch = io.grid_mismatch(image, other)
    if mismatch is not None:
        raise InputImageError(path, f"not on the image's voxel grid: {mismatch}")


def _is_integral(array: np.ndarray) -> bool:
    return array.dtype.kind in "iub" or bool(np.all(np.mod(array[np.isfinite(array)], 1) == 0))


def read_strokes(path: Path, image: sitk.Image) -> np.ndarray:
    strokes = io.read_any_image(path)
    _check_grid(image, strokes, path)
    if strokes.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(path, "a stroke mask must have one value per voxel")
    array = sitk.GetArrayFromImage(strokes)
    if array.dtype.kind == "f" and (not np.isfinite(array).all() or not _is_integral(array)):
        raise InputImageError(path, "a stroke mask must hold whole values (0 for none, else a label), not fractions")
    if not np.any(array):
        raise InputImageError(path, "the stroke mask is empty: paint at least one voxel, or leave it out")
    return array


def refine_files(
    image_path: str | Path,
    segmentation_path: str | Path,
    output: str | Path,
    *,
    seeds_fg: str | Path | None = None,
    seeds_bg: str | Path | None = None,
    options: GraphCutOptions | None = None,
) -> RefineSummary:
    """Refine a segmentation file with its image (and strokes) and write the labelmap; nothing is written on error."""
    output = io.check_output_path(output)
    io.refuse_overwriting_inputs(
        [p for p in (image_path, segmentation_path, seeds_fg, seeds_bg) if p is not None], [output]
    )
    image = io.read_image(image_path)
    probabilities, labels, before = read_segmentation(Path(segmentation_path), image)
    foreground = None if seeds_fg is None else read_strokes(Path(seeds_fg), image).astype(np.int32)
    background = None if seeds_bg is None else read_strokes(Path(seeds_bg), image) != 0
    if foreground is not None:
        unknown = sorted(set(np.unique(foreground).tolist()) - {0, *labels})
        if unknown:
            raise InputImageError(seeds_fg, f"stroke values {unknown} are not labels of the segmentation {labels}")
    if foreground is not None and background is not None:
        both = int(np.count_nonzero((foreground > 0) & background))
        if both:
            raise InputImageError(seeds_fg, f"{both} voxel(s) are also background strokes in {seeds_bg}")
    start = time.perf_counter()
    refined = refine_labelmap(
        sitk.GetArrayViewFromImage(image),
        probabilities,
        spacing=image.GetSpacing(),
        labels=labels,
        options=options,
        foreground=foreground,
        background=background,
    )
    seconds = time.perf_counter() - start
    result = sitk.GetImageFromArray(refined)
    result.CopyInformation(image)
    io.write_image(result, output, orientation=io.read_nifti_orientation(image_path, image))
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    volumes = {v: (float((before == v).sum()) * voxel_ml, float((refined == v).sum()) * voxel_ml) for v in labels}
    return RefineSummary(volumes_ml=volumes, seconds=seconds)
