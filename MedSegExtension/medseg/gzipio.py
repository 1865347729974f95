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

#: What a gzip reader raises for a damaged or cut stream: Python's gzip raises EOFError, OSError or zlib.error, and
#: ISA-L also its own error class (derived from Exception only) for an invalid deflate block. Every ``except`` around
#: inflation catches all of them, so that a damaged file is named, whichever backend (or test) is in use.
GZIP_ERRORS: tuple[type[Exception], ...] = (EOFError, OSError, zlib.error)
if _zlib is not zlib:
    GZIP_ERRORS += (_zlib.error,)

#: Compression level of :func:`gzip_file`. ISA-L's levels run 0 to 3, and its 1 compresses labels as well as its
#: 2, faster. For zlib it is nibabel's default: zlib's 6 takes 8× longer for noisy labels 30 % smaller.
LEVEL = 1

#: NIfTI datatype code -> bytes per voxel, as ITK's reader sizes the data: by the datatype, never by ``bitpix``, which
#: it ignores (a header whose bitpix says 0 or 8 for int16 voxels still reads two bytes a voxel).
NIFTI_VOXEL_BYTES = {
    2: 1,  # uint8
    4: 2,  # int16
    8: 4,  # int32
    16: 4,  # float32
    32: 8,  # complex64
    64: 8,  # float64
    128: 3,  # RGB24
    256: 1,  # int8
    512: 2,  # uint16
    768: 4,  # uint32
    1024: 8,  # int64
    1280: 8,  # uint64
    1536: 16,  # float128
    1792: 16,  # complex128
    2048: 32,  # complex256
    2304: 4,  # RGBA32
}

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
        InputImageError: the stream ends early or fails its check, or other data follows it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            with _gzip.GzipFile(fileobj=raw, mode="rb") as handle:
                while handle.read(READ_CHUNK):
                    pass
    except GZIP_ERRORS:
        raise gzip_error(path, offset) from None


