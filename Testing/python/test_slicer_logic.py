"""MedSegLogic on slicer-core: real MRML scenes and nodes, the real engine in a separate process.

Volumes are loaded with Slicer's own reader (not MedSeg's conversion code), and positions of labelled voxels are
computed from Slicer's IJK-to-RAS matrices on one side and from ITK's geometry on the other, so a mistake in
MedSeg's RAS/LPS handling cannot cancel itself out.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import (
    DIRECTIONS,
    physical_points_of_label,
    process_gone,
    shell_launcher,
    with_direction,
    write_model_folder,
)
from medseg.errors import CancelledError, MedSegError, ModelNotFoundError
from medseg.models.card import read_card
from medseg.preprocessing import IndexBox
from medseg.segmenter import Segmenter

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
pytestmark = [pytest.mark.slicer, pytest.mark.slow]

import vtk  # noqa: E402
from MedSegLib.logic import MedSegLogic, overallProgress, roiVoxelBox  # noqa: E402
from MedSegLib.nodes import arrayFromVtkMatrix, imageFromVolumeNode, vtkMatrixFromArray  # noqa: E402
from MedSegLib.segmentationio import exportSegmentsToArray, replaceSegmentsFromLabelmap  # noqa: E402
from MedSegLib.selftest import EXPECTED_VOLUMES_ML, loadVolume, runSampleCheck, sampleFile  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

ANISOTROPIC_SPACING = (0.9, 1.2, 1.4)


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter(None, device="cpu")


def sample_with(direction, spacing=ANISOTROPIC_SPACING) -> sitk.Image:
    image = with_direction(sitk.ReadImage(str(sampleFile())), direction)
    image.SetSpacing(spacing)
    return image


def load(scene, image: sitk.Image, folder: Path, name: str = "T1"):
    path = folder / f"{name}.nrrd"
    sitk.WriteImage(image, str(path))
    return loadVolume(scene, path, name)


def labelled_points_lps(segmentation_node, reference_volume, value: int) -> np.ndarray:
    """LPS positions (mm) of the voxels of the ``value``-th segment, exported by Slicer on the volume's grid."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentation.GetNthSegmentID(value - 1))
    slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    dims = labelmap.GetImageData().GetDimensions()
    voxels = numpy_support.vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1])
    ijk = np.argwhere(voxels > 0)[:, ::-1]
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(matrix)
    ras = (arrayFromVtkMatrix(matrix) @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    scene.RemoveNode(labelmap)
    lps = ras * [-1.0, -1.0, 1.0]
    return lps[np.lexsort(lps.T[::-1])]


def segmented_sample(tmp_path, direction: str = "LPS"):
    """A scene with the sample (in ``direction``) loaded and segmented by the bundled model on the CPU."""
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS[direction]), tmp_path)
    logic = MedSegLogic(scene)
    return scene, volume, logic, logic.segment(volume, device="cpu")


def scene_state(scene) -> list[tuple[str, str, int]]:
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return sorted((n.GetID(), n.GetClassName(), n.GetMTime()) for n in nodes)


def segments_of(node) -> list[tuple[str, str, tuple]]:
    segmentation = node.GetSegmentation()
    return [
        (
            segmentation.GetNthSegmentID(i),
            segmentation.GetNthSegment(i).GetName(),
            segmentation.GetNthSegment(i).GetColor(),
        )
        for i in range(segmentation.GetNumberOfSegments())
    ]


@pytest.mark.parametrize("direction", ["RAS", "LPS", "oblique"])
def test_every_labelled_voxel_lies_where_the_engine_put_it(tmp_path, segmenter, direction):
    image = sample_with(DIRECTIONS[direction])
    expected = segmenter.segment(image).labelmap
    scene = slicer.vtkMRMLScene()
    volume = load(scene, image, tmp_path)
    node = MedSegLogic(scene).segment(volume, device="cpu")
    for value in (1, 2):
        engine_points = physical_points_of_label(expected, value)
        assert len(engine_points) > 100  # a real structure, not a stray voxel
        np.testing.assert_allclose(labelled_points_lps(node, volume, value), engine_points, atol=1e-3)


