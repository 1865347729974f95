"""``.nii.gz`` read with one checked inflation and written on every core: the same voxels and geometry as ITK's
own reader and writer, with ISA-L and with Python's zlib, and every damaged file refused by name."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from medseg import gzipio, io
from medseg.errors import InputImageError, OutputError


@pytest.fixture(params=["isal", "zlib"])
def gzip_backend(request, monkeypatch):
    """Run a test with ISA-L (the default when installed) and with Python's gzip and zlib."""
    if request.param == "zlib":
        monkeypatch.setattr(gzipio, "_gzip", gzip)
        monkeypatch.setattr(gzipio, "_zlib", zlib)
    elif gzipio.backend() != "isal":
        pytest.skip("isal is not installed")
    assert gzipio.backend() == request.param
    return request.param


def oblique(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-120.5, 33.0, 7.25))
    image.SetDirection((0.0, 1.0, 0.0, -0.8, 0.0, 0.6, 0.6, 0.0, 0.8))
    return image


def assert_same_as_itk(image: sitk.Image, path: Path) -> None:
    reference = sitk.ReadImage(str(path))
    assert image.GetPixelID() == reference.GetPixelID()
    assert image.GetSize() == reference.GetSize()
    assert image.GetSpacing() == reference.GetSpacing()
    assert image.GetOrigin() == reference.GetOrigin()
    assert image.GetDirection() == reference.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64])
def test_one_inflation_reads_what_itk_reads(tmp_path, gzip_backend, dtype):
    rng = np.random.default_rng(3)
    array = (rng.normal(0, 60, (13, 17, 19)) + 64).astype(dtype)  # (z, y, x), no axis of equal length
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(oblique(array), str(path), useCompression=True)
    image = gzipio.read_nifti_gz(path)
    assert image is not None, "a plain little-endian NIfTI takes the one-inflation path"
    assert_same_as_itk(image, path)
    assert_same_as_itk(io.read_image(path), path)


def test_singleton_time_axis(tmp_path, gzip_backend):
    array = np.random.default_rng(4).integers(-1000, 2000, (9, 11, 7, 1), dtype=np.int16)  # (x, y, z, t)
    affine = np.array([[0.0, -0.9, 0.0, 10.0], [0.7, 0.0, 0.0, -20.0], [0.0, 0.0, 2.0, 5.0], [0, 0, 0, 1]])
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), path)  # ITK 5.4 does not read NIfTI-2
    assert gzipio.read_nifti_gz(path) is not None
    image = io.read_image(path)
    assert image.GetDimension() == 3 and image.GetSize() == (9, 11, 7)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), array[..., 0].transpose(2, 1, 0))
    assert_same_as_itk(image, path)
    np.testing.assert_allclose(image.GetSpacing(), (0.7, 0.9, 2.0), atol=1e-6)


@pytest.mark.parametrize("case", ["scaled", "big-endian"])
def test_headers_the_fast_path_leaves_to_itk(tmp_path, gzip_backend, case):
    array = np.random.default_rng(5).integers(0, 500, (8, 10, 12)).astype(np.int16)
    path = tmp_path / f"{case}.nii.gz"
    if case == "scaled":  # ITK's NIfTI, its scl_slope and scl_inter set to 0.5 and -3
        raw = tmp_path / "raw.nii"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(raw))
        data = bytearray(raw.read_bytes())
        data[112:120] = struct.pack("<2f", 0.5, -3.0)
        path.write_bytes(gzip.compress(bytes(data)))
    else:
        nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), np.eye(4), nib.Nifti1Header(endianness=">")), path)
        assert gzip.decompress(path.read_bytes())[:4] == struct.pack(">i", 348)
    assert gzipio.read_nifti_gz(path) is None
    image = io.read_image(path)
    assert_same_as_itk(image, path)
    if case == "scaled":
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(image), array * 0.5 - 3.0)
    else:
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), array)


def written_ct(tmp_path: Path) -> Path:
    rng = np.random.default_rng(6)
    array = rng.normal(0, 300, (24, 40, 48)).astype(np.int16)  # noise: compressed, it stays large
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(oblique(array), str(path), useCompression=True)
    return path


