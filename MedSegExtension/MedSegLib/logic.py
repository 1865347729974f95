"""MedSegLogic: segment volume nodes with the engine and put the result into a segmentation node.

Uses only MRML and VTK classes (never ``slicer.app``, ``slicer.modules``, ``qt`` or ``ctk``), so it runs the same
inside Slicer and under plain Python with ``slicer-core``. The engine runs in a separate process
(:class:`~MedSegLib.engineprocess.EngineProcess`) on temporary files; nothing in the scene changes until it has
succeeded, and a failure or a cancel leaves the scene as it was.

Nothing here imports torch or MONAI: the module must load in Slicer before they are installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from medseg.errors import CancelledError, MedSegError
from medseg.models.card import ModelCard, read_card
from medseg.models.registry import ModelEntry, find_model_folder, list_models

from .engineprocess import EngineProcess
from .nodes import arrayFromVtkMatrix, imageFromVolumeNode
from .segmentationio import updateSegmentationFromLabelmap

logger = logging.getLogger(__name__)

#: Share of the whole run taken by each engine stage, for one overall progress bar.
STAGE_WEIGHTS = {
    "loading model": 0.10,
    "reading": 0.05,
    "preprocessing": 0.10,
    "inference": 0.60,
    "postprocessing": 0.10,
    "writing": 0.05,
}


def overallProgress(stage: str, fraction: float) -> float:
    """Fraction of the whole run done when ``stage`` is ``fraction`` done (stages in the engine's order)."""
    done = 0.0
    for name, weight in STAGE_WEIGHTS.items():
        if name == stage:
            return min(1.0, done + weight * min(max(fraction, 0.0), 1.0))
        done += weight
    return done


@dataclass(frozen=True)
class VoxelBox:
    """Voxels ``first`` to ``last`` (both included) of a volume, in IJK order."""

    first: tuple[int, int, int]
    last: tuple[int, int, int]

    def engineArguments(self) -> list[str]:
        return ["--roi-voxels", *(str(v) for v in (*self.first, *self.last))]


def roiVoxelBox(volumeNode, roiNode) -> VoxelBox:
    """The voxels of ``volumeNode`` that a markups ROI overlaps, through any transforms of either node.

    A rotated ROI (or an oblique volume) gives the IJK bounding box of the ROI's eight corners.

    Raises:
        MedSegError: the ROI does not overlap the volume.
    """
    half = np.array(roiNode.GetSize(), dtype=float) / 2.0
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
    objectToNode = arrayFromVtkMatrix(roiNode.GetObjectToNodeMatrix())
    cornersNode = (objectToNode @ np.c_[signs * half, np.ones(8)].T).T[:, :3]
    roiToVolume = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        roiNode.GetParentTransformNode(), volumeNode.GetParentTransformNode(), roiToVolume
    )
    cornersRas = np.array([roiToVolume.TransformPoint(*corner) for corner in cornersNode])
    rasToIjk = vtk.vtkMatrix4x4()
    volumeNode.GetRASToIJKMatrix(rasToIjk)
    ijk = (arrayFromVtkMatrix(rasToIjk) @ np.c_[cornersRas, np.ones(8)].T).T[:, :3]
    dims = np.array(volumeNode.GetImageData().GetDimensions())
    first = np.maximum(np.floor(ijk.min(0) + 0.5), 0).astype(int)
    last = np.minimum(np.ceil(ijk.max(0) - 0.5), dims - 1).astype(int)
    if np.any(last < first):
        raise MedSegError(
            f'the region of interest "{roiNode.GetName()}" does not overlap volume "{volumeNode.GetName()}"'
        )
    return VoxelBox(tuple(int(v) for v in first), tuple(int(v) for v in last))


def _sameGrid(a, b) -> bool:
    matrixA, matrixB = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    a.GetIJKToRASMatrix(matrixA)
    b.GetIJKToRASMatrix(matrixB)
    return a.GetImageData().GetDimensions() == b.GetImageData().GetDimensions() and np.allclose(
        arrayFromVtkMatrix(matrixA), arrayFromVtkMatrix(matrixB), atol=1e-4
    )


