"""Reading and writing images: NIfTI, NRRD, MetaImage and DICOM series.

Images travel through the engine as ``SimpleITK.Image`` so that spacing, origin and direction always go with
the voxels. Arrays taken from them are in numpy order (z, y, x); sizes and spacings reported by SimpleITK are in
(x, y, z) order and millimetres. ``.nii.gz`` is read with one checked inflation, and compressed ``.nii.gz`` and
``.nrrd`` are written on every core (:mod:`medseg.gzipio`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import gzipio
from .errors import InputImageError, OutputError

logger = logging.getLogger(__name__)

#: Single-file formats the engine writes. Two-file formats (.nhdr, .mhd, .hdr) are refused because they cannot
#: be written atomically.
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

#: Relative tolerance when comparing the grids of several input channels.
GRID_TOLERANCE = 1e-4

#: How a preview (:meth:`medseg.segmenter.Segmenter.segment` with ``preview``) written to a file says so: NRRD and
#: MetaImage carry the key ``MedSeg_preview`` = ``1`` and the note; NIfTI has no free keys and carries the note in
#: its ``descrip`` field (which ITK writes from ``ITK_FileNotes``); a ``.seg.nrrd``'s segment names end in the suffix.
PREVIEW_KEY = "MedSeg_preview"
PREVIEW_NOTE = "MedSeg preview: not for measurement"
PREVIEW_NAME_SUFFIX = " (preview)"
FILE_NOTES_KEY = "ITK_FileNotes"


def image_suffix(path: str | Path) -> str:
    """The image-format suffix of ``path``, with ``.nii.gz`` and ``.seg.nrrd`` kept whole, lower-cased."""
    name = Path(path).name.lower()
    for double in (".seg.nrrd", ".nii.gz"):
        if name.endswith(double):
            return double
    return Path(name).suffix


def read_image(path: str | Path) -> sitk.Image:
    """Read one 3D scalar volume from a file or a folder holding one DICOM series.

    Args:
        path: NIfTI, NRRD or MetaImage file, or a folder of DICOM files.

    Returns:
        The volume as read, with its own geometry; a 4D file whose last axis has length 1 is taken as 3D.

    Raises:
        InputImageError: the path does not exist, cannot be read, is not a 3D scalar volume, holds NaN or
            infinite voxels, or is constant (an empty or blank volume).
    """
    path = Path(path)
    if not path.exists():
        raise InputImageError(path, "no such file or folder")
    image = _read_dicom_series(path) if path.is_dir() else _read_file(path)
    image = _squeeze_to_3d(image, path)
    validate_volume(image, path)
    return image


def read_any_image(path: str | Path) -> sitk.Image:
    """Read an image file as it is (vector images and any value allowed), with the same file checks as
    :func:`read_image`: missing, empty, truncated or unreadable files raise :class:`InputImageError`."""
    path = Path(path)
    if not path.is_file():
        raise InputImageError(path, "no such file")
    return _squeeze_to_3d(_read_file(path), path)


def _read_file(path: Path) -> sitk.Image:
    if path.stat().st_size == 0:
        raise InputImageError(path, "the file is empty (0 bytes)")
    if image_suffix(path) == ".nii.gz":
        image = gzipio.read_nifti_gz(path)  # one inflation, checked; None when the header needs ITK's reader
        if image is not None:
            return image
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        if _is_nifti2(path):  # ITK says only that no reader fits, which reads as a damaged file
            raise InputImageError(
                path, "NIfTI-2 is not supported by ITK's reader here; convert it to NIfTI-1"
            ) from None
        reason = _itk_reason(exc)
        raise InputImageError(path, f"cannot be read as an image; it may be truncated or corrupt ({reason})") from None
    if image_suffix(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    elif image_suffix(path) in (".nrrd", ".seg.nrrd"):
        _check_nrrd_compressed(path)
    return image


def _is_nifti2(path: Path) -> bool:
    """Whether ``path`` (gzipped or not) starts as a NIfTI-2 header: ``sizeof_hdr`` 540, then the magic
    ``n+2`` (single file) or ``ni2`` (header and image pair)."""
    try:
        reader, _ = gzipio.open_maybe_gzip(path)
        with reader as handle:
            start = handle.read(8)
    except gzipio.GZIP_ERRORS:
        return False
    return start[:4] in (b"\x1c\x02\0\0", b"\0\0\x02\x1c") and start[4:8] in (b"n+2\0", b"ni2\0")


def _check_nifti_complete(path: Path) -> None:
    """ITK zero-fills a truncated NIfTI without a word; compare the data on disk with what the header promises
    (:func:`gzipio.nifti_expected_bytes`: as ITK reads it, whatever ``bitpix`` says), and refuse a ``vox_offset``
    that puts the voxels where ITK and other readers disagree (:func:`gzipio.nifti_data_offset`)."""
    try:
        reader, compressed = gzipio.open_maybe_gzip(path)
        with reader as handle:
            header = handle.read(540)
            fields = gzipio.nifti_header(header)
            expected = None if fields is None else gzipio.nifti_expected_bytes(path, fields)
            if not compressed:
                available = path.stat().st_size
            else:  # inflate it all: gzip checks the CRC and the length at the end
                available = len(header)
                while chunk := handle.read(1 << 22):
                    available += len(chunk)
    except gzipio.GZIP_ERRORS:
        raise gzipio.gzip_error(path) from None
    if expected is not None and available < expected:
        raise gzipio.truncated(path, expected, available)


def _check_nrrd_compressed(path: Path) -> None:
    """ITK (teem) does not check a gzip-encoded NRRD's CRC, so a damaged file can read as wrong voxels without a
    word: inflate the attached data once more, which checks it (ISA-L: about 0.2 s for a 512 x 512 x 320 CT)."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"NRRD":
            return
        handle.seek(0)
        head, ended = gzipio.read_nrrd_header(handle)  # whole, however long: a .seg.nrrd's may exceed 64 KiB
    fields = {}
    for line in head.decode("latin-1").splitlines()[1:]:
        key, colon, value = line.partition(":")
        if colon and not line.startswith("#") and not value.startswith("="):  # "key:=value" pairs are metadata
            fields[key.strip().lower()] = value.strip().lower()
    detached = {"data file", "datafile"} & fields.keys()
    if not ended:  # the file ends inside the header: fine for a detached header, no NRRD with the data attached
        if detached:
            return
        raise InputImageError(path, "the NRRD header has no blank line ending it; the file is not a valid NRRD")
    if fields.get("encoding") in ("gzip", "gz") and not detached and not {"line skip", "byte skip"} & fields.keys():
        gzipio.check_gzip_from(path, len(head))