@pytest.mark.parametrize("where", [0.3, 0.6, 0.9])
def test_corrupt_middle_is_refused(tmp_path, gzip_backend, where):
    """ITK returns garbage for these without a word."""
    path = written_ct(tmp_path)
    data = bytearray(path.read_bytes())
    start = int(len(data) * where)
    data[start : start + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(InputImageError, match=r"ct\.nii\.gz: .*truncated or corrupt"):
        io.read_image(path)


@pytest.mark.parametrize("where", [0.5, 0.6])
def test_an_invalid_deflate_block_is_refused(tmp_path, gzip_backend, where):
    """64 bytes of 0xFF mid-stream make an invalid deflate block, for which ISA-L raises its own error class (not an
    OSError); it once escaped as a traceback. The file is larger than what ITK inflates to read its header, which
    would refuse the damage itself."""
    array = np.random.default_rng(6).normal(0, 300, (32, 96, 96)).astype(np.int16)
    path = tmp_path / "large.nii.gz"
    sitk.WriteImage(oblique(array), str(path), useCompression=True)
    data = bytearray(path.read_bytes())
    start = int(len(data) * where)
    data[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(InputImageError, match=r"large\.nii\.gz: .*truncated or corrupt"):
        io.read_image(path)


@pytest.mark.parametrize("name", ["ct.nii.gz", "scaled.nii.gz", "ct.nrrd"])
def test_a_damaged_member_after_the_data_is_refused(tmp_path, gzip_backend, name):
    """ITK reads the voxels from the first gzip member and stops there; the check goes on to the end, where a second
    member with an invalid deflate block (ISA-L's own error class) once escaped as a traceback. ``scaled`` takes
    ITK's reader and its check rather than the one inflation."""
    raw = tmp_path / "raw.nii"
    sitk.WriteImage(sitk.ReadImage(str(written_ct(tmp_path))), str(raw))
    path = tmp_path / name
    if name == "ct.nrrd":
        sitk.WriteImage(sitk.ReadImage(str(raw)), str(path), useCompression=True)
    else:
        data = bytearray(raw.read_bytes())
        if name == "scaled.nii.gz":
            data[112:120] = struct.pack("<2f", 0.5, -3.0)
        path.write_bytes(gzip.compress(bytes(data)))
    assert sitk.ReadImage(str(path)).GetSize() == (48, 40, 24)
    path.write_bytes(path.read_bytes() + gzipio.GZIP_HEADER + b"\xff" * 32)
    with pytest.raises(InputImageError, match=rf"{name}: the compressed data ends early or fails its check"):
        io.read_image(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_data_after_the_compressed_stream_is_named_as_such(tmp_path, gzip_backend, suffix):
    """Bytes after a whole, valid gzip stream are refused (gzip readers refuse them as they would a damaged next
    member, and they may be one), in words that say so, not as a stream that "ends early or fails its check". Zero
    padding, which gzip itself skips, still reads."""
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(written_ct(tmp_path))), str(path), useCompression=True)
    whole = path.read_bytes()
    expected = sitk.GetArrayFromImage(io.read_image(path))
    path.write_bytes(whole + bytes(100))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_image(path)), expected)
    path.write_bytes(whole + b"JUNKJUNK")
    with pytest.raises(InputImageError, match=rf"ct\{suffix}: unexpected data after the compressed stream"):
        io.read_image(path)


def test_truncated_is_refused(tmp_path, gzip_backend):
    path = written_ct(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputImageError, match=r"ct\.nii\.gz: .*truncated"):
        io.read_image(path)


def test_whole_gzip_of_a_short_nifti_is_refused(tmp_path, gzip_backend):
    """A complete gzip stream that holds fewer voxels than its header promises."""
    raw = tmp_path / "ct.nii"
    sitk.WriteImage(sitk.ReadImage(str(written_ct(tmp_path))), str(raw))
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(raw.read_bytes()[:-1000]))
    promise = r"short\.nii\.gz: the file is truncated: the header promises 92512 bytes"
    with pytest.raises(InputImageError, match=promise):
        io.read_image(short)


def test_a_stream_that_ends_inside_the_extensions_reports_the_bytes_it_holds(tmp_path, gzip_backend):
    """A whole gzip stream of the first 1000 bytes of a NIfTI whose voxels start at byte 2368 (after an extension):
    the file holds 1000 bytes, not 2368."""
    array = np.random.default_rng(10).integers(0, 100, (8, 9, 10)).astype(np.int16)
    nifti = nib.Nifti1Image(array, np.eye(4))
    nifti.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"x" * 2000))
    raw = tmp_path / "ext.nii"
    nib.save(nifti, raw)
    whole = raw.read_bytes()
    assert struct.unpack("<f", whole[108:112])[0] > 1000  # vox_offset
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(whole[:1000]))
    promise = (
        rf"cut\.nii\.gz: the file is truncated: the header promises {len(whole)} bytes \(header and image data\), "
    )
    with pytest.raises(InputImageError, match=promise + "the file holds 1000$"):
        io.read_image(path)