class SegmentationJob:
    """One engine run on volumes of a scene: started at once, polled, then finished into the scene or discarded.

    A GUI polls :meth:`poll` from a timer and calls :meth:`finish` when :attr:`running` turns False; a script
    calls :meth:`MedSegLogic.segment`, which does both in a loop.
    """

    def __init__(
        self,
        scene,
        inputVolumes: Sequence,
        *,
        folder: Path,
        card: ModelCard,
        roiBox: VoxelBox | None,
        device: str,
        outputSegmentation,
        pythonExecutable: str | None = None,
    ) -> None:
        self.scene = scene
        self.inputVolumes = list(inputVolumes)
        self.card = card
        self.outputSegmentation = outputSegmentation
        self.stage, self.fraction = "starting", 0.0
        self.result: dict | None = None
        self.workDir = Path(tempfile.mkdtemp(prefix="medseg-"))
        try:
            self.inputPaths = []
            for index, volume in enumerate(self.inputVolumes):
                path = self.workDir / f"channel{index}.nrrd"
                sitk.WriteImage(imageFromVolumeNode(volume), str(path))
                self.inputPaths.append(path)
            self.outputPath = self.workDir / "labelmap.nrrd"
            arguments = ["segment", *map(str, self.inputPaths), "-o", str(self.outputPath)]
            arguments += ["--model", str(folder), "--device", device, "--progress-json"]
            arguments += roiBox.engineArguments() if roiBox is not None else []
            self.process = EngineProcess(arguments, pythonExecutable=pythonExecutable)
        except BaseException:
            self._cleanUp()
            raise

    @property
    def running(self) -> bool:
        return self.process.returnCode() is None

    def poll(self) -> list[tuple[str, float]]:
        """(stage, fraction) progress reported since the last call; never blocks."""
        updates = []
        for event in self.process.events():
            if event.get("event") == "progress":
                self.stage, self.fraction = str(event.get("stage", "")), float(event.get("fraction", 0.0))
                updates.append((self.stage, self.fraction))
            elif event.get("event") == "result":
                self.result = event
        return updates

    @property
    def overallFraction(self) -> float:
        return overallProgress(self.stage, self.fraction)

    def cancel(self) -> None:
        """Kill the engine with all its children and delete the temporary files; the scene is not touched."""
        self.process.kill()
        self._cleanUp()

    def finish(self):
        """Wait for the engine, then put its labelmap into the output segmentation (created when None).

        Returns:
            The segmentation node.

        Raises:
            CancelledError: the job was cancelled.
            MedSegError: the engine failed; the message is the engine's own, naming volumes instead of
                temporary files. The scene is unchanged.
        """
        try:
            code = self.process.wait()
            self.poll()
            if self.process.killed:
                raise CancelledError()
            if code != 0:
                raise MedSegError(self._explain(self.process.errorMessage()))
            labelmap = sitk.ReadImage(str(self.outputPath))
            return self._applyToScene(labelmap)
        finally:
            self._cleanUp()

    def _explain(self, message: str) -> str:
        for path, volume in zip(self.inputPaths, self.inputVolumes):
            message = message.replace(str(path), f'volume "{volume.GetName()}"')
        return message.replace(str(self.workDir), "<temporary folder>")

    def _applyToScene(self, labelmap: sitk.Image):
        volume = self.inputVolumes[0]
        created = self.outputSegmentation is None
        if created:
            name = self.scene.GenerateUniqueName(f"{volume.GetName()} segmentation ({self.card.id})")
            node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        else:
            node = self.outputSegmentation
            backup = slicer.vtkSegmentation()
            backup.DeepCopy(node.GetSegmentation())
        try:
            updateSegmentationFromLabelmap(self.scene, node, labelmap, self.card.labels)
            node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            node.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
            _showSegmentation(node)
            _placeBeside(self.scene, node, volume)
        except BaseException:
            if created:
                self.scene.RemoveNode(node)
            else:
                node.GetSegmentation().DeepCopy(backup)
            raise
        return node

    def _cleanUp(self) -> None:
        shutil.rmtree(self.workDir, ignore_errors=True)


def _showSegmentation(node) -> None:
    """Visible in the slice views and, as a closed surface, in 3D."""
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    display.SetVisibility3D(True)
    node.CreateClosedSurfaceRepresentation()


