"""Preprocessing: from input images on their own grid to the network's input array, and the record to undo it.

Order: crop to an ROI (optional) → reorient to the card's orientation (a permutation and flip of axes, exact)
→ resample to the card's spacing (linear; skipped when the spacing already matches) → crop to the foreground
(optional) → per-image intensity normalisation.

The network array is float32 with shape (C, X, Y, Z): channels first, then ITK's index order, as MONAI's
``LoadImage`` gives for NIfTI. SimpleITK's ``GetArrayFromImage`` gives (Z, Y, X); :func:`image_to_network_array`
and :func:`network_array_to_image` are the only places that transpose.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError
from .models.card import Normalization, Preprocessing

#: Spacings closer than this (relative) to the target are not resampled, which keeps the round trip exact.
SPACING_TOLERANCE = 1e-3


@dataclass(frozen=True)
class IndexBox:
    """A box of voxels on a grid: ``start`` and ``size`` in ITK index order (x, y, z)."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    @classmethod
    def from_physical(cls, image: sitk.Image, corner_a: Sequence[float], corner_b: Sequence[float]) -> IndexBox:
        """The voxels of ``image`` inside the axis-aligned box spanned by two LPS points (mm), clipped to it."""
        corners = np.array(
            [[a if (i >> k) & 1 else b for k, (a, b) in enumerate(zip(corner_a, corner_b))] for i in range(8)]
        )
        indices = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(map(float, c))) for c in corners])
        low = np.maximum(np.floor(indices.min(0) + 0.5), 0).astype(int)
        high = np.minimum(np.ceil(indices.max(0) - 0.5), np.array(image.GetSize()) - 1).astype(int)
        if np.any(high < low):
            raise InputImageError(None, "the region of interest does not overlap the volume")
        return cls(start=tuple(int(v) for v in low), size=tuple(int(v) for v in high - low + 1))

    def overlaps(self, size: Sequence[int]) -> bool:
        """Whether any voxel of the box lies on a grid of ``size`` (x, y, z)."""
        stop = np.array(self.start) + self.size
        return bool(np.all(np.array(self.size) > 0) and np.all(stop > 0) and np.all(np.array(self.start) < size))

    def overlap_problem(self, size: Sequence[int]) -> str | None:
        """Why no voxel of the box lies on a grid of ``size`` (x, y, z); None when one does."""
        if self.overlaps(size):
            return None
        first, last = self.start, tuple(a + n - 1 for a, n in zip(self.start, self.size))
        volume = "x".join(str(n) for n in size)
        return f"the region of interest (voxels {first} to {last}) lies outside the {volume} volume"

    def clip_to(self, size: Sequence[int]) -> IndexBox:
        """The part of the box on a grid of ``size`` (x, y, z).

        Raises:
            InputImageError: no voxel of the box lies on the grid (clipped, it would be a one-voxel slab at its edge).
        """
        problem = self.overlap_problem(size)
        if problem:
            raise InputImageError(None, problem)
        start = np.clip(self.start, 0, np.array(size) - 1)
        stop = np.clip(np.array(self.start) + self.size, start + 1, size)
        return IndexBox(tuple(int(v) for v in start), tuple(int(v) for v in stop - start))


@dataclass(frozen=True)
class PhysicalBox:
    """An axis-aligned box given by two opposite corners in LPS millimetres, resolved on an image's grid later."""

    corner_a: tuple[float, float, float]
    corner_b: tuple[float, float, float]

    def to_index_box(self, image: sitk.Image) -> IndexBox:
        return IndexBox.from_physical(image, self.corner_a, self.corner_b)