def rotated_roi(scene, center_ras, size, degrees: float):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi.SetSize(*size)
    angle = np.deg2rad(degrees)
    object_to_node = np.eye(4)
    object_to_node[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    object_to_node[:3, 3] = center_ras
    roi.SetAndObserveObjectToNodeMatrix(vtkMatrixFromArray(object_to_node))
    return roi


def expected_roi_box(image: sitk.Image, corners_ras: np.ndarray) -> IndexBox:
    """The voxel box of the ROI's corners, computed with ITK from LPS points (independently of MedSegLib)."""
    indices = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(c * [-1, -1, 1])) for c in corners_ras])
    low = np.maximum(np.floor(indices.min(0) + 0.5), 0).astype(int)
    high = np.minimum(np.ceil(indices.max(0) - 0.5), np.array(image.GetSize()) - 1).astype(int)
    return IndexBox(tuple(int(v) for v in low), tuple(int(v) for v in high - low + 1))


def corner_voxels_lps_of_node_box(volume, box) -> list:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    corners = np.array([[(box.first, box.last)[(i >> a) & 1][a] for a in range(3)] for i in range(8)], float)
    ras = (arrayFromVtkMatrix(matrix) @ np.c_[corners, np.ones(8)].T).T[:, :3]
    return sorted(map(tuple, np.round(ras * [-1, -1, 1], 4)))


def corner_voxels_lps_of_image_box(image, box: IndexBox) -> list:
    last = np.array(box.start) + box.size - 1
    corners = [[(box.start, last)[(i >> a) & 1][a] for a in range(3)] for i in range(8)]
    return sorted(tuple(np.round(image.TransformIndexToPhysicalPoint([int(v) for v in c]), 4)) for c in corners)


def test_roi_restricts_the_work_and_maps_back_exactly(tmp_path, segmenter):
    image = sample_with(DIRECTIONS["oblique"])
    scene = slicer.vtkMRMLScene()
    volume = load(scene, image, tmp_path)
    full = segmenter.segment(image).labelmap
    centre_lps = np.array(
        full.TransformIndexToPhysicalPoint(
            [int(round(c)) for c in np.argwhere(sitk.GetArrayViewFromImage(full) > 0).mean(0)[::-1]]
        )
    )
    shift = np.array([4.0, -3.0, 2.0])  # the ROI sits under a translation: the box must follow it
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, 3] = shift
    transform.SetMatrixTransformToParent(vtkMatrixFromArray(matrix))
    roi = rotated_roi(scene, centre_lps * [-1, -1, 1] - shift, (24.0, 34.0, 26.0), degrees=25)
    roi.SetAndObserveTransformNodeID(transform.GetID())

    half = np.array([12.0, 17.0, 13.0])
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    object_to_world = arrayFromVtkMatrix(roi.GetObjectToNodeMatrix())
    corners = (object_to_world @ np.c_[signs * half, np.ones(8)].T).T[:, :3] + shift
    box = expected_roi_box(image, corners)
    # Slicer's reader may reorder the slices of a left-handed grid, so compare the boxes' corner voxels in mm.
    np.testing.assert_allclose(
        corner_voxels_lps_of_node_box(volume, roiVoxelBox(volume, roi)),
        corner_voxels_lps_of_image_box(image, box),
        atol=1e-3,
    )

    node = MedSegLogic(scene).segment(volume, roi=roi, device="cpu")
    expected = segmenter.segment(image, roi=box).labelmap
    inside = np.zeros(sitk.GetArrayViewFromImage(expected).shape, bool)
    (x0, y0, z0), (sx, sy, sz) = box.start, box.size
    inside[z0 : z0 + sz, y0 : y0 + sy, x0 : x0 + sx] = True
    labels = sitk.GetArrayViewFromImage(expected)
    assert labels[inside].any() and not labels[~inside].any()
    assert (labels > 0).sum() < (sitk.GetArrayViewFromImage(full) > 0).sum()
    for value in (1, 2):
        assert len(physical_points_of_label(expected, value)) > 100
        np.testing.assert_allclose(
            labelled_points_lps(node, volume, value), physical_points_of_label(expected, value), atol=1e-3
        )


