"""Reading and writing: formats, DICOM series, and every kind of bad input named with its file."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import write_dicom_series
from medseg import io
from medseg.errors import InputImageError, OutputError


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_formats_round_trip_geometry(tmp_path, blob_image, suffix):
    image = sitk.Image(blob_image)
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    path = io.write_image(image, tmp_path / f"scan{suffix}")
    back = io.read_image(path)
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image), atol=1e-3)
    assert [p.name for p in tmp_path.iterdir()] == [f"scan{suffix}"], "no temporary file may remain"


def test_dicom_series_folder_is_read_as_one_volume(tmp_path):
    array = np.random.default_rng(1).integers(0, 1000, (6, 20, 24)).astype(np.int16)
    folder = write_dicom_series(array, tmp_path / "series", spacing=(0.7, 0.7, 3.0), origin=(-10.0, 20.0, 5.0))
    back = io.read_image(folder)
    assert back.GetSize() == (24, 20, 6)
    np.testing.assert_allclose(back.GetSpacing(), (0.7, 0.7, 3.0), atol=1e-3)
    np.testing.assert_allclose(back.GetOrigin(), (-10.0, 20.0, 5.0), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)


def test_dicom_series_with_a_missing_slice_or_a_gantry_tilt_is_refused_not_misplaced(tmp_path):
    """ITK reads both with a warning on the console only: a missing slice as an even grid at the average step (every
    slice after the gap misplaced), a tilted series as an untilted grid. Both are refused, naming the folder."""
    array = np.random.default_rng(1).integers(0, 1000, (8, 20, 24)).astype(np.int16)
    gap = write_dicom_series(array, tmp_path / "gap", spacing=(0.7, 0.7, 2.0), origin=(-10.0, 20.0, 5.0))
    (gap / "slice004.dcm").unlink()
    with pytest.raises(
        InputImageError, match=r"gap: the slices are not evenly spaced: 4 mm between slices 4 and 5 of 7"
    ):
        io.read_image(gap)
    tilted = write_dicom_series(
        array, tmp_path / "tilted", spacing=(0.7, 0.7, 2.0), origin=(0.0, 0.0, 0.0), tilt_mm=0.5
    )
    with pytest.raises(InputImageError, match=r"tilted: each slice is shifted .* gantry tilt of about 14\.0 degrees"):
        io.read_image(tilted)
    # rounding of the positions a scanner writes is no reason to refuse: 2 micrometres off the even steps
    jitter = write_dicom_series(
        array, tmp_path / "jitter", spacing=(0.7, 0.7, 2.0), origin=(0.0, 0.0, 0.0), tilt_mm=0.002
    )
    assert io.read_image(jitter).GetSize() == (24, 20, 8)


def test_slice_geometry_checks_each_way_a_series_can_be_irregular():
    axial = np.array([1.0, 0, 0, 0, 1, 0])
    even = [(np.array([0.0, 0, 2.5 * k]), axial) for k in range(5)]
    assert io.slice_geometry_problem(even) is None
    assert io.slice_geometry_problem(even[:1]) is None
    assert "same orientation" in io.slice_geometry_problem([*even[:4], (even[4][0], np.array([1.0, 0, 0, 0, 0, 1]))])
    assert "share one position" in io.slice_geometry_problem([(np.zeros(3), axial)] * 3)
    mixed = [(np.array([0.0, 0, z]), axial) for z in (0, 2, 4, 6, 11, 16)]  # 2 mm, then 5 mm
    assert "5 mm between slices 4 and 5 of 6, against 2 mm" in io.slice_geometry_problem(mixed)


def test_a_one_component_vector_volume_is_read_as_a_scalar_one(tmp_path):
    """A NIfTI with the "vector" intent and one component (dim 5: x, y, z, 1, 1) reads in ITK as a vector image with
    one component; it is the scalar volume it holds (casting it once failed deep in preprocessing, with a
    traceback)."""
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(3).integers(-100, 900, (6, 7, 8)).astype(np.int16)
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    nifti = nib.Nifti1Image(data[..., None, None], affine)
    nifti.header.set_intent("vector")
    path = tmp_path / "vector.nii.gz"
    nib.save(nifti, path)
    assert sitk.ReadImage(str(path)).GetPixelIDTypeAsString() == "vector of 16-bit signed integer"
    image = io.read_image(path)
    assert image.GetPixelIDTypeAsString() == "16-bit signed integer" and image.GetSize() == (6, 7, 8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), data.transpose(2, 1, 0))
    np.testing.assert_allclose(image.GetSpacing(), (1.5, 2.0, 3.0))
    np.testing.assert_allclose(image.GetOrigin(), (-10.0, -20.0, 30.0))  # RAS -> LPS


def test_an_uncompressed_nifti_named_nii_gz_is_read_and_still_checked_for_truncation(tmp_path, blob_image):
    plain = io.write_image(blob_image, tmp_path / "plain.nii")
    misnamed = tmp_path / "misnamed.nii.gz"
    misnamed.write_bytes(plain.read_bytes())
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(io.read_image(misnamed)), sitk.GetArrayFromImage(io.read_image(plain))
    )
    misnamed.write_bytes(plain.read_bytes()[:-100])
    with pytest.raises(InputImageError, match=r"misnamed\.nii\.gz: .*truncated"):
        io.read_image(misnamed)


@pytest.mark.parametrize("writer", ["medseg", "itk"])
def test_a_damaged_compressed_nrrd_is_refused_not_read_as_other_voxels(tmp_path, blob_image, writer):
    """ITK does not check a gzip-encoded NRRD's CRC: of 40 single flipped bits, 3 or 4 read silently as other
    voxels. Every one is now refused, naming the file; the undamaged file still reads."""
    path = tmp_path / "scan.nrrd"
    if writer == "medseg":
        io.write_image(blob_image, path)
    else:
        sitk.WriteImage(blob_image, str(path), useCompression=True)
    data = path.read_bytes()
    assert b"encoding: gzip" in data[:1000]
    start = data.find(b"\n\n") + 2
    expected = sitk.GetArrayFromImage(io.read_image(path))
    refused = 0
    for k in range(12):
        damaged = bytearray(data)
        damaged[start + 20 + k * (len(data) - start - 40) // 12] ^= 0x01
        path.write_bytes(bytes(damaged))
        try:
            read = io.read_image(path)
        except InputImageError as error:
            assert "scan.nrrd" in str(error) and ("corrupt" in str(error) or "truncated" in str(error))
            refused += 1
        else:
            same = np.array_equal(sitk.GetArrayFromImage(read), expected)
            pytest.fail(f"flipped bit {k} was read without a word ({'same' if same else 'other'} voxels)")
    assert refused == 12


def test_a_damaged_compressed_nrrd_with_a_header_over_64_kib_is_refused(tmp_path):
    """A .seg.nrrd with a hundred segments has a header over 64 KiB; its data is checked all the same."""
    image = sitk.GetImageFromArray(np.random.default_rng(2).integers(1, 50, (16, 64, 64)).astype(np.int16))
    for k in range(800):
        image.SetMetaData(f"Segment{k}_Name", "x" * 80)
    path = tmp_path / "segments.seg.nrrd"
    sitk.WriteImage(image, str(path), useCompression=True)
    data = bytearray(path.read_bytes())
    start = data.find(b"\n\n") + 2
    assert start > 1 << 16
    middle = (start + len(data)) // 2
    data[middle : middle + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(InputImageError, match=r"segments\.seg\.nrrd: .*truncated or corrupt"):
        io.read_image(path)


def test_a_detached_nrrd_header_without_a_blank_line_is_read(tmp_path):
    """The header is read to its blank line, however long; a detached header may end without one."""
    array = np.random.default_rng(2).integers(1, 50, (3, 4, 5)).astype(np.int16)
    (tmp_path / "scan.raw").write_bytes(array.tobytes())
    path = tmp_path / "scan.nrrd"
    path.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 5 4 3\nendian: little\nencoding: raw\ndata file: scan.raw\n"
    )
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_image(path)), array)


def itk_nifti(tmp_path: Path, name: str = "u.nii") -> tuple[Path, np.ndarray]:
    """A small int16 NIfTI-1 as ITK writes it (vox_offset 352), and its voxels."""
    array = np.random.default_rng(4).integers(1, 100, (8, 9, 10)).astype(np.int16)
    return write(sitk.GetImageFromArray(array), tmp_path / name), array


def save_nifti(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nifti_with_an_invalid_vox_offset_is_refused(tmp_path, suffix, value):
    """ITK reads these from byte 348 without a word; the engine once failed on them with a bare ValueError."""
    raw, _ = itk_nifti(tmp_path)
    data = bytearray(raw.read_bytes())
    data[108:112] = struct.pack("<f", value)
    path = save_nifti(tmp_path / f"bad{suffix}", bytes(data))
    with pytest.raises(InputImageError, match=rf"bad\{suffix}: invalid vox_offset {value}"):
        io.read_image(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("vox_offset", [0.0, 348.0])
def test_a_single_file_nifti_whose_voxels_start_before_352_is_refused(tmp_path, suffix, vox_offset):
    """The standard puts such a file's voxels at byte 352, ITK reads them from 348 (every voxel shifted by 4 bytes)
    and nibabel from vox_offset itself; ITK used to read it without a word, and a truncated one zero-filled."""
    raw, _ = itk_nifti(tmp_path)
    data = bytearray(raw.read_bytes())
    data[108:112] = struct.pack("<f", vox_offset)
    for name, content in (("whole", bytes(data)), ("short", bytes(data[:-300]))):
        path = save_nifti(tmp_path / f"{name}{suffix}", content)
        with pytest.raises(InputImageError, match=rf"{name}\{suffix}: invalid vox_offset {int(vox_offset)} .*352"):
            io.read_image(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti_is_sized_by_its_datatype_not_its_bitpix(tmp_path, suffix):
    """ITK reads two bytes a voxel for int16 whatever bitpix says: with bitpix 0 a whole file reads, and a truncated
    one, once let through zero-filled, is refused."""
    raw, array = itk_nifti(tmp_path)
    data = bytearray(raw.read_bytes())
    data[72:74] = struct.pack("<h", 0)
    whole = save_nifti(tmp_path / f"whole{suffix}", bytes(data))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_image(whole)), array)
    short = save_nifti(tmp_path / f"short{suffix}", bytes(data[:-720]))
    with pytest.raises(
        InputImageError, match=rf"short\{suffix}: the file is truncated: the header promises 1792 bytes"
    ):
        io.read_image(short)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti_2_file_is_named_as_such_not_as_a_damaged_one(tmp_path, suffix):
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(5).integers(0, 100, (6, 7, 8)).astype(np.int16)
    path = tmp_path / f"scan{suffix}"
    nib.save(nib.Nifti2Image(data, np.eye(4)), path)
    with pytest.raises(
        InputImageError, match=rf"scan\{suffix}: NIfTI-2 is not supported by ITK's reader here; convert it to NIfTI-1"
    ):
        io.read_image(path)


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputImageError, match="the folder holds no DICOM series"):
        io.read_image(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(InputImageError, match=r"nope\.nii\.gz: no such file"):
        io.read_image(tmp_path / "nope.nii.gz")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(InputImageError, match=r"empty\.nii\.gz: the file is empty"):
        io.read_image(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file(tmp_path, blob_image, suffix):
    path = write(blob_image, tmp_path / f"whole{suffix}")
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(InputImageError, match=rf"truncated\{suffix}: .*truncated"):
        io.read_image(truncated)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.nrrd"
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10\nencoding: raw\n\n" + b"\x00" * 50)
    with pytest.raises(InputImageError, match=r"corrupt\.nrrd: cannot be read"):
        io.read_image(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"this is a text file, not a NIfTI"))
    with pytest.raises(InputImageError, match=r"notes\.nii\.gz"):
        io.read_image(path)


def test_2d_image_is_refused(tmp_path):
    path = write(sitk.GetImageFromArray(np.arange(100, dtype=np.float32).reshape(10, 10)), tmp_path / "slice.nii.gz")
    with pytest.raises(InputImageError, match=r"slice\.nii\.gz: expected a 3D volume, got a 2D image of size 10x10"):
        io.read_image(path)


def test_4d_image_is_refused(tmp_path):
    array = np.random.default_rng(0).normal(size=(3, 5, 6, 7)).astype(np.float32)
    image = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in array])
    path = write(image, tmp_path / "timeseries.nii.gz")
    with pytest.raises(
        InputImageError, match=r"timeseries\.nii\.gz: expected a 3D volume, got a 4D image of size 7x6x5x3"
    ):
        io.read_image(path)


def test_4d_with_single_volume_is_accepted(tmp_path, blob_image):
    path = write(sitk.JoinSeries([blob_image]), tmp_path / "one_frame.nii.gz")
    assert io.read_image(path).GetSize() == blob_image.GetSize()


def test_nan_voxels_are_refused(tmp_path, blob_image):
    array = sitk.GetArrayFromImage(blob_image)
    array[3, 4, 5] = np.nan
    array[0, 0, 0] = np.inf
    path = write(sitk.GetImageFromArray(array), tmp_path / "nan.nrrd")
    with pytest.raises(InputImageError, match=r"nan\.nrrd: 2 voxels are NaN or infinite"):
        io.read_image(path)


def test_constant_image_is_refused(tmp_path):
    path = write(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.int16)), tmp_path / "blank.nrrd")
    with pytest.raises(InputImageError, match=r"blank\.nrrd: every voxel has the same value \(0\)"):
        io.read_image(path)


def test_vector_image_is_refused(tmp_path):
    rgb = sitk.GetImageFromArray(
        np.random.default_rng(0).integers(0, 255, (4, 5, 6, 3)).astype(np.uint8), isVector=True
    )
    path = write(rgb, tmp_path / "rgb.nrrd")
    with pytest.raises(InputImageError, match=r"rgb\.nrrd: expected one value per voxel, got 3"):
        io.read_image(path)


def test_channels_must_share_a_grid(tmp_path, blob_image):
    a = write(blob_image, tmp_path / "t1.nii.gz")
    shifted = sitk.Image(blob_image)
    shifted.SetOrigin((13.0, -30.0, 7.5))
    b = write(shifted, tmp_path / "flair.nii.gz")
    with pytest.raises(InputImageError, match=r"flair\.nii\.gz: its voxel grid differs from .*t1\.nii\.gz: origin"):
        io.read_channels([a, b])


def test_channel_count_must_match_the_model(tmp_path, blob_image):
    a = write(blob_image, tmp_path / "t1.nii.gz")
    with pytest.raises(InputImageError, match=r"needs 2 input channel\(s\) \(FLAIR, T1c\), got 1"):
        io.read_channels([a], channel_names=["FLAIR", "T1c"])


def test_output_checks_happen_before_work(tmp_path):
    with pytest.raises(OutputError, match="unsupported output format .png"):
        io.check_output_path(tmp_path / "out.png")
    with pytest.raises(OutputError, match="does not exist"):
        io.check_output_path(tmp_path / "missing_dir" / "out.nii.gz")


def test_failed_write_leaves_nothing(tmp_path, blob_image, monkeypatch):
    def broken_writer(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_writer)
    with pytest.raises(OutputError, match="could not be written"):
        io.write_image(blob_image, tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_turns_writer_failures_into_one_named_error(tmp_path):
    target = tmp_path / "result.seg.nrrd"
    with pytest.raises(OutputError, match=r"result\.seg\.nrrd: could not be written \(writer failed\)"):
        with io.atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".seg.nrrd")
            tmp.write_bytes(b"half")
            raise OSError("writer failed")
    assert list(tmp_path.iterdir()) == []
    with io.atomic_output(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["result.seg.nrrd"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_image_marks_a_preview_and_leaves_the_image_as_it_was(tmp_path, blob_image, suffix):
    image = sitk.Image(blob_image)
    image.SetMetaData("ITK_FileNotes", "an earlier note")
    path = io.write_image(image, tmp_path / f"preview{suffix}", preview=True)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if suffix == ".nii.gz":  # NIfTI's descrip field, 80 bytes at offset 148 of the header
        with gzip.open(path, "rb") as handle:
            assert handle.read(348)[148:228].rstrip(b"\0").decode() == io.PREVIEW_NOTE
    else:
        assert reader.GetMetaData(io.PREVIEW_KEY) == "1"
    assert image.GetMetaData("ITK_FileNotes") == "an earlier note" and not image.HasMetaDataKey(io.PREVIEW_KEY)
    assert [p.name for p in tmp_path.iterdir()] == [f"preview{suffix}"], "no temporary file may remain"
    np.testing.assert_allclose(sitk.GetArrayFromImage(io.read_image(path)), sitk.GetArrayFromImage(image), atol=1e-3)


def staged_pair(tmp_path: Path, blob_image) -> tuple[Path, Path]:
    """Two earlier outputs, labels and probabilities, with their contents."""
    labels, probabilities = tmp_path / "labels.nii.gz", tmp_path / "probabilities.nrrd"
    labels.write_bytes(b"earlier labels")
    probabilities.write_bytes(b"earlier probabilities")
    return labels, probabilities


def test_outputs_together_leave_the_earlier_files_when_a_name_is_taken_by_a_folder(tmp_path, blob_image):
    """The second name became a folder after the checks that come before the computation: the first output used to
    replace its earlier file regardless, and a bare IsADirectoryError escaped."""
    labels, probabilities = staged_pair(tmp_path, blob_image)
    probabilities.unlink()
    with pytest.raises(OutputError, match=r"probabilities\.nrrd: is a folder"):
        with io.outputs_together():
            io.write_image(blob_image, labels)
            io.write_image(blob_image, probabilities)
            (probabilities / "x").mkdir(parents=True)
    assert labels.read_bytes() == b"earlier labels"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "probabilities.nrrd"]


def test_outputs_together_put_the_earlier_files_back_when_a_rename_fails(tmp_path, blob_image):
    """The second rename fails (its temporary file removed meanwhile, as a cleaner might) after the first succeeded:
    the first output is removed again and every earlier file is back under its name."""
    labels, probabilities = staged_pair(tmp_path, blob_image)
    with pytest.raises(OutputError, match=r"probabilities\.nrrd: could not be written"):
        with io.outputs_together():
            io.write_image(blob_image, labels)
            with io.atomic_output(probabilities) as tmp:
                tmp.write_bytes(b"new probabilities")
            os.unlink(tmp)
    assert labels.read_bytes() == b"earlier labels"
    assert probabilities.read_bytes() == b"earlier probabilities"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "probabilities.nrrd"]


def test_outputs_together_replace_every_earlier_file(tmp_path, blob_image):
    labels, probabilities = staged_pair(tmp_path, blob_image)
    with io.outputs_together():
        io.write_image(blob_image, labels)
        io.write_image(blob_image, probabilities)
    for path in (labels, probabilities):
        np.testing.assert_allclose(sitk.GetArrayFromImage(io.read_image(path)), sitk.GetArrayFromImage(blob_image))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "probabilities.nrrd"]
