"""Slicer side on slicer-core: volume-node geometry, segmentation nodes and .seg.nrrd read back."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import DIRECTIONS, card_dict, physical_points_of_label
from medseg.models.card import card_from_dict

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
pytestmark = pytest.mark.slicer

from MedSegLib.nodes import ijkToRasArrayFromImage, imageFromVolumeNode, setVolumeNodeFromImage  # noqa: E402
from MedSegLib.segmentationio import readSegNrrd, updateSegmentationFromLabelmap, writeSegNrrd  # noqa: E402


def labelmap_with(direction) -> sitk.Image:
    array = np.zeros((9, 13, 17), np.uint8)
    array[1:4, 2:9, 3:6] = 1
    array[5:8, 9:12, 10:16] = 2
    array[0, 0, 0] = 2  # a corner: catches axis flips
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.6, 0.6, 5.0))
    image.SetOrigin((-120.5, 33.0, -20.25))
    image.SetDirection(direction)
    return image


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_volume_node_round_trip_keeps_geometry(direction):
    image = labelmap_with(direction)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    setVolumeNodeFromImage(node, image)
    # Slicer's own view of a voxel's position (RAS) must be ITK's (LPS) with x and y negated.
    ras = np.array(ijkToRasArrayFromImage(image)) @ np.array([3, 5, 7, 1.0])
    lps = image.TransformIndexToPhysicalPoint((3, 5, 7))
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-9)
    back = imageFromVolumeNode(node)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_seg_nrrd_round_trip(tmp_path, direction):
    card = card_from_dict(card_dict())
    labelmap = labelmap_with(direction)
    path = writeSegNrrd(labelmap, card, tmp_path / "result.seg.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.seg.nrrd"]
    segments, back = readSegNrrd(path)
    assert [(s.name, s.labelValue) for s in segments] == [("Bright", 1), ("Other", 2)]
    np.testing.assert_allclose(segments[0].color, (1.0, 0.0, 0.0), atol=1 / 255)
    np.testing.assert_allclose(segments[1].color, (0.0, 128 / 255, 1.0), atol=1 / 255)
    assert "SCT^5366008^Hippocampus" in segments[0].terminology
    assert "SCT^91723000^Anatomical Structure" in segments[0].terminology
    assert "Hippocampus" not in segments[1].terminology  # Slicer gives unlabelled segments its default
    for value in (1, 2):
        np.testing.assert_allclose(
            physical_points_of_label(back, value), physical_points_of_label(labelmap, value), atol=1e-4
        )
    # Read onto the original grid: voxel for voxel identical.
    _, on_grid = readSegNrrd(path, referenceImage=labelmap)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid), sitk.GetArrayFromImage(labelmap))


def test_seg_nrrd_keeps_segments_the_model_did_not_find(tmp_path):
    card = card_from_dict(card_dict())
    labelmap = labelmap_with(DIRECTIONS["LPS"])
    array = sitk.GetArrayFromImage(labelmap)
    array[array == 2] = 0
    only_one = sitk.GetImageFromArray(array)
    only_one.CopyInformation(labelmap)
    segments, back = readSegNrrd(writeSegNrrd(only_one, card, tmp_path / "one.seg.nrrd"), referenceImage=only_one)
    assert [s.name for s in segments] == ["Bright", "Other"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)


def test_updating_an_existing_segmentation_replaces_instead_of_duplicating():
    card = card_from_dict(card_dict())
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    first = labelmap_with(DIRECTIONS["RAS"])
    updateSegmentationFromLabelmap(scene, node, first, card.labels)
    empty = sitk.Image(first.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(first)
    empty[2, 2, 2] = 1
    ids = updateSegmentationFromLabelmap(scene, node, empty, card.labels)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2 and ids == ["label_1", "label_2"]
    mask = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation("label_1", mask)
    assert mask.GetPointData().GetScalars().GetRange() == (0.0, 1.0)
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0, "temporary nodes must not stay"


def test_another_models_run_into_the_node_leaves_only_its_own_segments_and_terminology():
    import vtk

    first_card = card_from_dict(card_dict())  # label 1 has a terminology, label 2 none
    second = card_dict(
        labels=[{"value": 1, "name": "Tumour", "color": [0, 255, 0]}]  # another model: one label, no terminology
    )
    second_card = card_from_dict(second)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labelmap = labelmap_with(DIRECTIONS["RAS"])
    updateSegmentationFromLabelmap(scene, node, labelmap, first_card.labels)
    node.GetSegmentation().AddEmptySegment("notes", "My notes")  # the user's own segment
    only_one = sitk.BinaryThreshold(labelmap, 1, 1, 1, 0)
    ids = updateSegmentationFromLabelmap(scene, node, only_one, second_card.labels)
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert ids == ["label_1"] and sorted(names) == ["My notes", "Tumour"]
    tumour = segmentation.GetSegment("label_1")
    tag = vtk.reference("")
    assert not tumour.GetTag(tumour.GetTerminologyEntryTagName(), tag)  # the first model's hippocampus code is gone
    assert tumour.GetColor() == pytest.approx((0.0, 1.0, 0.0))
