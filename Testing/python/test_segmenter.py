"""The Segmenter end to end on synthetic volumes: geometry in every orientation, ROI, files, cancel."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import DIRECTIONS, physical_points_of_label, threshold_model, with_direction
from medseg import io
from medseg.errors import CancelledError, InputImageError, OutputError
from medseg.preprocessing import IndexBox
from medseg.progress import RunControl
from medseg.segmenter import Segmenter


def expected_blob(image: sitk.Image) -> sitk.Image:
    """Where ThresholdNet must put label 1: the bright box of the ``blob_image`` fixture."""
    labels = (sitk.GetArrayFromImage(image) > 250).astype(np.uint8)
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    return out


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_labelled_blob_lands_on_the_same_physical_points(tmp_path, blob_image, direction):
    image = with_direction(blob_image, direction)
    segmenter = Segmenter(threshold_model(tmp_path, orientation="RAS"), device="cpu")
    result = segmenter.segment(image)
    labelmap = result.labelmap
    assert labelmap.GetSize() == image.GetSize()
    assert labelmap.GetSpacing() == image.GetSpacing()
    assert labelmap.GetOrigin() == image.GetOrigin()
    assert labelmap.GetDirection() == image.GetDirection()
    assert labelmap.GetPixelID() == sitk.sitkUInt8
    expected = expected_blob(image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labelmap), sitk.GetArrayFromImage(expected))
    np.testing.assert_allclose(physical_points_of_label(labelmap), physical_points_of_label(expected), atol=1e-6)
    assert result.statistics[0].voxels == 5 * 7 * 5
    assert result.statistics[0].volume_ml == pytest.approx(175 * 0.8 * 1.1 * 2.5 / 1000)


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_resampled_model_spacing_still_maps_back_to_the_input_grid(tmp_path, blob_image, direction):
    image = with_direction(blob_image, direction)
    segmenter = Segmenter(threshold_model(tmp_path, orientation="RAS", spacing=[1.0, 1.0, 1.0]), device="cpu")
    labelmap = segmenter.segment(image).labelmap
    assert (labelmap.GetSize(), labelmap.GetOrigin(), labelmap.GetDirection()) == (
        image.GetSize(),
        image.GetOrigin(),
        image.GetDirection(),
    )
    got = sitk.GetArrayFromImage(labelmap) == 1
    want = sitk.GetArrayFromImage(expected_blob(image)) == 1
    dice = 2 * np.sum(got & want) / (got.sum() + want.sum())
    # Resampling a 5-voxel-thick blob to 1 mm and back blurs its edge by up to a voxel (Dice 0.80-0.91 here),
    # but must not move it: a flip or an off-by-one shifts the centroid by a whole voxel (0.8-2.5 mm) or more.
    assert dice > 0.78, f"Dice {dice:.3f} of the blob after resampling to 1 mm and back"
    shift = physical_points_of_label(labelmap).mean(0) - physical_points_of_label(expected_blob(image)).mean(0)
    assert np.all(np.abs(shift) < 0.45), f"blob centroid moved by {shift} mm"


def test_roi_restricts_the_result(tmp_path, blob_image):
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    box = IndexBox(start=(0, 0, 0), size=(6, 24, 16))  # covers x = 3..5 of the blob at x = 3..7
    labels = sitk.GetArrayFromImage(segmenter.segment(blob_image, roi=box).labelmap)
    expected = sitk.GetArrayFromImage(expected_blob(blob_image))
    expected[:, :, 6:] = 0
    np.testing.assert_array_equal(labels, expected)


def test_probabilities_are_on_the_input_grid_and_sum_to_one(tmp_path, blob_image):
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    result = segmenter.segment(blob_image, with_probabilities=True)
    probabilities = result.probabilities
    assert probabilities.GetNumberOfComponentsPerPixel() == 3
    assert probabilities.GetSize() == blob_image.GetSize()
    array = sitk.GetArrayFromImage(probabilities)
    np.testing.assert_allclose(array.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(array, -1), sitk.GetArrayFromImage(result.labelmap))


def test_keep_largest_component(tmp_path, blob_image):
    array = sitk.GetArrayFromImage(blob_image)
    array[12:14, 18:20, 15:17] += 300  # a second, smaller bright blob
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(blob_image)
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    both = sitk.GetArrayFromImage(segmenter.segment(image).labelmap)
    largest = sitk.GetArrayFromImage(segmenter.segment(image, keep_largest=True).labelmap)
    assert (both == 1).sum() == 175 + 8
    assert (largest == 1).sum() == 175


def test_segment_files_writes_nifti_and_probabilities(tmp_path, blob_image):
    source = io.write_image(blob_image, tmp_path / "scan.nrrd")
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    result = segmenter.segment_files([source], tmp_path / "seg.nii.gz", probabilities=tmp_path / "prob.nii.gz")
    written = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(result.labelmap))
    assert sitk.ReadImage(str(tmp_path / "prob.nii.gz")).GetNumberOfComponentsPerPixel() == 3
    assert list(result.seconds) == ["reading", "preprocessing", "inference", "postprocessing", "writing"]


def test_wrong_channel_count_is_refused_before_any_work(tmp_path, blob_image):
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    with pytest.raises(InputImageError, match=r"needs 1 input channel\(s\) \(T1\), got 2"):
        segmenter.segment([blob_image, blob_image])
    a = io.write_image(blob_image, tmp_path / "a.nii.gz")
    with pytest.raises(InputImageError, match=r"needs 1 input channel\(s\) \(T1\), got 2 file"):
        segmenter.segment_files([a, a], tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_bad_output_path_is_refused_before_reading(tmp_path, blob_image):
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    with pytest.raises(OutputError, match="unsupported output format .jpg"):
        segmenter.segment_files([tmp_path / "does-not-matter.nii.gz"], tmp_path / "out.jpg")


def test_cancel_leaves_no_file(tmp_path, blob_image):
    source = io.write_image(blob_image, tmp_path / "scan.nii.gz")
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    control = RunControl()
    control.progress = lambda stage, fraction: control.cancel() if stage == "inference" else None
    with pytest.raises(CancelledError):
        segmenter.segment_files([source], tmp_path / "seg.nii.gz", control=control)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


def test_two_channel_model_takes_channels_in_card_order(tmp_path, blob_image):
    model = threshold_model(tmp_path)
    two = dict(model.card.__dict__)
    from medseg.models.card import Channel, ModelCard

    two["channels"] = (Channel("FLAIR", "MR"), Channel("T1c", "MR"))
    model.card = ModelCard(**two)
    segmenter = Segmenter(model, device="cpu")
    flair = io.write_image(blob_image, tmp_path / "flair.nii.gz")
    dark = sitk.Image(blob_image) * 0 + 5
    dark[0, 0, 0] = 6
    t1c = io.write_image(dark, tmp_path / "t1c.nii.gz")
    # ThresholdNet looks at the first channel only: the blob must come from FLAIR, not T1c.
    result = segmenter.segment_files([flair, t1c], tmp_path / "seg.nii.gz")
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(result.labelmap), sitk.GetArrayFromImage(expected_blob(blob_image))
    )
    swapped = segmenter.segment_files([t1c, flair], tmp_path / "seg2.nii.gz")
    assert sitk.GetArrayFromImage(swapped.labelmap).sum() <= 1
    with pytest.raises(InputImageError, match=r"needs 2 input channel\(s\) \(FLAIR, T1c\), got 1"):
        segmenter.segment_files([flair], tmp_path / "seg3.nii.gz")


def test_inputs_are_never_modified_or_overwritten(tmp_path, blob_image):
    import hashlib

    source = io.write_image(blob_image, tmp_path / "scan.nii.gz")
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    with pytest.raises(OutputError, match="would overwrite an input"):
        segmenter.segment_files([source], source)
    with pytest.raises(OutputError, match="cannot be written to one file"):
        segmenter.segment_files([source], tmp_path / "a.nii.gz", probabilities=tmp_path / "a.nii.gz")
    segmenter.segment_files([source], tmp_path / "seg.nii.gz", probabilities=tmp_path / "p.nii.gz")
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "over-an-earlier-result"])
def test_a_failed_labelmap_write_writes_no_probabilities_and_keeps_an_earlier_result(
    tmp_path, blob_image, monkeypatch, earlier
):
    """All outputs or none: the probabilities were written first, then the labelmap failed. Neither name gets a new
    file, and an earlier run's files under those names stay as they were (they were once deleted)."""
    source = io.write_image(blob_image, tmp_path / "scan.nii.gz")
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    outputs = {tmp_path / "seg.nii.gz": b"earlier labelmap", tmp_path / "p.nii.gz": b"earlier probabilities"}
    if earlier:
        for path, content in outputs.items():
            path.write_bytes(content)
    real_write = io.write_image
    written = []

    def fail_on_labelmap(image, path, **kwargs):
        if image.GetNumberOfComponentsPerPixel() == 1:
            raise OutputError(f"{path}: could not be written (disk full)")
        written.append(real_write(image, path, **kwargs))
        return written[-1]

    monkeypatch.setattr(io, "write_image", fail_on_labelmap)
    with pytest.raises(OutputError, match="disk full"):
        segmenter.segment_files([source], tmp_path / "seg.nii.gz", probabilities=tmp_path / "p.nii.gz")
    assert written == [tmp_path / "p.nii.gz"]  # the probabilities were written, under a temporary name
    expected = ["p.nii.gz", "scan.nii.gz", "seg.nii.gz"] if earlier else ["scan.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    if earlier:
        assert all(path.read_bytes() == content for path, content in outputs.items())


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_outputs_carry_the_inputs_qform_and_sform_so_every_reader_overlays_them(tmp_path, suffix):
    """A registered NIfTI whose qform and sform disagree (SPM and FSL write such files): ITK and Slicer take one,
    nibabel and FSL the other. The outputs keep the input's qform and sform as stored, so each reader places them
    where it places the input; before, they carried ITK's choice in both, 100 mm off in nibabel."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(4)
    data = rng.normal(0.0, 1.0, (24, 20, 16)).astype(np.float32)
    data[6:18, 5:15, 4:12] += 3.0
    nifti = nib.Nifti1Image(data, None)
    qform, sform = np.diag([1.2, 1.5, 2.0, 1.0]), np.diag([1.2, 1.5, 2.0, 1.0])
    sform[:3, 3] = [100.0, -20.0, 5.0]  # registered elsewhere
    nifti.set_qform(qform, code=1)
    nifti.set_sform(sform, code=2)
    source = tmp_path / f"scan{suffix}"
    nib.save(nifti, source)
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    labels, maps = tmp_path / f"seg{suffix}", tmp_path / f"p{suffix}"
    segmenter.segment_files([source], labels, probabilities=maps)
    for output in (labels, maps):
        read = nib.load(output)
        np.testing.assert_allclose(read.affine, nib.load(source).affine, atol=1e-5)
        np.testing.assert_allclose(read.get_qform(), qform, atol=1e-5)
        assert (int(read.header["qform_code"]), int(read.header["sform_code"])) == (1, 2)
        assert io.grid_mismatch(sitk.ReadImage(str(source)), sitk.ReadImage(str(output))) is None  # ITK: as before
    assert np.count_nonzero(np.asanyarray(nib.load(labels).dataobj)) > 0
    # an input on another grid than the output (never from segment_files): the output keeps ITK's header
    other = io.read_nifti_orientation(source, sitk.ReadImage(str(source))[2:, :, :])
    image = sitk.ReadImage(str(labels))
    io.write_image(image, tmp_path / f"plain{suffix}", orientation=other)
    assert int(nib.load(tmp_path / f"plain{suffix}").header["sform_code"]) != 2


def test_an_output_that_is_a_folder_is_refused_before_any_work(tmp_path, blob_image):
    source = io.write_image(blob_image, tmp_path / "scan.nii.gz")
    (tmp_path / "seg.nii.gz").mkdir()
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    with pytest.raises(OutputError, match=r"seg\.nii\.gz: is a folder; give a file name"):
        segmenter.segment_files([source], tmp_path / "seg.nii.gz")


def test_preview_is_marked_runs_fewer_windows_and_stays_on_the_input_grid(tmp_path, blob_image):
    model = threshold_model(tmp_path, orientation="RAS", spacing=[1.0, 1.0, 1.0])
    model.card = dataclasses.replace(model.card, inference=dataclasses.replace(model.card.inference, overlap=0.5))
    segmenter = Segmenter(model, device="cpu")
    full = segmenter.segment(blob_image)
    preview = segmenter.segment(blob_image, preview=True)
    assert preview.preview and not full.preview
    assert preview.inference.windows < full.inference.windows
    assert preview.labelmap.GetSize() == blob_image.GetSize()
    assert preview.labelmap.GetOrigin() == blob_image.GetOrigin()
    # a voxel-wise model: the preview differs only where nearest neighbour and linear interpolation disagree
    a, b = sitk.GetArrayFromImage(full.labelmap), sitk.GetArrayFromImage(preview.labelmap)
    assert 0.97 < np.mean(a == b) < 1.0
    assert preview.statistics[0].voxels == pytest.approx(full.statistics[0].voxels, rel=0.25)
    # asking for the probabilities too (the Slicer module keeps them for refinement) leaves a preview's labels as
    # they are: the network grid's, nearest neighbour, not the argmax of interpolated maps
    with_maps = segmenter.segment(blob_image, preview=True, with_probabilities=True)
    assert with_maps.probabilities is not None and with_maps.preview
    np.testing.assert_array_equal(sitk.GetArrayFromImage(with_maps.labelmap), b)


def test_restored_argmax_equals_the_argmax_of_restored_probabilities(tmp_path, blob_image):
    from medseg.models.card import Preprocessing
    from medseg.postprocessing import restore_argmax, restore_probabilities
    from medseg.preprocessing import preprocess

    spec = Preprocessing(orientation="LPS", spacing=(1.3, 0.9, 2.0))
    _, record = preprocess([blob_image], spec, roi=IndexBox((2, 3, 1), (15, 18, 12)))
    rng = np.random.default_rng(0)
    size = record.network_reference.GetSize()
    probabilities = rng.dirichlet([1.0, 1.0, 1.0], size=size).transpose(3, 0, 1, 2).astype(np.float32)
    probabilities[:, : size[0] // 2] = np.round(probabilities[:, : size[0] // 2], 1)  # ties, resolved as argmax
    restored = restore_probabilities(probabilities, record)
    np.testing.assert_array_equal(restore_argmax(probabilities, record), restored.argmax(0))


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
@pytest.mark.parametrize(
    ("orientation", "spacing", "roi", "crop"),
    [
        ("RAS", (1.3, 0.9, 2.0), None, "none"),
        ("LPS", None, IndexBox((2, 3, 1), (15, 18, 12)), "none"),
        ("RAS", (1.0, 1.0, 1.0), None, "none"),
        ("RAS", (1.3, 0.9, 2.0), None, "foreground"),
        ("RAS", (1.6, 2.2, 5.0), None, "none"),  # twice the input's: its last voxels half a voxel past the grid's
    ],
)
def test_the_device_restore_gives_the_simpleitk_labels(blob_image, direction, orientation, spacing, roi, crop):
    """The GPU's way of mapping labels back (torch, axis by axis), run here on the CPU, against SimpleITK's; from
    an array, and from a tensor as inference keeps the result on a GPU."""
    import torch
    from medseg.models.card import Preprocessing
    from medseg.postprocessing import restore_argmax, restore_argmax_on
    from medseg.preprocessing import preprocess

    image = with_direction(blob_image, direction)
    _, record = preprocess([image], Preprocessing(orientation=orientation, spacing=spacing, crop=crop), roi=roi)
    assert (record.foreground_box is not None) == (crop == "foreground")
    size = record.network_reference.GetSize()
    probabilities = np.random.default_rng(0).dirichlet([1.0] * 3, size=size).transpose(3, 0, 1, 2)
    probabilities = probabilities.astype(np.float32)
    expected = restore_argmax(probabilities, record)
    labels = restore_argmax_on(probabilities, record, torch.device("cpu"))
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(
        restore_argmax_on(torch.from_numpy(probabilities), record, torch.device("cpu")), expected
    )
    assert labels.transpose(2, 1, 0).flags.c_contiguous, "(Z, Y, X) memory, as ITK stores it: no strided copy"


def test_an_out_of_memory_gpu_restore_falls_back_to_the_cpu(tmp_path, blob_image, monkeypatch, caplog):
    import torch
    from medseg import segmenter as segmenter_module

    segmenter = Segmenter(threshold_model(tmp_path, spacing=[1.0, 1.0, 1.0]), device="cpu")
    expected = sitk.GetArrayFromImage(segmenter.segment(blob_image).labelmap)
    segmenter.device = torch.device("cuda")  # only the restore step sees it: the other stages stay on the CPU
    real_preprocess = segmenter_module.preprocess
    monkeypatch.setattr(segmenter_module, "preprocess", lambda *a, device=None, **k: real_preprocess(*a, **k))

    def no_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(segmenter_module, "restore_argmax_on", no_memory)
    monkeypatch.setattr(segmenter_module, "sliding_window_probabilities", _cpu_inference(segmenter_module))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with caplog.at_level("WARNING", logger="medseg.segmenter"):
        result = segmenter.segment(blob_image)
    assert "doing it on the CPU" in caplog.text and "doing it on the CPU" in result.inference.notes[-1]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labelmap), expected)


def test_an_out_of_memory_gpu_resampling_falls_back_to_the_cpu(tmp_path, blob_image, monkeypatch, caplog):
    import torch
    from medseg import segmenter as segmenter_module

    segmenter = Segmenter(threshold_model(tmp_path, spacing=[1.0, 1.0, 1.0]), device="cpu")
    expected = sitk.GetArrayFromImage(segmenter.segment(blob_image).labelmap)
    segmenter.device = torch.device("cuda")  # the other stages are sent to the CPU below
    real_preprocess = segmenter_module.preprocess
    devices = []

    def preprocess(*args, device=None, **kwargs):
        devices.append(device)
        if device is not None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_preprocess(*args, **kwargs)

    monkeypatch.setattr(segmenter_module, "preprocess", preprocess)
    real_restore = segmenter_module.restore_argmax_on
    monkeypatch.setattr(segmenter_module, "restore_argmax_on", lambda p, r, d: real_restore(p, r, torch.device("cpu")))
    monkeypatch.setattr(segmenter_module, "sliding_window_probabilities", _cpu_inference(segmenter_module))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with caplog.at_level("WARNING", logger="medseg.segmenter"):
        result = segmenter.segment(blob_image)
    assert devices == [torch.device("cuda"), None]
    message = "GPU out of memory while resampling the input to the model's spacing; doing it on the CPU"
    assert message in caplog.text and result.inference.notes[0] == message
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labelmap), expected)


def _cpu_inference(module):
    import torch

    real = module.sliding_window_probabilities

    def on_cpu(*args, **kwargs):
        kwargs["device"] = torch.device("cpu")
        return real(*args, **kwargs)

    return on_cpu


def file_metadata(path) -> dict[str, str]:
    """The metadata ITK reads from a file's header."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_a_preview_written_to_a_file_says_so_and_a_full_run_does_not(tmp_path, blob_image, suffix):
    source = io.write_image(blob_image, tmp_path / "scan.nii.gz")  # a NIfTI input: its qform goes to NIfTI outputs
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    preview = segmenter.segment_files(
        [source], tmp_path / f"preview{suffix}", probabilities=tmp_path / f"preview-maps{suffix}", preview=True
    )
    segmenter.segment_files([source], tmp_path / f"full{suffix}", probabilities=tmp_path / f"full-maps{suffix}")
    # NIfTI has no free keys: the note goes in its 80-character descrip field
    key, value = ("descrip", io.PREVIEW_NOTE) if suffix.startswith(".nii") else (io.PREVIEW_KEY, "1")
    for name in ("preview", "preview-maps"):
        assert file_metadata(tmp_path / f"{name}{suffix}").get(key) == value, name
    for name in ("full", "full-maps"):
        assert not file_metadata(tmp_path / f"{name}{suffix}").get(key), name
    assert not preview.labelmap.HasMetaDataKey(io.PREVIEW_KEY), "the result in memory is left as it was"
    written = io.read_image(tmp_path / f"preview{suffix}")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(preview.labelmap))
    assert written.GetOrigin() == pytest.approx(blob_image.GetOrigin(), abs=1e-4)