@dataclass(frozen=True)
class Geometry:
    """A voxel grid without voxels: size, spacing, origin and direction, as ITK has them.

    It answers the ``Get*`` calls of an image, so code that only reads geometry takes either.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image | Geometry) -> Geometry:
        return cls(
            tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection())
        )

    def GetSize(self) -> tuple[int, ...]:  # noqa: N802  (ITK's names)
        return self.size

    def GetSpacing(self) -> tuple[float, ...]:  # noqa: N802
        return self.spacing

    def GetOrigin(self) -> tuple[float, ...]:  # noqa: N802
        return self.origin

    def GetDirection(self) -> tuple[float, ...]:  # noqa: N802
        return self.direction

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Give ``image`` (of this size) this grid's spacing, origin and direction, in place."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"an image of size {image.GetSize()} cannot take the geometry of a {self.size} grid")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def crop(self, box: IndexBox) -> Geometry:
        matrix = np.array(self.direction).reshape(3, 3)
        origin = np.array(self.origin) + matrix @ (np.array(box.start) * np.array(self.spacing))
        return Geometry(tuple(box.size), self.spacing, tuple(float(v) for v in origin), self.direction)

    def resample(self, image: sitk.Image, interpolator: int, default: float, pixel_id: int | None = None) -> sitk.Image:
        """``image`` resampled onto this grid (identity transform), as ``pixel_id`` (by default its own type).

        The grids resampled here span the same extent (those of :func:`resampled_geometry`, and a result restored
        onto its input's grid), but their last points may lie past ``image``'s half-voxel border, by less than a
        voxel. Where they do, ``image`` is first padded by one voxel that repeats its edge, so those points take the
        edge's value, not ``default``: ITK alone gives ``default`` on the last slice of an exact 2x upsampling, or
        not, as its rounding of that border point falls. The GPU path (:class:`medseg.resampling.AxisAlignedResampler`)
        clamps the same way. ``default`` is left for points further out.
        """
        if _reaches_border(self, image):
            image = sitk.ZeroFluxNeumannPad(image, [1, 1, 1], [1, 1, 1])
        return sitk.Resample(
            image,
            [int(v) for v in self.size],
            sitk.Transform(),
            interpolator,
            self.origin,
            self.spacing,
            self.direction,
            default,
            image.GetPixelID() if pixel_id is None else pixel_id,
        )


def _reaches_border(grid: Geometry, image: sitk.Image, margin: float = 1e-3) -> bool:
    """Whether a corner of ``grid`` lies within ``margin`` voxels of ``image``'s half-voxel border, or past it."""
    matrix = np.array(grid.direction).reshape(3, 3) * np.array(grid.spacing)
    last = np.array(grid.size) - 1
    size = np.array(image.GetSize())
    for corner in itertools.product(*[(0, n) for n in last]):
        point = np.array(grid.origin) + matrix @ np.array(corner, dtype=float)
        index = np.array(image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in point)))
        if np.any(index < -0.5 + margin) or np.any(index > size - 0.5 - margin):
            return True
    return False


@dataclass
class PreprocessRecord:
    """What preprocessing did, so that a result on the network grid can be put back on the input grid."""

    input_reference: Geometry  #: the full input grid
    roi: IndexBox | None
    cropped_reference: Geometry  #: the input grid after the ROI crop, before reorientation
    original_orientation: str
    resampled: bool
    resampled_reference: Geometry  #: the reoriented (and resampled) grid, before the foreground crop
    network_reference: Geometry  #: the grid of the network array, after resampling and foreground crop
    foreground_box: IndexBox | None


#: Pixel types whose every value float32 holds exactly.
EXACT_IN_FLOAT32 = (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkFloat32)
WIDE_INTEGERS = (sitk.sitkInt32, sitk.sitkUInt32, sitk.sitkInt64, sitk.sitkUInt64)


#: Stored types sent to the device as they are (torch converts them to float32 there).
UPLOADED_AS_STORED = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.float32))


def exact_in_float32(image: sitk.Image) -> bool:
    """Whether float32 holds each of the image's values exactly: its type, or integers within ±2**24."""
    if image.GetPixelID() in EXACT_IN_FLOAT32:
        return True
    if image.GetPixelID() in WIDE_INTEGERS:
        array = sitk.GetArrayViewFromImage(image)
        return bool(array.size) and -(2**24) <= int(array.min()) and int(array.max()) <= 2**24
    return False


def orientation_code(image: sitk.Image) -> str:
    """The anatomical orientation code (e.g. ``LPS``, ``RAS``) closest to the image's direction, as ITK names it."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def reorient(image: sitk.Image, code: str | None) -> sitk.Image:
    """Permute and flip the axes of ``image`` to the orientation ``code``; voxel values are not interpolated."""
    if code is None or orientation_code(image) == code:
        return image
    return sitk.DICOMOrient(image, code)


def crop(image: sitk.Image, box: IndexBox) -> sitk.Image:
    return sitk.RegionOfInterest(image, box.size, box.start)


def resampled_geometry(image: sitk.Image, spacing: Sequence[float]) -> Geometry:
    """The grid of ``spacing`` (mm, x y z) over ``image``'s extent, with its origin and direction."""
    old_size = np.array(image.GetSize())
    new_size = np.maximum(np.round(old_size * np.array(image.GetSpacing()) / np.array(spacing, dtype=float)), 1)
    return Geometry(
        tuple(int(s) for s in new_size),
        tuple(float(s) for s in spacing),
        tuple(image.GetOrigin()),
        tuple(image.GetDirection()),
    )