def _read_dicom_series(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
    if not series_ids:
        raise InputImageError(folder, "the folder holds no DICOM series (give an image file or a DICOM folder)")
    if len(series_ids) > 1:
        raise InputImageError(
            folder,
            f"the folder holds {len(series_ids)} DICOM series ({', '.join(series_ids)}); put one series per folder",
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's tags, read with the slices: for the geometry check
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputImageError(folder, f"the DICOM series cannot be read ({_itk_reason(exc)})") from None
    slices = [_slice_geometry(reader, k) for k in range(len(files))]
    if all(s is not None for s in slices):
        problem = slice_geometry_problem(slices)
        if problem:
            raise InputImageError(
                folder,
                f"{problem}; a segmentation on the grid ITK makes of it would be misplaced. Give a complete series "
                "with evenly spaced, untilted slices, or resample it first (Slicer's DICOM module does so with "
                "'acquisition geometry regularization')",
            )
    logger.debug("read DICOM series %s: %d files", series_ids[0], len(files))
    return image


#: Slice positions in a DICOM series may differ from even steps by this fraction of the step (scanners round the
#: positions they write, to a few micrometres), or by :data:`SLICE_TOLERANCE_MM`, whichever is larger.
SLICE_TOLERANCE = 0.02
SLICE_TOLERANCE_MM = 0.01


def _slice_geometry(reader: sitk.ImageSeriesReader, index: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(ImagePositionPatient, ImageOrientationPatient) of slice ``index``, or None where a tag is missing."""
    try:
        position = [float(v) for v in reader.GetMetaData(index, "0020|0032").split("\\")]
        orientation = [float(v) for v in reader.GetMetaData(index, "0020|0037").split("\\")]
    except (RuntimeError, ValueError):
        return None
    if len(position) != 3 or len(orientation) != 6:
        return None
    return np.array(position), np.array(orientation)


def slice_geometry_problem(slices: Sequence[tuple[np.ndarray, np.ndarray]]) -> str | None:
    """Why the slices of a series (position, orientation each, in the reader's order) do not make a regular grid:
    orientations that differ, slices at one position, uneven steps (a missing slice, or several spacings in one
    series) or a gantry tilt (each slice shifted in its own plane); None when they do."""
    if len(slices) < 2:
        return None
    orientation = slices[0][1]
    if any(not np.allclose(o, orientation, atol=1e-4) for _, o in slices):
        return "the slices do not all have the same orientation"
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([p for p, _ in slices])
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    typical = float(np.median(np.abs(along)))
    if typical <= SLICE_TOLERANCE_MM:
        return f"{len(slices)} slices share one position (several images of one place, such as time points)"
    tolerance = max(SLICE_TOLERANCE * typical, SLICE_TOLERANCE_MM)
    uneven = np.flatnonzero(np.abs(np.abs(along) - typical) > tolerance)
    if uneven.size:
        k = int(uneven[0])
        return (
            f"the slices are not evenly spaced: {abs(along[k]):.3g} mm between slices {k + 1} and {k + 2} of "
            f"{len(slices)}, against {typical:.3g} mm elsewhere (a missing slice, or a series with several spacings)"
        )
    if np.any(np.sign(along) != np.sign(along[0])):
        return "the slices are not in order along their normal"
    in_plane = np.linalg.norm(steps - along[:, None] * normal, axis=1)
    if float(in_plane.max()) > tolerance:
        tilt = np.degrees(np.arctan2(float(np.median(in_plane)), typical))
        return f"each slice is shifted in its own plane from the one before (a gantry tilt of about {tilt:.1f} degrees)"
    return None


def _itk_reason(exc: RuntimeError) -> str:
    """The last meaningful line of an ITK exception, without the C++ source location."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(("sitk::ERROR", "itk::ERROR")) and "Exception thrown" not in line:
            return line
    return lines[-1] if lines else "unknown error"


def _squeeze_to_3d(image: sitk.Image, path: Path) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() == 1 and image.GetPixelIDTypeAsString().startswith("vector"):
        image = sitk.VectorIndexSelectionCast(image, 0)  # a NIfTI "vector" or an NRRD vector axis of length 1
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        extractor = sitk.ExtractImageFilter()
        extractor.SetSize([*image.GetSize()[:3], 0])
        extractor.SetIndex([0, 0, 0, 0])
        return extractor.Execute(image)
    return image


def validate_volume(image: sitk.Image, path: str | Path | None = None) -> None:
    """Check that ``image`` is a 3D scalar volume with finite, non-constant voxels.

    Raises:
        InputImageError: naming ``path`` and the problem.
    """
    dimension = image.GetDimension()
    if dimension != 3:
        size = "x".join(str(s) for s in image.GetSize())
        raise InputImageError(path, f"expected a 3D volume, got a {dimension}D image of size {size}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            path,
            f"expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()} "
            "(a colour or vector image; give each channel as its own file)",
        )
    if min(image.GetSize()) < 1:
        raise InputImageError(path, "the volume has no voxels")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            raise InputImageError(path, f"{int(bad.sum())} voxels are NaN or infinite; fix or mask them first")
    if array.size and array.min() == array.max():
        raise InputImageError(path, f"every voxel has the same value ({array.flat[0]}); the volume is empty or blank")


def read_channels(paths: Sequence[str | Path], *, channel_names: Sequence[str] | None = None) -> list[sitk.Image]:
    """Read the input channels of one case and check that they share one voxel grid.

    Args:
        paths: one file or DICOM folder per channel, in the order the model card names them.
        channel_names: the model's channel names; when given, the number of paths must match.

    Raises:
        InputImageError: a channel cannot be read, the count does not match the model, or the grids differ.
    """
    if channel_names is not None and len(paths) != len(channel_names):
        expected = ", ".join(channel_names)
        raise InputImageError(
            paths[0] if len(paths) == 1 else None,
            f"the model needs {len(channel_names)} input channel(s) ({expected}), got {len(paths)} file(s)",
        )
    images = [read_image(p) for p in paths]
    reference = images[0]
    for path, image in zip(paths[1:], images[1:]):
        problem = grid_mismatch(reference, image)
        if problem:
            raise InputImageError(path, f"its voxel grid differs from {paths[0]}: {problem}")
    return images


def grid_mismatch(a: sitk.Image | Grid, b: sitk.Image | Grid) -> str | None:
    """Describe how the voxel grids of ``a`` and ``b`` differ, or return None if they match."""
    a, b = Grid.of(a), Grid.of(b)
    if a.size != b.size:
        return f"size {b.size} instead of {a.size}"
    scale = max(a.spacing)
    for what, va, vb, tol in (
        ("spacing", a.spacing, b.spacing, GRID_TOLERANCE * scale),
        ("origin", a.origin, b.origin, GRID_TOLERANCE * scale * 10),
        ("direction", a.direction, b.direction, GRID_TOLERANCE),
    ):
        if not np.allclose(va, vb, atol=tol, rtol=0):
            return f"{what} {tuple(round(v, 4) for v in vb)} instead of {tuple(round(v, 4) for v in va)}"
    return None


@dataclass(frozen=True)
class Grid:
    """An image's voxel grid without its voxels: size, spacing, origin, direction (ITK's order)."""

    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    @classmethod
    def of(cls, image: sitk.Image | Grid) -> Grid:
        if isinstance(image, Grid):
            return image
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


@dataclass(frozen=True)
class NiftiOrientation:
    """How a NIfTI-1 input placed its voxels (qfac, the qform and the sform with their codes, as stored) and the
    grid ITK made of that. Written into a NIfTI output on the same grid, so that readers that choose between a
    qform and an sform that disagree (ITK and Slicer take one, nibabel and FSL may take the other) place the
    output where they place the input."""

    fields: dict
    grid: Grid

    def fits(self, image: sitk.Image) -> bool:
        """Whether ``image`` lies on the input's grid (any number of components)."""
        return grid_mismatch(self.grid, image) is None


def read_nifti_orientation(path: str | Path, image: sitk.Image) -> NiftiOrientation | None:
    """The :class:`NiftiOrientation` of the NIfTI-1 file ``path``, read as ``image``; None for other files."""
    path = Path(path)
    if image_suffix(path) not in (".nii", ".nii.gz") or not path.is_file():
        return None
    try:
        reader, _ = gzipio.open_maybe_gzip(path)
        with reader as handle:
            fields = gzipio.nifti_orientation(handle.read(348))
    except gzipio.GZIP_ERRORS:
        return None
    return None if fields is None else NiftiOrientation(fields, Grid.of(image))


def check_output_path(path: str | Path, *, suffixes: Sequence[str] = WRITABLE_SUFFIXES) -> Path:
    """Fail early, before any computation, if ``path`` cannot be written in a supported format."""
    path = Path(path)
    suffix = image_suffix(path)
    if suffix not in suffixes:
        raise OutputError(f"{path}: unsupported output format {suffix or '(none)'}; use one of {', '.join(suffixes)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: the folder {parent} does not exist")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: the folder {parent} is not writable")
    return path


def refuse_overwriting_inputs(inputs: Sequence[str | Path], outputs: Sequence[Path]) -> None:
    """Inputs are never modified: refuse an output path that is one of the inputs, or two outputs that collide."""
    resolved_inputs = {Path(p).resolve() for p in inputs}
    seen: set[Path] = set()
    for output in outputs:
        target = output.resolve()
        if target in resolved_inputs or any(parent in resolved_inputs for parent in target.parents):
            raise OutputError(f"{output}: this would overwrite an input; choose another output name")
        if target in seen:
            raise OutputError(f"{output}: the labelmap and the probabilities cannot be written to one file")
        seen.add(target)


def default_file_mode() -> int:
    """The mode a newly created file gets under the current umask (mkstemp makes files private)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_together = threading.local()  # the (temporary, final) paths of the innermost outputs_together() block


@contextmanager
def outputs_together() -> Iterator[None]:
    """Files written with :func:`atomic_output` inside the block take their names only when the whole block
    succeeded, all of them at its end; after a failure or an interruption none does, each earlier file under those
    names stays as it was, and the temporary files are removed. For a result written as several files (a labelmap
    and its probabilities): all or none."""
    outer = getattr(_together, "staged", None)
    staged: list[tuple[Path, Path]] = []
    _together.staged = staged
    try:
        yield
        _rename_together(staged)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _together.staged = outer


def _rename_together(staged: Sequence[tuple[Path, Path]]) -> None:
    """Rename each temporary file to its final name, all or none.

    Renames happen one after another, so a failure in the middle (the name taken by a folder since the checks before
    the computation, a temporary file removed by a cleaner, the folder made read-only) would leave the earlier
    outputs replaced and the later ones not. Each target is checked first; each existing file under a final name is
    then moved aside, and put back (the new files removed) when a later rename fails, and deleted only once all of
    them succeeded.

    Raises:
        OutputError: naming the output that could not take its name; every earlier file is as it was.
    """
    for _, path in staged:
        if path.is_dir():
            raise OutputError(f"{path}: is a folder; give a file name")
        if not os.access(path.parent, os.W_OK):
            raise OutputError(f"{path}: the folder {path.parent} is not writable")
    aside: dict[Path, Path] = {}
    placed: list[Path] = []
    current = None
    try:
        for _, current in staged:
            if os.path.lexists(current):
                fd, name = tempfile.mkstemp(prefix=f".{current.name}.", suffix=".old", dir=current.parent)
                os.close(fd)
                try:
                    os.replace(current, name)
                except BaseException:
                    os.unlink(name)
                    raise
                aside[current] = Path(name)
        for tmp, current in staged:
            os.replace(tmp, current)
            placed.append(current)
    except BaseException as exc:
        for path in placed:
            path.unlink(missing_ok=True)
        for path, old in aside.items():
            try:
                os.replace(old, path)
            except OSError as error:
                logger.error("%s: the earlier file could not be put back (%s); it is at %s", path, error, old)
        if isinstance(exc, OSError):
            raise OutputError(f"{current}: could not be written ({exc}); no output was written") from None
        raise
    for old in aside.values():
        old.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` only if the block succeeds
    (inside :func:`outputs_together`, only if that whole block does).

    A failure or interruption therefore never leaves a half-written file under ``path``, and the temporary file
    is removed. Writer errors (ITK's ``RuntimeError``, ``OSError``) become :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{image_suffix(path)}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        staged = getattr(_together, "staged", None)
        if staged is None:
            os.replace(tmp, path)
        else:
            staged.append((tmp, path))
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, RuntimeError):
            raise OutputError(f"{path}: could not be written ({_itk_reason(exc)})") from None
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: could not be written ({exc})") from None
        raise


def write_image(
    image: sitk.Image,
    path: str | Path,
    *,
    compress: bool = True,
    orientation: NiftiOrientation | None = None,
    preview: bool = False,
) -> Path:
    """Write ``image`` atomically (see :func:`atomic_output`).

    ``orientation``: a NIfTI input's (:func:`read_nifti_orientation`), carried into a ``.nii``/``.nii.gz`` output
    when ``image`` lies on that input's grid. ``preview``: mark the file as a preview (:data:`PREVIEW_KEY`,
    :data:`PREVIEW_NOTE`); ``image`` itself is left as it was.
    """
    path = check_output_path(path)
    suffix = image_suffix(path)
    fields = orientation.fields if orientation is not None and orientation.fits(image) else None
    marks = {PREVIEW_KEY: "1", FILE_NOTES_KEY: PREVIEW_NOTE} if preview else {}
    with atomic_output(path) as tmp, _metadata(image, marks):
        if compress and suffix in gzipio.COMPRESSED_SUFFIXES:
            gzipio.write_compressed(image, tmp, suffix, nifti_orientation=fields)  # compressed on every core
        else:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
            if fields is not None and suffix == ".nii":
                gzipio.patch_nifti_orientation(tmp, fields)
    return path


@contextmanager
def _metadata(image: sitk.Image, entries: dict[str, str]) -> Iterator[sitk.Image]:
    """``image`` with ``entries`` in its metadata for the block, then as it was (no copy of its voxels)."""
    earlier = {key: image.GetMetaData(key) for key in entries if image.HasMetaDataKey(key)}
    for key, value in entries.items():
        image.SetMetaData(key, value)
    try:
        yield image
    finally:
        for key in entries:
            if key in earlier:
                image.SetMetaData(key, earlier[key])
            else:
                image.EraseMetaData(key)