@pytest.mark.parametrize("threads,block", [(1, None), (2, 4096), (3, 1000)])
def test_blocks_make_one_ordinary_gzip_member(tmp_path, gzip_backend, threads, block):
    raw = np.random.default_rng(7).integers(0, 4, 50_000, dtype=np.uint8).tobytes() + bytes(30_000)
    source = tmp_path / "data.bin"
    source.write_bytes(raw)
    target = tmp_path / "data.bin.gz"
    gzipio.gzip_file(source, target, threads=threads, block=block)
    packed = target.read_bytes()
    inflater = zlib.decompressobj(31)
    assert inflater.decompress(packed) == raw
    assert inflater.eof and inflater.unused_data == b"", "one gzip member, nothing after it"
    assert gzip.decompress(packed) == raw
    assert len(packed) < 0.45 * len(raw)  # 2 bits of entropy per noisy byte, then zeros


def test_written_file_is_itks_nifti_compressed(tmp_path, gzip_backend):
    rng = np.random.default_rng(8)
    labels = oblique(rng.integers(0, 3, (30, 40, 50)).astype(np.uint8))
    path = io.write_image(labels, tmp_path / "labels.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"], "the uncompressed NIfTI must be gone"
    itk_raw = tmp_path / "itk.nii"
    sitk.WriteImage(labels, str(itk_raw))
    assert gzip.decompress(path.read_bytes()) == itk_raw.read_bytes()
    assert_same_as_itk(io.read_image(path), path)
    loaded = nib.load(path)
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), sitk.GetArrayViewFromImage(labels).transpose(2, 1, 0))


def test_written_nrrd_keeps_itks_header_with_gzip_data(tmp_path, gzip_backend):
    rng = np.random.default_rng(9)
    probabilities = sitk.GetImageFromArray(rng.random((12, 14, 16, 3)).astype(np.float32), isVector=True)
    probabilities.CopyInformation(oblique(np.zeros((12, 14, 16), np.uint8)))
    path = io.write_image(probabilities, tmp_path / "probabilities.nrrd")
    assert [p.name for p in tmp_path.iterdir()] == ["probabilities.nrrd"]
    itk_raw = tmp_path / "itk.nrrd"
    sitk.WriteImage(probabilities, str(itk_raw), useCompression=False)
    raw_header, raw_data = itk_raw.read_bytes().split(b"\n\n", 1)
    header, data = path.read_bytes().split(b"\n\n", 1)
    assert header == raw_header.replace(b"encoding: raw", b"encoding: gzip")
    assert gzip.decompress(data) == raw_data
    back = io.read_any_image(path)
    assert back.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(probabilities))
    np.testing.assert_allclose(back.GetDirection(), probabilities.GetDirection(), atol=1e-12)


def test_written_nrrd_with_a_header_over_64_kib_is_still_compressed_on_every_core(tmp_path, gzip_backend):
    """A .seg.nrrd with a hundred segments has a header over 64 KiB: it is found whole, not left to ITK's writer
    (one core), whose gzip header says "Unix" where this module's says "unknown"."""
    image = oblique(np.random.default_rng(11).integers(0, 5, (12, 14, 16)).astype(np.uint8))
    for k in range(800):
        image.SetMetaData(f"Segment{k}_Name", "x" * 80)
    path = io.write_image(image, tmp_path / "labels.nrrd")
    itk_raw = tmp_path / "itk.nrrd"
    sitk.WriteImage(image, str(itk_raw), useCompression=False)
    raw_header, raw_data = itk_raw.read_bytes().split(b"\n\n", 1)
    assert len(raw_header) > 1 << 16
    header, data = path.read_bytes().split(b"\n\n", 1)
    assert header == raw_header.replace(b"encoding: raw", b"encoding: gzip")
    assert data.startswith(gzipio.GZIP_HEADER) and gzip.decompress(data) == raw_data


def test_failed_compression_leaves_nothing(tmp_path, blob_image, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gzipio, "gzip_file", fail)
    with pytest.raises(OutputError, match=r"labels\.nii\.gz: could not be written .*No space left"):
        io.write_image(blob_image, tmp_path / "labels.nii.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.realdata
def test_real_volumes_read_as_itk_reads_them(shared_data):
    paths = sorted(shared_data.glob("msd_hippocampus/**/*.nii.gz"))[:4]
    paths += sorted(shared_data.glob("brats2013/*/*.nii.gz"))[:6]  # one of them is scaled: ITK's path
    paths += sorted(shared_data.glob("ct_*/**/*.nii.gz"))[:4]
    assert len(paths) >= 10
    fast = 0
    for path in paths:
        fast += gzipio.read_nifti_gz(path) is not None
        assert_same_as_itk(io.read_image(path), path)
    assert fast >= len(paths) - 2
