"""The module's self-test on the bundled sample, shared by Slicer's ``MedSegTest`` and the pytest suite.

Loads the bundled T1 sample with Slicer's own volume reader, runs :class:`~MedSegLib.logic.MedSegLogic` with the
bundled model, and checks the segments' names, label values and volumes against what the engine gives for the
same file (``medseg demo``). MRML and VTK only, so it runs inside Slicer and on ``slicer-core``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .segmentationio import exportSegmentsToArray

SAMPLE_FILE = "hippocampus-mni152-t1.nii.gz"
SAMPLE_NODE_NAME = "MedSegHippocampusT1"
#: Volumes (mL) the bundled model gives on the bundled sample (``medseg demo``), and how far a run may stray.
EXPECTED_VOLUMES_ML = {"Anterior hippocampus": 2.105, "Posterior hippocampus": 1.915}
VOLUME_TOLERANCE_ML = 0.03


def sampleFile() -> Path | None:
    from medseg.models.registry import resources_dir

    resources = resources_dir()
    path = None if resources is None else resources / "SampleData" / SAMPLE_FILE
    return path if path is not None and path.is_file() else None


def loadVolume(scene, path: Path, name: str):
    """A scalar volume node read by Slicer's own reader (not by MedSeg's conversion code)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(storage)
        scene.RemoveNode(node)
        raise OSError(f"{path}: Slicer could not read this volume")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def segmentVolumesMl(segmentationNode, referenceVolume) -> dict[str, float]:
    """Volume (mL) of every segment, counted on the reference volume's grid by Slicer's exporter."""
    segmentation = segmentationNode.GetSegmentation()
    voxelMl = float(np.prod(referenceVolume.GetSpacing())) / 1000
    volumes = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        voxels = np.count_nonzero(exportSegmentsToArray(segmentationNode, [segmentId], referenceVolume))
        volumes[segmentation.GetSegment(segmentId).GetName()] = voxels * voxelMl
    return volumes


def runSampleCheck(scene, logic, *, device: str = "auto") -> dict[str, float]:
    """Segment the bundled sample and check the result; returns the segment volumes (mL).

    Raises:
        AssertionError: with what was expected and what came.
        FileNotFoundError: the sample is not installed.
    """
    path = sampleFile()
    if path is None:
        raise FileNotFoundError(f"the bundled sample {SAMPLE_FILE} is not installed")
    volume = loadVolume(scene, path, SAMPLE_NODE_NAME)
    segmentationNode = logic.segment(volume, model=None, device=device)
    segmentation = segmentationNode.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    if names != list(EXPECTED_VOLUMES_ML):
        raise AssertionError(f"segments {names}, expected {list(EXPECTED_VOLUMES_ML)}")
    values = [segmentation.GetNthSegment(i).GetLabelValue() for i in range(segmentation.GetNumberOfSegments())]
    if values != [1, 2]:
        raise AssertionError(f"label values {values}, expected [1, 2]")
    volumes = segmentVolumesMl(segmentationNode, volume)
    for name, expected in EXPECTED_VOLUMES_ML.items():
        if abs(volumes[name] - expected) > VOLUME_TOLERANCE_ML:
            raise AssertionError(f"{name}: {volumes[name]:.3f} mL, expected {expected} ± {VOLUME_TOLERANCE_ML} mL")
    return volumes