def test_roi_outside_the_volume_is_refused_before_any_work(tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["LPS"]), tmp_path)
    roi = rotated_roi(scene, (900.0, 900.0, 900.0), (10.0, 10.0, 10.0), degrees=0)
    before = scene_state(scene)
    with pytest.raises(MedSegError, match='"ROI" does not overlap volume "T1"'):
        MedSegLogic(scene).segment(volume, roi=roi, device="cpu")
    assert scene_state(scene) == before


def test_segments_carry_the_cards_names_colours_values_and_terminology(tmp_path, bundled_model_dir):
    card = read_card(bundled_model_dir)
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["RAS"]), tmp_path)
    node = MedSegLogic(scene).segment(volume, model="hippocampus-mri", device="cpu")
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(card.labels)
    for index, label in enumerate(card.labels):
        segment = segmentation.GetNthSegment(index)
        assert segmentation.GetNthSegmentID(index) == f"label_{label.value}"
        assert segment.GetName() == label.name
        np.testing.assert_allclose(segment.GetColor(), label.color_float, atol=1e-6)
        assert segment.GetLabelValue() == label.value
        tag = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        assert label.terminology.type.value in str(tag) and label.terminology.type.scheme in str(tag)
    assert node.GetNodeReference("referenceImageGeometryRef").GetID() == volume.GetID()
    display = node.GetDisplayNode()
    assert display.GetVisibility2D() and display.GetVisibility3D()
    assert segmentation.ContainsRepresentation(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())


def test_rerun_updates_the_segmentation_in_place(tmp_path):
    scene, volume, logic, node = segmented_sample(tmp_path)
    first = [labelled_points_lps(node, volume, value) for value in (1, 2)]
    node.GetSegmentation().AddEmptySegment("notes", "My notes")  # the user's own segment must survive
    again = logic.segment(volume, device="cpu", outputSegmentation=node)
    assert again is node
    assert [s[0] for s in segments_of(node)] == ["label_1", "label_2", "notes"]
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    for value, points in zip((1, 2), first):
        np.testing.assert_array_equal(labelled_points_lps(node, volume, value), points)


def test_a_preview_says_so_and_a_full_run_into_it_takes_the_plain_names(tmp_path, segmenter):
    scene = slicer.vtkMRMLScene()
    image = sample_with(DIRECTIONS["LPS"])
    volume = load(scene, image, tmp_path)
    logic = MedSegLogic(scene)
    node = logic.segment(volume, device="cpu", preview=True)
    assert "preview" in node.GetName()
    assert [s[1] for s in segments_of(node)] == ["Anterior hippocampus (preview)", "Posterior hippocampus (preview)"]
    expected = segmenter.segment(image, preview=True).labelmap
    for value in (1, 2):
        # nearest-neighbour labels: on this grid (0.9 mm onto 1 mm) whole slices sit at half-voxel ties, which
        # Slicer's reordered copy of the volume breaks the other way; the structure itself must be the same
        ours = {tuple(p) for p in np.round(labelled_points_lps(node, volume, value), 2)}
        engine = {tuple(p) for p in np.round(physical_points_of_label(expected, value), 2)}
        assert len(ours & engine) / len(ours | engine) > 0.8
        assert len(ours) == pytest.approx(len(engine), rel=0.05)
    logic.segment(volume, device="cpu", outputSegmentation=node, precision="fp32", testTimeAugmentation=True)
    assert [s[1] for s in segments_of(node)] == ["Anterior hippocampus", "Posterior hippocampus"]


def test_mirroring_a_model_whose_card_lists_no_axes_is_refused_before_the_engine_starts(tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["LPS"]), tmp_path)
    folder = write_model_folder(tmp_path / "no-axes")
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(MedSegError, match=r"model tiny-test .*no-axes\): test-time mirroring needs the axes"):
        MedSegLogic(scene).startSegmentation(volume, model=folder, device="cpu", testTimeAugmentation=True)
    assert scene.GetNumberOfNodes() == nodes


