"""``.nii.gz`` without the slow parts: one inflation when reading, compression on every core when writing.

Reading. ITK's NIfTI reader inflates a ``.nii.gz`` with zlib on one core, and it zero-fills a truncated file or
returns garbage for a corrupt one without a word. A second, checking inflation doubled the cost: 1.9 s for a
512 × 512 × 320 CT on this project's 2-core machine. :func:`read_nifti_gz` inflates the voxels once, straight into
the array, and gzip's own length and CRC checks come with it. ITK still reads the header, so the geometry
(spacing, origin and direction from the qform or sform) and the pixel type are ITK's; the voxels are the bytes
after ``vox_offset``, which ITK's reader does not reorder. A header that needs more than that (scaled values,
big-endian data, vectors, types without a numpy equivalent) returns None and the caller uses ITK's reader.

Writing (``.nii.gz`` and ``.nrrd``). ITK writes the uncompressed file beside the target; :func:`gzip_file`
compresses it in independent blocks on all cores, as pigz does: each block is raw deflate ended by a sync flush,
so their concatenation is one deflate stream, and the data is a single ordinary gzip member that every gzip
reader reads. ITK's own writers compress on one core: 2.5 s for an untrained network's noisy 512 × 512 × 320
labels here, against 0.2 s.

Both use Intel's ISA-L (the ``isal`` package: inflation about 2.3× and compression about 4× faster than zlib
here) when it is installed, and Python's zlib otherwise.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError

try:
    from isal import igzip as _gzip
    from isal import isal_zlib as _zlib
except ImportError:
    import gzip as _gzip

    _zlib = zlib

#: Compression level of :func:`gzip_file`. ISA-L's levels run 0 to 3, and its 1 compresses labels as well as its
#: 2, faster. For zlib it is nibabel's default: zlib's 6 takes 8× longer for noisy labels 30 % smaller.
LEVEL = 1

#: NIfTI datatype code -> (numpy dtype, the SimpleITK pixel type ITK reads it as).
NIFTI_TYPES = {
    2: (np.uint8, sitk.sitkUInt8),
    4: (np.int16, sitk.sitkInt16),
    8: (np.int32, sitk.sitkInt32),
    16: (np.float32, sitk.sitkFloat32),
    64: (np.float64, sitk.sitkFloat64),
    256: (np.int8, sitk.sitkInt8),
    512: (np.uint16, sitk.sitkUInt16),
    768: (np.uint32, sitk.sitkUInt32),
    1024: (np.int64, sitk.sitkInt64),
    1280: (np.uint64, sitk.sitkUInt64),
}

#: Inflated bytes per read: large enough to keep ISA-L at full speed, small enough to stay in cache.
READ_CHUNK = 1 << 20

GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no mtime, unknown OS


def backend() -> str:
    """``"isal"`` or ``"zlib"``: what inflates and deflates."""
    return "zlib" if _zlib is zlib else "isal"


def open_gzip(path: str | Path):
    """A binary reader of a gzip file (every member), with ISA-L when available."""
    return _gzip.open(path, "rb")


def open_maybe_gzip(path: str | Path):
    """A binary reader of ``path``, inflating it where it is gzip by its content (not its name: an uncompressed
    NIfTI named ``.nii.gz`` is common, and ITK reads it); with whether it is, as ``(reader, compressed)``."""
    with open(path, "rb") as handle:
        compressed = handle.read(2) == GZIP_HEADER[:2]
    return (open_gzip(path) if compressed else open(path, "rb")), compressed


def check_gzip_from(path: str | Path, offset: int) -> None:
    """Inflate the gzip stream that starts ``offset`` bytes into ``path`` (an NRRD's attached data) to its end,
    which checks its CRC and length.

    Raises:
        InputImageError: the stream ends early or fails its check.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            with _gzip.GzipFile(fileobj=raw, mode="rb") as handle:
                while handle.read(READ_CHUNK):
                    pass
    except (EOFError, OSError, zlib.error):
        raise corrupt(path) from None


#: NIfTI-1 header bytes that place the voxels in space: qfac (pixdim[0]), then the qform and the sform with their codes.
NIFTI_ORIENTATION_FIELDS = ((76, 80), (252, 328))


def nifti_orientation(header: bytes) -> dict[int, bytes] | None:
    """The orientation fields (:data:`NIFTI_ORIENTATION_FIELDS`) of a little-endian single-file NIfTI-1 header, by
    offset, as stored; None for any other header."""
    fields = nifti_header(header)
    if fields is None or fields["endian"] != "<" or not fields["single_file"] or header[344:348] != b"n+1\0":
        return None
    return {start: bytes(header[start:end]) for start, end in NIFTI_ORIENTATION_FIELDS}


def patch_nifti_orientation(path: str | Path, fields: dict[int, bytes]) -> bool:
    """Write :func:`nifti_orientation`'s ``fields`` into the header of the uncompressed NIfTI-1 ``path``; False,
    and the file untouched, where its header is not one."""
    with open(path, "r+b") as handle:
        if nifti_orientation(handle.read(348)) is None:
            return False
        for start, data in fields.items():
            handle.seek(start)
            handle.write(data)
    return True


def nifti_header(header: bytes) -> dict | None:
    """The fields that locate the voxels, from the first 540 bytes of a NIfTI-1 or NIfTI-2 file, or None.

    Returns ``dims`` (the sizes, x first), ``datatype``, ``bitpix``, ``vox_offset``, ``slope``, ``inter``,
    ``endian`` (``"<"`` or ``">"``) and ``single_file`` (the magic of a ``.nii``, not of a ``.hdr``/``.img`` pair).
    """
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            single_file = header[344:348] == b"n+1\0"
            dim = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            vox_offset, slope, inter = struct.unpack(endian + "3f", header[108:120])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            single_file = header[4:8] == b"n+2\0"
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dim = struct.unpack(endian + "8q", header[16:80])
            vox_offset, slope, inter = struct.unpack(endian + "qdd", header[168:192])
            break
    else:
        return None
    count = int(dim[0])
    if not 1 <= count <= 7:
        return None
    return {
        "dims": tuple(max(int(d), 1) for d in dim[1 : 1 + count]),
        "datatype": int(datatype),
        "bitpix": int(bitpix),
        "vox_offset": int(vox_offset),
        "slope": float(slope),
        "inter": float(inter),
        "endian": endian,
        "single_file": single_file,
    }


def read_nifti_gz(path: str | Path) -> sitk.Image | None:
    """Read a ``.nii.gz`` with one inflation, or return None when ITK's own reader is needed (see the module).

    Raises:
        InputImageError: the file is truncated, or its compressed data is corrupt (gzip's CRC or length fails).
    """
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        with open_gzip(path) as handle:
            header = nifti_header(handle.read(540))
    except (RuntimeError, EOFError, OSError, zlib.error):
        return None  # ITK's reader names the problem
    if header is None or not header["single_file"] or header["endian"] != "<" or header["datatype"] not in NIFTI_TYPES:
        return None
    dtype, pixel_id = NIFTI_TYPES[header["datatype"]]
    unscaled = header["inter"] == 0.0 and header["slope"] in (0.0, 1.0)
    size = tuple(reader.GetSize())
    if (
        not unscaled
        or reader.GetPixelID() != pixel_id
        or reader.GetNumberOfComponents() != 1
        or np.dtype(dtype).itemsize * 8 != header["bitpix"]
        or math.prod(size) != math.prod(header["dims"])
        or header["vox_offset"] < 348
    ):
        return None
    voxels = np.empty(size[::-1], dtype=dtype)
    _inflate_into(path, header["vox_offset"], voxels.reshape(-1).view(np.uint8))
    image = sitk.GetImageFromArray(voxels, isVector=False)
    del voxels
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    for key in reader.GetMetaDataKeys():
        image.SetMetaData(key, reader.GetMetaData(key))
    return image


def _inflate_into(path: Path, offset: int, target: np.ndarray) -> None:
    """Inflate ``path`` from ``offset`` into ``target`` (bytes), then to its end, so that gzip checks its CRC."""
    view = memoryview(target)
    filled = 0
    try:
        with open_gzip(path) as handle:
            skip = offset
            while skip > 0:
                got = len(handle.read(min(skip, READ_CHUNK)))
                if not got:
                    break
                skip -= got
            while filled < len(view):
                got = handle.readinto(view[filled : filled + READ_CHUNK])
                if not got:
                    break
                filled += got
            while handle.read(READ_CHUNK):  # trailing bytes, if any; reaching the end checks CRC and length
                pass
    except (EOFError, OSError, zlib.error):
        raise corrupt(path) from None
    if filled < len(view):
        raise truncated(path, offset + len(view), offset + filled)


def corrupt(path: Path) -> InputImageError:
    return InputImageError(path, "the compressed data ends early or fails its check; the file is truncated or corrupt")


def truncated(path: Path, expected: int, available: int) -> InputImageError:
    return InputImageError(
        path, f"the file is truncated: the header promises {expected} bytes of image data, the file holds {available}"
    )


#: Formats :func:`write_compressed` writes, and the uncompressed suffix ITK writes first.
COMPRESSED_SUFFIXES = {".nii.gz": ".nii", ".nrrd": ".nrrd"}


def write_compressed(
    image: sitk.Image,
    target: str | Path,
    suffix: str,
    *,
    threads: int | None = None,
    nifti_orientation: dict[int, bytes] | None = None,
) -> None:
    """Write ``image`` to ``target`` as a compressed ``.nii.gz`` or ``.nrrd`` (``suffix``) on every core.

    ITK writes the uncompressed file beside ``target`` first. A NIfTI is then gzipped whole (with
    ``nifti_orientation``'s fields in its header, where given: :func:`patch_nifti_orientation`); a NRRD keeps its
    text header, with ``encoding: raw`` changed to ``encoding: gzip``, and its data gzipped after it.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=COMPRESSED_SUFFIXES[suffix], dir=target.parent)
    os.close(fd)
    raw = Path(name)
    try:
        sitk.WriteImage(image, str(raw), useCompression=False)
        if suffix == ".nii.gz" and nifti_orientation is not None:
            patch_nifti_orientation(raw, nifti_orientation)
        offset, prefix = 0, b""
        if suffix == ".nrrd":
            with open(raw, "rb") as handle:
                head = handle.read(1 << 16)
            end = head.find(b"\n\n")
            if end < 0 or b"\nencoding: raw\n" not in head[: end + 1]:
                sitk.WriteImage(image, str(target), useCompression=True)  # not the header ITK writes today
                return
            offset, prefix = end + 2, head[: end + 2].replace(b"\nencoding: raw\n", b"\nencoding: gzip\n")
        gzip_file(raw, target, offset=offset, prefix=prefix, threads=threads)
    finally:
        raw.unlink(missing_ok=True)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def gzip_file(
    source: str | Path,
    target: str | Path,
    *,
    offset: int = 0,
    prefix: bytes = b"",
    level: int = LEVEL,
    threads: int | None = None,
    block: int | None = None,
) -> None:
    """Compress ``source`` from ``offset`` into a gzip member written to ``target`` after ``prefix``, block by
    block on ``threads`` cores (all by default).

    Blocks are compressed independently (see the module), at most ``2 × threads`` of them in memory at a time.
    """
    size = Path(source).stat().st_size - offset
    threads = max(1, min(threads or usable_cores(), 16))
    block = block or min(16 << 20, max(1 << 20, size // (4 * threads)))
    count = max(1, -(-size // block))
    with open(source, "rb") as src, open(target, "wb") as dst:
        src.seek(offset)
        dst.write(prefix + GZIP_HEADER)
        if count == 1:  # one block: no pool to start
            data = src.read(block)
            crc = _zlib.crc32(data)
            dst.write(_deflate(data, level, True))
        else:
            crc = 0
            pending: deque = deque()
            with ThreadPoolExecutor(min(threads, count)) as pool:
                for index in range(count):
                    data = src.read(block)
                    crc = _zlib.crc32(data, crc)
                    pending.append(pool.submit(_deflate, data, level, index == count - 1))
                    while len(pending) >= 2 * threads:
                        dst.write(pending.popleft().result())
                while pending:
                    dst.write(pending.popleft().result())
        dst.write(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))


def _deflate(data: bytes, level: int, last: bool) -> bytes:
    compressor = _zlib.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