def read_nrrd_header(handle) -> tuple[bytes, bool]:
    """The text header of the NRRD open in ``handle`` (binary, at its start), to and with the blank line that ends it,
    and whether that line was found (if not, the file ended first: a detached header may, attached data may not).

    Read line by line, with no cap on its size: a ``.seg.nrrd`` with a hundred segments has a header over 64 KiB, and
    the attached data starts right after it (``len`` of the header).
    """
    lines = []
    while line := handle.readline():
        lines.append(line)
        if line in (b"\n", b"\r\n"):
            return b"".join(lines), True
    return b"".join(lines), False


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

    Returns ``sizeof_hdr`` (348 or 540), ``dims`` (the sizes, x first), ``datatype``, ``bitpix``, ``vox_offset``
    (as stored: a NIfTI-1's is a float, and may be NaN or infinite; see :func:`nifti_data_offset`), ``slope``,
    ``inter``, ``endian`` (``"<"`` or ``">"``) and ``single_file`` (the magic of a ``.nii``, not of a ``.hdr``/``.img``
    pair).
    """
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            sizeof_hdr = 348
            single_file = header[344:348] == b"n+1\0"
            dim = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            vox_offset, slope, inter = struct.unpack(endian + "3f", header[108:120])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            sizeof_hdr = 540
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
        "sizeof_hdr": sizeof_hdr,
        "dims": tuple(max(int(d), 1) for d in dim[1 : 1 + count]),
        "datatype": int(datatype),
        "bitpix": int(bitpix),
        "vox_offset": vox_offset,
        "slope": float(slope),
        "inter": float(inter),
        "endian": endian,
        "single_file": single_file,
    }


def nifti_data_offset(path: Path, fields: dict) -> int:
    """Where ITK's reader takes the voxels of the NIfTI ``path`` from (``fields``: :func:`nifti_header`'s): its
    ``vox_offset``, or the end of the header where that is lower.

    Raises:
        InputImageError: ``vox_offset`` is no byte offset (NaN, infinite, negative or fractional: ITK reads such a
            file, from byte 348), or a single-file NIfTI-1's is below 352. The standard says such a file's voxels
            start at 352, ITK reads them from 348 (every voxel shifted) and nibabel from ``vox_offset`` itself: which
            bytes are the voxels is anyone's guess, so the file is refused rather than read one way without a word.
    """
    vox_offset = fields["vox_offset"]
    if not math.isfinite(vox_offset) or vox_offset < 0 or vox_offset != int(vox_offset):
        raise InputImageError(
            path, f"invalid vox_offset {vox_offset} in the NIfTI header (where the voxels start); the file is corrupt"
        )
    vox_offset = int(vox_offset)
    if fields["single_file"] and fields["sizeof_hdr"] == 348 and vox_offset < 352:
        raise InputImageError(
            path,
            f"invalid vox_offset {vox_offset} in the NIfTI header: a .nii file's voxels start at byte 352 or later; "
            "ITK would read them from byte 348 and other readers elsewhere, so every voxel could be shifted. "
            "Set vox_offset to where the voxels start (352 for a file without extensions)",
        )
    return max(vox_offset, fields["sizeof_hdr"])


def nifti_expected_bytes(path: Path, fields: dict) -> int | None:
    """The size of the NIfTI ``path`` that ITK's reader needs, header and voxels (``fields``: :func:`nifti_header`'s);
    None for a datatype not in :data:`NIFTI_VOXEL_BYTES`.

    Raises:
        InputImageError: its ``vox_offset`` is invalid (:func:`nifti_data_offset`).
    """
    start = nifti_data_offset(path, fields)
    voxel_bytes = NIFTI_VOXEL_BYTES.get(fields["datatype"])
    return None if voxel_bytes is None else start + math.prod(fields["dims"]) * voxel_bytes


def read_nifti_gz(path: str | Path) -> sitk.Image | None:
    """Read a ``.nii.gz`` with one inflation, or return None when ITK's own reader is needed (see the module).

    Raises:
        InputImageError: the file is truncated, its compressed data is corrupt (gzip's CRC or length fails) or
            followed by other data, or its ``vox_offset`` is invalid (:func:`nifti_data_offset`).
    """
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        with open_gzip(path) as handle:
            header = nifti_header(handle.read(540))
    except (RuntimeError, *GZIP_ERRORS):
        return None  # ITK's reader names the problem
    if header is None:
        return None
    offset = nifti_data_offset(path, header)  # refused here, whatever the path: ITK would read it from elsewhere
    if not header["single_file"] or header["endian"] != "<" or header["datatype"] not in NIFTI_TYPES:
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
    ):
        return None
    voxels = np.empty(size[::-1], dtype=dtype)
    _inflate_into(path, offset, voxels.reshape(-1).view(np.uint8))
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
    skip = offset
    try:
        with open_gzip(path) as handle:
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
    except GZIP_ERRORS:
        raise gzip_error(path) from None
    if filled < len(view):  # the stream may end before the voxels, or even inside the header's extensions
        raise truncated(path, offset + len(view), offset - skip + filled)


def corrupt(path: Path) -> InputImageError:
    return InputImageError(path, "the compressed data ends early or fails its check; the file is truncated or corrupt")


def gzip_error(path: Path, offset: int = 0) -> InputImageError:
    """The error for the gzip data of ``path`` (from ``offset``) that a reader refused: :func:`corrupt`, or, where
    its members are whole and valid and something else follows them, that. Gzip readers refuse such data as a
    damaged next member would be refused; it is told apart here, only after a failure, so its cost does not count."""
    if _data_after_members(path, offset):
        return InputImageError(
            path, "unexpected data after the compressed stream; the file is corrupt, or something was appended to it"
        )
    return corrupt(path)


def _data_after_members(path: Path, offset: int) -> bool:
    """Whether the gzip data of ``path`` from ``offset`` is whole, valid members followed by bytes that start no
    other member (zeros aside: gzip readers skip zero padding between and after members)."""
    inflater = zlib.decompressobj(31)
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = b""
            while True:
                if not data:
                    data = handle.read(READ_CHUNK)
                    if not data:
                        return False  # the data ends inside a member, or after the last one with nothing after it
                if inflater.eof:  # between members
                    data = data.lstrip(b"\0")
                    if not data:
                        continue
                    if not GZIP_HEADER.startswith(data[:2]):
                        return True
                    inflater = zlib.decompressobj(31)
                inflater.decompress(data, READ_CHUNK)  # the output is not needed: bounded, for memory
                data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    except (OSError, zlib.error):
        return False


def truncated(path: Path, expected: int, available: int) -> InputImageError:
    return InputImageError(
        path,
        f"the file is truncated: the header promises {expected} bytes (header and image data), "
        f"the file holds {available}",
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
                head, ended = read_nrrd_header(handle)
            if not ended or b"\nencoding: raw\n" not in head:
                sitk.WriteImage(image, str(target), useCompression=True)  # not the header ITK writes today
                return
            offset, prefix = len(head), head.replace(b"\nencoding: raw\n", b"\nencoding: gzip\n")
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