def test_result_sits_beside_its_volume_and_under_its_transform(tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["LPS"]), tmp_path)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "Study 1")
    if hierarchy.GetItemByDataNode(volume):
        hierarchy.SetItemParent(hierarchy.GetItemByDataNode(volume), study)
    else:
        hierarchy.CreateItem(study, volume)
    node = MedSegLogic(scene).segment(volume, device="cpu")
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    assert node.GetTransformNodeID() == transform.GetID()


def test_bundled_sample_self_test_passes():
    scene = slicer.vtkMRMLScene()
    from MedSegLib.logic import MedSegLogic as Logic

    volumes = runSampleCheck(scene, Logic(scene), device="cpu")
    assert volumes == pytest.approx(EXPECTED_VOLUMES_ML, abs=0.03)


def nan_volume(scene, folder: Path):
    image = sitk.Cast(sitk.ReadImage(str(sampleFile())), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    return load(scene, broken, folder, name="Broken scan")


def test_engine_failure_leaves_the_scene_and_the_output_as_they_were(tmp_path):
    scene = slicer.vtkMRMLScene()
    good = load(scene, sample_with(DIRECTIONS["LPS"]), tmp_path)
    logic = MedSegLogic(scene)
    output = logic.segment(good, device="cpu")
    broken = nan_volume(scene, tmp_path)
    before, segments = scene_state(scene), segments_of(output)
    temporary = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("medseg-*"))
    with pytest.raises(MedSegError) as failure:
        logic.segment(broken, device="cpu", outputSegmentation=output)
    message = str(failure.value)
    assert 'volume "Broken scan"' in message and "NaN" in message and "channel0" not in message
    assert scene_state(scene) == before and segments_of(output) == segments
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("medseg-*")) == temporary


@pytest.mark.skipif(os.name != "posix", reason="the stand-in engine is a shell script")
def test_an_engine_that_exits_cleanly_without_a_result_is_a_clear_error(tmp_path):
    """Exit status 0 without the labelmap (an engine replaced or cut short): a MedSegError, not ITK's read error."""
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["LPS"]), tmp_path)
    before = scene_state(scene)
    launcher = shell_launcher(tmp_path / "silent-python", "exit 0")
    with pytest.raises(MedSegError, match="the engine ended without writing its result"):
        MedSegLogic(scene, pythonExecutable=launcher).segment(volume, device="cpu")
    assert scene_state(scene) == before


@pytest.mark.parametrize(
    "model, volumes, error, message",
    [
        ("no-such-model", 1, ModelNotFoundError, "no-such-model"),
        (None, 2, MedSegError, "needs 1 input volume"),
    ],
)
def test_bad_requests_are_refused_before_any_work(tmp_path, model, volumes, error, message):
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["LPS"]), tmp_path)
    before = scene_state(scene)
    with pytest.raises(error, match=message):
        MedSegLogic(scene).segment([volume] * volumes, model=model, device="cpu")
    assert scene_state(scene) == before
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        MedSegLogic(scene).segment(volume, device="cpu", precision="fp8")
    assert scene_state(scene) == before


def test_a_colour_volume_is_refused_with_a_clear_error(tmp_path):
    scene = slicer.vtkMRMLScene()
    grey = sitk.GetArrayFromImage(sitk.Cast(sample_with(DIRECTIONS["LPS"]), sitk.sitkUInt8))
    rgb = vtk.vtkImageData()  # a screenshot-like colour volume, as Slicer loads a PNG stack
    rgb.SetDimensions(grey.shape[::-1])
    rgb.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.repeat(grey.reshape(-1, 1), 3, axis=1), deep=True))
    volume = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "Photo")
    volume.SetAndObserveImageData(rgb)
    before = scene_state(scene)
    with pytest.raises(MedSegError, match='volume "Photo" has 3 components per voxel'):
        MedSegLogic(scene).segment(volume, device="cpu")
    assert scene_state(scene) == before