def _placeBeside(scene, node, volume) -> None:
    """Put the segmentation in the same subject-hierarchy folder (patient, study) as its volume."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    volumeItem = hierarchy.GetItemByDataNode(volume)
    if not volumeItem:
        return
    parent = hierarchy.GetItemParent(volumeItem)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:
        hierarchy.CreateItem(parent, node)


ProgressCallback = Callable[[str, float], None]


class MedSegLogic:
    """Segments volumes of an MRML scene with a MedSeg model.

    Args:
        scene: the MRML scene; inside Slicer the application's scene by default.
        pythonExecutable: the interpreter that runs the engine (default: this one, or ``PythonSlicer``).

    Example:
        >>> logic = MedSegLogic(scene)
        >>> segmentationNode = logic.segment(volumeNode, model="hippocampus-mri", device="cpu")
    """

    def __init__(self, scene=None, *, pythonExecutable: str | None = None) -> None:
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
        if self.scene is None:
            raise ValueError("MedSegLogic needs an MRML scene outside Slicer: MedSegLogic(slicer.vtkMRMLScene())")
        self.pythonExecutable = pythonExecutable
        self.extraModelFolders: list[Path] = []

    def models(self) -> list[ModelEntry]:
        """Bundled and installed models, plus the folders the user added (first), valid or not."""
        entries = []
        for folder in self.extraModelFolders:
            try:
                entries.append(ModelEntry(folder=folder, source="added", card=read_card(folder)))
            except MedSegError as exc:
                entries.append(ModelEntry(folder=folder, source="added", card=None, problem=str(exc)))
        known = {entry.card.id for entry in entries if entry.card is not None}
        return entries + [e for e in list_models() if e.card is None or e.card.id not in known]

    def resolveModel(self, model: str | os.PathLike[str] | None) -> tuple[Path, ModelCard]:
        """(model folder, card) for a model id, a model folder, or None for the bundled default."""
        folder = Path(model) if model is not None and Path(model).is_dir() else None
        if folder is None:
            for added in self.extraModelFolders:
                card = read_card(added)
                if card.id == model:
                    return added, card
            folder = find_model_folder(None if model is None else str(model))
        return folder, read_card(folder)

    def startSegmentation(
        self,
        inputVolumes,
        *,
        model: str | os.PathLike[str] | None = None,
        roi=None,
        device: str = "auto",
        outputSegmentation=None,
    ) -> SegmentationJob:
        """Check the inputs and start the engine; returns at once with a running :class:`SegmentationJob`."""
        volumes = [inputVolumes] if not isinstance(inputVolumes, (list, tuple)) else list(inputVolumes)
        folder, card = self.resolveModel(model)
        self._checkInputs(volumes, card)
        roiBox = roiVoxelBox(volumes[0], roi) if roi is not None else None
        return SegmentationJob(
            self.scene,
            volumes,
            folder=folder,
            card=card,
            roiBox=roiBox,
            device=device,
            outputSegmentation=outputSegmentation,
            pythonExecutable=self.pythonExecutable,
        )

    @staticmethod
    def _checkInputs(volumes: list, card: ModelCard) -> None:
        names = ", ".join(c.name for c in card.channels)
        if len(volumes) != len(card.channels) or any(v is None for v in volumes):
            given = sum(v is not None for v in volumes)
            raise MedSegError(f"model {card.id} needs {len(card.channels)} input volume(s) ({names}), got {given}")
        for volume in volumes:
            if volume.GetImageData() is None:
                raise MedSegError(f'volume "{volume.GetName()}" has no voxels')
        for volume in volumes[1:]:
            if not _sameGrid(volumes[0], volume):
                raise MedSegError(
                    f'volume "{volume.GetName()}" is not on the voxel grid of "{volumes[0].GetName()}"; '
                    "resample it onto that volume first (Resample Scalar/Vector/DWI Volume)"
                )

    def segment(
        self,
        inputVolumes,
        *,
        model: str | os.PathLike[str] | None = None,
        roi=None,
        device: str = "auto",
        outputSegmentation=None,
        progress: ProgressCallback | None = None,
        cancelEvent: threading.Event | None = None,
    ):
        """Segment and wait: returns the segmentation node (``outputSegmentation`` updated, or a new one).

        Args:
            inputVolumes: a scalar volume node, or one per channel in the model card's order.
            model: a model id, a model folder, or None for the bundled default model.
            roi: an optional markups ROI node; outside it the result is background.
            device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
            outputSegmentation: a segmentation node to update in place, or None to create one.
            progress: ``progress(stage, fraction)``, called from this thread.
            cancelEvent: set it (from another thread) to cancel; then :class:`CancelledError` is raised.

        Raises:
            MedSegError: bad input, an unknown model or a failure of the engine; the scene is unchanged.
        """
        job = self.startSegmentation(
            inputVolumes, model=model, roi=roi, device=device, outputSegmentation=outputSegmentation
        )
        while job.running:
            if cancelEvent is not None and cancelEvent.is_set():
                job.cancel()
                raise CancelledError()
            for stage, fraction in job.poll():
                if progress is not None:
                    progress(stage, fraction)
            time.sleep(0.05)
        for stage, fraction in job.poll():
            if progress is not None:
                progress(stage, fraction)
        return job.finish()