def resample_to_spacing(
    image: sitk.Image, spacing: Sequence[float], *, interpolator: int = sitk.sitkLinear, pixel_id: int | None = None
) -> sitk.Image:
    """Resample ``image`` to ``spacing`` (mm, x y z) over the same physical extent, keeping origin and direction;
    the result has ``pixel_id`` (by default the image's own type).

    The new grid's last voxels can lie up to about a voxel past the image's last one (the grid keeps the first
    voxel's centre and rounds the extent); they take the nearest voxel's value, not 0. ITK alone would give 0 on
    the last slice of an exact 2x upsampling, or not, as its rounding of that border point fell.
    """
    return resampled_geometry(image, spacing).resample(image, interpolator, 0.0, pixel_id)


def resample_to_spacing_on(image: sitk.Image, spacing: Sequence[float], device) -> np.ndarray:
    """:func:`resample_to_spacing` (linear) with torch on ``device``, as a (X, Y, Z) float32 array.

    Same grid and, to float rounding, the same values as SimpleITK's; used when the network runs on a GPU. The
    voxels go to the device as stored, (Z, Y, X) in their own type (a CT's int16: half of float32's bytes), and are
    converted and transposed there; the host makes no float32 copy of the input.
    """
    import warnings

    import torch

    from .resampling import AxisAlignedResampler

    target = resampled_geometry(image, spacing)
    maps = [(j, float(spacing[j]) / float(image.GetSpacing()[j]), 0.0) for j in range(3)]
    resample = AxisAlignedResampler(maps, target.size, device)
    with torch.inference_mode():
        stored = sitk.GetArrayViewFromImage(image)  # read-only, and only read: the warning does not apply
        if stored.dtype in UPLOADED_AS_STORED:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                zyx = torch.from_numpy(stored)
            values = zyx.to(device).to(torch.float32).permute(2, 1, 0)
        else:
            values = torch.from_numpy(image_to_network_array(image)).to(device)
        return resample(values).cpu().numpy()


def needs_resampling(image: sitk.Image, spacing: Sequence[float] | None) -> bool:
    if spacing is None:
        return False
    current = np.array(image.GetSpacing())
    return not np.allclose(current, spacing, rtol=SPACING_TOLERANCE, atol=0)


def foreground_box(array_xyz: np.ndarray, *, margin: int = 4) -> IndexBox | None:
    """Bounding box of voxels above the minimum of a (X, Y, Z) array, grown by ``margin`` voxels."""
    mask = array_xyz > array_xyz.min()
    if not mask.any():
        return None
    coords = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    start = [max(int(c[0]) - margin, 0) for c in coords]
    stop = [min(int(c[-1]) + 1 + margin, n) for c, n in zip(coords, array_xyz.shape)]
    return IndexBox(tuple(start), tuple(b - a for a, b in zip(start, stop)))


def image_to_network_array(image: sitk.Image) -> np.ndarray:
    """(X, Y, Z) float32 array of a scalar image (SimpleITK gives (Z, Y, X))."""
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0), dtype=np.float32)


def network_array_to_image(array_xyz: np.ndarray, reference: sitk.Image | Geometry) -> sitk.Image:
    """Wrap a (X, Y, Z) array (or (C, X, Y, Z) as a vector image) on ``reference``'s grid."""
    if array_xyz.ndim == 4:
        image = sitk.GetImageFromArray(
            np.ascontiguousarray(np.moveaxis(array_xyz, 0, -1).transpose(2, 1, 0, 3)), isVector=True
        )
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    return Geometry.of(reference).apply(image)


def normalize_intensity(array: np.ndarray, spec: Normalization, *, out: np.ndarray | None = None) -> np.ndarray:
    """Per-image intensity normalisation of one channel, as the model card says (float32 out).

    ``zscore`` uses the mean and standard deviation of the (percentile-clipped) voxels, so images whose
    intensity scales differ by orders of magnitude land on one scale. With ``nonzero`` only the voxels that are
    not 0 in the input count, and those stay 0 (a skull-stripped MRI's background), whatever the clipping. With
    ``out`` (float32, the array's shape) the result is written there; ``range`` then needs no other array.
    """
    array = array.astype(np.float32, copy=False)
    if out is None:
        out = np.empty(array.shape, np.float32)
    if spec.method == "none":
        out[...] = array
        return out
    if spec.method == "range":  # in place, in float32 as (clip(x) - a_min) / scale would be
        np.clip(array, spec.a_min, spec.a_max, out=out)
        out -= spec.a_min
        out /= max(spec.a_max - spec.a_min, 1e-6)
        return out
    # the voxels that count, taken before clipping: clipping lifts a skull-stripped image's zeros to the low
    # percentile, and a mask taken after it would normalise the background too
    inside = array != 0 if spec.nonzero else None
    sample = array[inside] if inside is not None else array.ravel()
    if sample.size == 0:
        sample = array.ravel()
    if spec.clip_percentiles is not None:
        low, high = np.percentile(sample, spec.clip_percentiles)
        array = np.clip(array, low, high)
        sample = np.clip(sample, low, high)
    mean = float(sample.mean())
    std = float(sample.std())
    result = (array - mean) / max(std, 1e-6)
    if inside is not None:
        result = np.where(inside, result, 0.0)
    out[...] = result
    return out