@pytest.mark.skipif(os.name != "posix", reason="the process-tree check reads /proc")
def test_cancel_kills_the_whole_process_tree_and_leaves_the_scene_as_it_was(tmp_path):
    child_pid_file = tmp_path / "child.pid"
    import sys

    # The engine's interpreter, started through a launcher that leaves a grandchild behind, as a GPU driver
    # helper or a data-loader worker would: cancel must end that one too.
    script = f'sleep 300 &\necho $! > "{child_pid_file}"\nexec "{sys.executable}" "$@"'
    launcher = shell_launcher(tmp_path / "python-with-a-child", script)
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["LPS"]), tmp_path)
    before = scene_state(scene)
    job = MedSegLogic(scene, pythonExecutable=launcher).startSegmentation(volume, device="cpu")
    deadline = time.time() + 30
    while not child_pid_file.exists() or not child_pid_file.read_text().strip():
        assert time.time() < deadline
        time.sleep(0.05)
    grandchild = int(child_pid_file.read_text())
    engine = job.process.pid
    job.cancel()
    time.sleep(0.2)
    assert process_gone(engine) and process_gone(grandchild)
    assert not job.workDir.exists()
    with pytest.raises(CancelledError):
        job.finish()
    assert scene_state(scene) == before


def test_cancel_from_another_thread_stops_a_synchronous_run(tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["LPS"]), tmp_path)
    before = scene_state(scene)
    cancel = threading.Event()
    stages = []
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(CancelledError):
        MedSegLogic(scene).segment(volume, device="cpu", progress=lambda s, f: stages.append(s), cancelEvent=cancel)
    assert scene_state(scene) == before


def test_progress_reaches_every_stage_and_the_overall_fraction_only_grows(tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["LPS"]), tmp_path)
    reports = []
    MedSegLogic(scene).segment(volume, device="cpu", progress=lambda s, f: reports.append((s, f)))
    assert {s for s, _ in reports} >= {"loading model", "preprocessing", "inference", "postprocessing", "writing"}
    overall = [overallProgress(s, f) for s, f in reports]
    assert overall == sorted(overall) and overall[-1] == pytest.approx(1.0)


# Refine ----------------------------------------------------------------------------------------------------------


def labelmap_of(node, volume, count=2) -> np.ndarray:
    ids = [node.GetSegmentation().GetNthSegmentID(i) for i in range(count)]
    return exportSegmentsToArray(node, ids, volume)