@pytest.mark.slicer
def test_a_preview_written_as_seg_nrrd_names_its_segments_so(tmp_path, blob_image):
    pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
    from MedSegLib.segmentationio import readSegNrrd

    source = io.write_image(blob_image, tmp_path / "scan.nrrd")
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    segmenter.segment_files([source], tmp_path / "preview.seg.nrrd", preview=True)
    segmenter.segment_files([source], tmp_path / "full.seg.nrrd")
    preview, _ = readSegNrrd(tmp_path / "preview.seg.nrrd")
    full, _ = readSegNrrd(tmp_path / "full.seg.nrrd")
    assert [s.name for s in preview] == ["Bright (preview)", "Other (preview)"]
    assert [s.name for s in full] == ["Bright", "Other"]


def _two_channel_segmenter(tmp_path) -> Segmenter:
    from medseg.models.card import Channel

    model = threshold_model(tmp_path)
    model.card = dataclasses.replace(model.card, channels=(Channel("FLAIR", "MR"), Channel("T1c", "MR")))
    return Segmenter(model, device="cpu")


def test_channels_given_as_images_on_different_grids_are_refused(tmp_path, blob_image):
    """segment_files checks the files' grids when it reads them; images given to segment() are checked too."""
    segmenter = _two_channel_segmenter(tmp_path)
    moved = sitk.Image(blob_image)
    moved.SetOrigin((14.0, -30.0, 7.5))  # the same voxels 2 mm along x: the labels would land off the FLAIR's
    with pytest.raises(InputImageError, match=r"channel T1c: its voxel grid differs from channel FLAIR's: origin"):
        segmenter.segment([blob_image, moved])
    smaller = sitk.RegionOfInterest(blob_image, (20, 24, 15), (0, 0, 0))
    with pytest.raises(InputImageError, match=r"channel T1c: its voxel grid differs .*: size \(20, 24, 15\) instead"):
        segmenter.segment([blob_image, smaller])
    same = sitk.Image(blob_image) * 0.5 + 1
    assert segmenter.segment([blob_image, same]).labelmap.GetSize() == blob_image.GetSize()


def test_a_roi_outside_the_volume_is_refused_by_segment(tmp_path, blob_image):
    segmenter = Segmenter(threshold_model(tmp_path), device="cpu")
    with pytest.raises(
        InputImageError,
        match=r"input image: the region of interest \(voxels \(30, 0, 0\) to \(34, 4, 4\)\) lies outside the "
        r"20x24x16 volume",
    ):
        segmenter.segment(blob_image, roi=IndexBox(start=(30, 0, 0), size=(5, 5, 5)))
    with pytest.raises(InputImageError, match="lies outside"):
        segmenter.segment(blob_image, roi=IndexBox(start=(0, -8, 0), size=(20, 8, 16)))