def preprocess(
    images: Sequence[sitk.Image],
    spec: Preprocessing,
    *,
    roi: IndexBox | None = None,
    device=None,
) -> tuple[np.ndarray, PreprocessRecord]:
    """Turn the input channels (all on one grid) into the network's (C, X, Y, Z) float32 array.

    With a torch ``device`` (MedSeg passes its GPU), the resampling to the card's spacing runs there.

    Returns:
        The array and the record :func:`medseg.postprocessing.restore_to_input_grid` needs to undo the steps.
    """
    reference = images[0]
    if roi is not None:
        roi = roi.clip_to(reference.GetSize())
        images = [crop(image, roi) for image in images]
    cropped_reference = Geometry.of(images[0])
    original_orientation = orientation_code(images[0])
    # float32 at the input's resolution would be twice a CT's int16: values float32 holds exactly stay in their
    # type until the resampling (ITK interpolates in double either way) or the network array: the same numbers.
    images = [
        reorient(image if exact_in_float32(image) else sitk.Cast(image, sitk.sitkFloat32), spec.orientation)
        for image in images
    ]
    resampled = needs_resampling(images[0], spec.spacing)
    if resampled and device is not None:
        arrays = [resample_to_spacing_on(image, spec.spacing, device) for image in images]
        resampled_reference = resampled_geometry(images[0], spec.spacing)
    else:
        if resampled:
            images = [resample_to_spacing(image, spec.spacing, pixel_id=sitk.sitkFloat32) for image in images]
        resampled_reference = Geometry.of(images[0])
        arrays = [image_to_network_array(image) for image in images]
    del images
    box = foreground_box(arrays[0]) if spec.crop == "foreground" else None
    network_reference = resampled_reference
    if box is not None:
        arrays = [a[tuple(slice(s, s + n) for s, n in zip(box.start, box.size))] for a in arrays]
        network_reference = network_reference.crop(box)
    stacked = np.empty((len(arrays), *arrays[0].shape), np.float32)
    for index in range(len(arrays)):  # each channel straight into its place, then dropped
        normalize_intensity(arrays[index], spec.normalization, out=stacked[index])
        arrays[index] = None
    record = PreprocessRecord(
        input_reference=Geometry.of(reference),
        roi=roi,
        cropped_reference=cropped_reference,
        original_orientation=original_orientation,
        resampled=resampled,
        resampled_reference=resampled_reference,
        network_reference=network_reference,
        foreground_box=box,
    )
    return stacked, record


def label_to_network_grid(label: sitk.Image, record: PreprocessRecord) -> np.ndarray:
    """A labelmap on the input grid, moved onto the network grid of ``record``, (X, Y, Z).

    Training uses this so that labels follow exactly the spatial steps the images went through. Each label's mask
    is interpolated linearly and the label kept where it reaches one half, later labels over earlier ones (as
    nnU-Net resamples segmentations): a nearest neighbour, but with ties treated alike on both sides of a
    structure. ITK's nearest neighbour rounds every tie up, and ties are every other voxel where the network's
    spacing is half the input's (3 mm slices, a 1.5 mm model): the labels would sit a quarter of an input voxel
    lower than the image.
    """
    if record.roi is not None:
        label = crop(label, record.roi)
    reference = record.network_reference
    values = np.unique(sitk.GetArrayViewFromImage(label))
    out = np.zeros(tuple(reference.GetSize())[::-1], dtype=sitk.GetArrayViewFromImage(label).dtype)
    for value in values[values != 0]:
        mask = sitk.Cast(sitk.Equal(label, int(value)), sitk.sitkFloat32)
        moved = reference.resample(mask, sitk.sitkLinear, 0.0)  # held: an array view does not keep it alive
        out[sitk.GetArrayViewFromImage(moved) >= 0.5] = value
    return np.ascontiguousarray(out.transpose(2, 1, 0))