def paint(node, volume, name: str, mask: np.ndarray) -> None:
    """Put a (z, y, x) mask on the volume's grid into segment ``name``, as the Segment Editor would paint it."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(imageFromVolumeNode(volume))
    if node.GetSegmentation().GetSegment(name) is None:
        node.GetSegmentation().AddEmptySegment(name, name)
    replaceSegmentsFromLabelmap(node.GetScene(), node, image, [name])


def test_refine_uses_the_kept_probabilities_and_replaces_segments_in_place(tmp_path, segmenter):
    from medseg.graphcut import refine_labelmap

    image = sample_with(DIRECTIONS["oblique"])
    scene = slicer.vtkMRMLScene()
    volume = load(scene, image, tmp_path)
    logic = MedSegLogic(scene)
    node = logic.segment(volume, device="cpu")
    kept = logic.keptProbabilities(node)
    assert kept is not None and kept.array.shape[0] == 3
    before = labelmap_of(node, volume)
    segments = segments_of(node)
    refined_ids = logic.refine(node, volume)
    assert refined_ids == ["label_1", "label_2"] and segments_of(node) == segments  # same segments, same look
    after = labelmap_of(node, volume)
    node_image = sitk.GetArrayFromImage(imageFromVolumeNode(volume))
    expected = refine_labelmap(node_image, kept.array.astype(np.float32), spacing=image.GetSpacing(), labels=[1, 2])
    np.testing.assert_array_equal(after, expected)
    assert (after != before).any() and (after > 0).sum() > 0.9 * (before > 0).sum()


def test_refine_honours_stroke_segments_and_reuses_the_cut(tmp_path):
    scene, volume, logic, node = segmented_sample(tmp_path)
    before = labelmap_of(node, volume)
    # strokes as segments, as the Segment Editor paints them: anterior where there was nothing, and an eraser
    inside = np.argwhere(before == 1)
    far = np.argwhere(before == 0)[0]
    stroke_fg = np.zeros(before.shape, np.uint8)
    stroke_fg[tuple(far)] = 1
    stroke_bg = np.zeros(before.shape, np.uint8)
    stroke_bg[tuple(inside[len(inside) // 2])] = 1
    paint(node, volume, "fg stroke", stroke_fg)
    paint(node, volume, "bg stroke", stroke_bg)
    logic.refine(
        node,
        volume,
        targetSegmentId="label_1",
        foregroundStrokeSegmentId="fg stroke",
        backgroundStrokeSegmentId="bg stroke",
    )
    after = labelmap_of(node, volume)
    assert after[tuple(far)] == 1 and after[tuple(inside[len(inside) // 2])] == 0
    state = logic._refinements[node.GetID()]
    sessions_built = [s.rebuilds for s in state.refinement.sessions.values()]
    logic.refine(
        node,
        volume,
        targetSegmentId="label_1",
        foregroundStrokeSegmentId="fg stroke",
        backgroundStrokeSegmentId="bg stroke",
    )  # the same strokes again: the kept cut answers, nothing is rebuilt
    assert logic._refinements[node.GetID()] is state
    assert [s.rebuilds for s in state.refinement.sessions.values()] == sessions_built
    # paint one more voxel into the foreground stroke: the kept cut goes on from where it was
    more = np.argwhere((after == 0) & (before == 0))[-1]
    stroke_fg[tuple(more)] = 1
    paint(node, volume, "fg stroke", stroke_fg)
    import gc

    gc.collect()  # the volume's image from the first call is long gone: the kept cut must not depend on it
    logic.refine(
        node,
        volume,
        targetSegmentId="label_1",
        foregroundStrokeSegmentId="fg stroke",
        backgroundStrokeSegmentId="bg stroke",
    )
    assert logic._refinements[node.GetID()] is state
    again = labelmap_of(node, volume)
    assert again[tuple(more)] == 1 and again[tuple(far)] == 1
    changed = (again != after).sum()
    assert 1 <= changed < 0.01 * (after > 0).sum()  # the new stroke, and little else


def test_refine_without_kept_probabilities_uses_the_segmentation_itself(tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["RAS"]), tmp_path)
    node = MedSegLogic(scene).segment(volume, device="cpu")
    fresh = MedSegLogic(scene)  # another logic, e.g. after reloading the scene: no probabilities kept
    before = labelmap_of(node, volume)
    fresh.refine(node, volume)
    after = labelmap_of(node, volume)
    for value in (1, 2):
        overlap = 2 * ((before == value) & (after == value)).sum() / ((before == value).sum() + (after == value).sum())
        assert overlap > 0.9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"foregroundStrokeSegmentId": "empty"}, 'stroke segment "empty" is empty'),
        ({"foregroundStrokeSegmentId": "nope"}, 'no stroke segment "nope"'),
        ({"foregroundStrokeSegmentId": "empty", "targetSegmentId": None}, "choose which segment"),
    ],
)
def test_refine_errors_leave_the_scene_unchanged(tmp_path, kwargs, message):
    scene, volume, logic, node = segmented_sample(tmp_path)
    node.GetSegmentation().AddEmptySegment("empty", "empty")
    kwargs = {"targetSegmentId": "label_1", **kwargs}
    before, labels = scene_state(scene), labelmap_of(node, volume)
    with pytest.raises(MedSegError, match=message):
        logic.refine(node, volume, **kwargs)
    assert scene_state(scene) == before
    np.testing.assert_array_equal(labelmap_of(node, volume), labels)


def test_cuda_devices_are_listed_by_the_engines_python_without_a_gpu_here():
    import torch
    from medseg.inference import select_device  # noqa: F401  (the engine itself is importable here)

    devices = MedSegLogic(slicer.vtkMRMLScene()).cudaDevices()
    assert devices == [(f"cuda:{i}", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
    broken = MedSegLogic(slicer.vtkMRMLScene(), pythonExecutable="/nonexistent/python").cudaDevices()
    assert broken == []


def test_the_same_volume_twice_is_refused_for_a_two_channel_model(tmp_path):
    from helpers import write_model_folder

    folder = write_model_folder(
        tmp_path / "two", channels=[{"name": "FLAIR", "modality": "MR"}, {"name": "T1c", "modality": "MR"}]
    )
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["LPS"]), tmp_path)
    before = scene_state(scene)
    with pytest.raises(MedSegError, match="a different volume for each channel"):
        MedSegLogic(scene).segment([volume, volume], model=str(folder), device="cpu")
    assert scene_state(scene) == before


def test_the_same_stroke_given_to_another_segment_is_not_mixed_up_with_the_earlier_cut(tmp_path):
    scene, volume, logic, node = segmented_sample(tmp_path)
    before = labelmap_of(node, volume)
    inside = np.argwhere(before == 1)
    voxel = tuple(inside[len(inside) // 2])
    mask = np.zeros(before.shape, np.uint8)
    mask[voxel] = 1
    paint(node, volume, "stroke", mask)
    logic.refine(node, volume, targetSegmentId="label_1", foregroundStrokeSegmentId="stroke")
    assert labelmap_of(node, volume)[voxel] == 1
    logic.refine(node, volume, targetSegmentId="label_2", foregroundStrokeSegmentId="stroke")
    assert labelmap_of(node, volume)[voxel] == 2


def test_the_logic_knows_the_engines_precisions():
    from medseg.inference import PRECISIONS
    from MedSegLib import logic

    assert logic.PRECISIONS == PRECISIONS


# Transforms, edits and the logic's memory -----------------------------------------------------------------------


def translated(scene, volume, offset=(10.0, -7.0, 25.0)):
    """Put ``volume`` under a linear transform that moves it by ``offset`` mm (RAS), not hardened."""
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    transform.SetMatrixTransformToParent(vtkMatrixFromArray(matrix))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    return transform


def test_a_rerun_and_a_refine_under_a_transform_stay_on_the_volumes_grid(tmp_path, segmenter):
    from medseg.graphcut import refine_labelmap

    image = sample_with(DIRECTIONS["LPS"])
    scene = slicer.vtkMRMLScene()
    volume = load(scene, image, tmp_path)
    translated(scene, volume)
    logic = MedSegLogic(scene)
    node = logic.segment(volume, device="cpu")
    expected = sitk.GetArrayFromImage(segmenter.segment(image).labelmap)
    first = labelmap_of(node, volume)
    assert (first > 0).sum() > 100
    np.testing.assert_array_equal(first, expected)  # the engine's labels, voxel for voxel, under the transform
    logic.segment(volume, device="cpu", outputSegmentation=node)  # again, into the same node
    np.testing.assert_array_equal(labelmap_of(node, volume), expected)  # not moved by the transform once more
    kept = logic.keptProbabilities(node).array.astype(np.float32)
    logic.refine(node, volume)
    refined = refine_labelmap(
        sitk.GetArrayFromImage(imageFromVolumeNode(volume)), kept, spacing=image.GetSpacing(), labels=[1, 2]
    )
    np.testing.assert_array_equal(labelmap_of(node, volume), refined)


def test_channels_under_different_transforms_are_refused(tmp_path):
    folder = write_model_folder(
        tmp_path / "two", channels=[{"name": "FLAIR", "modality": "MR"}, {"name": "T1c", "modality": "MR"}]
    )
    card = read_card(folder)
    scene = slicer.vtkMRMLScene()
    image = sample_with(DIRECTIONS["oblique"])
    flair, t1c = load(scene, image, tmp_path, "FLAIR"), load(scene, image, tmp_path, "T1c")
    shared = translated(scene, flair)
    t1c.SetAndObserveTransformNodeID(shared.GetID())
    MedSegLogic._checkInputs([flair, t1c], card)  # the same transform: aligned
    other = translated(scene, t1c)  # another transform node with the same matrix: aligned too
    MedSegLogic._checkInputs([flair, t1c], card)
    moved = np.eye(4)
    moved[:3, 3] = (10.0, -5.0, 25.0)  # FLAIR registered to T1c, not hardened: 2 mm apart in the views
    other.SetMatrixTransformToParent(vtkMatrixFromArray(moved))
    before = scene_state(scene)
    with pytest.raises(MedSegError, match='volume "T1c" is under another transform than "FLAIR".*harden'):
        MedSegLogic(scene).startSegmentation([flair, t1c], model=str(folder), device="cpu")
    assert scene_state(scene) == before


def test_a_segmentation_edited_after_the_run_is_refined_from_the_edit(tmp_path):
    scene, volume, logic, node = segmented_sample(tmp_path)
    before = labelmap_of(node, volume)
    erased = before == 1
    erased[: erased.shape[0] // 2] = False  # the user erases the anterior segment's far half in the Segment Editor
    assert erased.sum() > 50
    edited = np.where(erased, 0, before).astype(np.uint8)
    image = sitk.GetImageFromArray(edited)
    image.CopyInformation(imageFromVolumeNode(volume))
    replaceSegmentsFromLabelmap(scene, node, image, ["label_1", "label_2"])
    logic.refine(node, volume)  # no strokes: smooth what is there, not the network's answer from before the edit
    after = labelmap_of(node, volume)
    assert (after[erased] == 1).sum() < 0.1 * erased.sum()
    overlap = 2 * ((after == 1) & (edited == 1)).sum() / ((after == 1).sum() + (edited == 1).sum())
    assert overlap > 0.8  # the edited segment, smoothed


def test_the_logic_forgets_what_it_kept_for_removed_nodes_and_a_closed_scene(tmp_path):
    scene, volume, logic, node = segmented_sample(tmp_path)
    logic.refine(node, volume)
    nodeId = node.GetID()
    assert nodeId in logic._probabilities and nodeId in logic._refinements and nodeId in logic._outputs
    other = logic.segment(volume, device="cpu")
    scene.RemoveNode(node)
    assert nodeId not in logic._probabilities and nodeId not in logic._refinements and nodeId not in logic._outputs
    assert other.GetID() in logic._probabilities
    scene.Clear(0)  # File > Close scene: node ids start again for the next patient
    assert not logic._probabilities and not logic._refinements and not logic._outputs
    import gc
    import weakref

    alive = weakref.ref(logic)
    del logic
    gc.collect()
    assert alive() is None  # the scene's observers do not keep the logic alive


def test_a_failing_progress_callback_stops_the_engine_and_removes_its_files(tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["LPS"]), tmp_path)
    before = scene_state(scene)
    logic = MedSegLogic(scene)
    jobs = []
    start = logic.startSegmentation
    logic.startSegmentation = lambda *a, **k: jobs.append(start(*a, **k)) or jobs[-1]

    def progress(stage, fraction):
        raise KeyboardInterrupt  # Ctrl-C in a headless script lands in whatever runs, often the callback

    with pytest.raises(KeyboardInterrupt):
        logic.segment(volume, device="cpu", progress=progress)
    (job,) = jobs
    job.process.wait()
    assert job.process.killed and not job.workDir.exists()
    assert scene_state(scene) == before


def test_unreadable_probabilities_leave_the_scene_unchanged(tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = load(scene, sample_with(DIRECTIONS["LPS"]), tmp_path)
    before = scene_state(scene)
    job = MedSegLogic(scene).startSegmentation(volume, device="cpu")
    assert job.process.wait() == 0 and job.probabilitiesPath.exists()
    data = job.probabilitiesPath.read_bytes()
    job.probabilitiesPath.write_bytes(data[: len(data) // 2])  # cut short, as by a full disk
    with pytest.raises(RuntimeError):
        job.finish()
    assert scene_state(scene) == before


def test_a_scene_collected_with_its_logic_in_a_garbage_cycle_does_not_crash_the_interpreter():
    """A traceback holding a scene and its logic makes both garbage in one cycle; the garbage collector may clear
    the logic's scene observers before the scene's destructor fires them. Observers that were closures then crashed
    the interpreter (a segmentation fault in the suite, depending on collection timing); in a child process, so
    that a crash fails this test and not the run."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import gc
        import slicer
        from MedSegLib.logic import MedSegLogic

        for _ in range(20):
            scene = slicer.vtkMRMLScene()
            logic = MedSegLogic(scene)
            scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
            try:
                raise ValueError("held in a traceback with the scene and the logic")
            except ValueError as error:
                cycle = [error, scene, logic]
                cycle.append(cycle)
            del scene, logic, cycle
            gc.collect()
        print("collected")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "collected"
