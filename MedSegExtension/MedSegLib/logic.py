"""MedSegLogic: segment volume nodes with the engine and put the result into a segmentation node.

Uses only MRML and VTK classes (never ``slicer.app``, ``slicer.modules``, ``qt`` or ``ctk``), so it runs the same
inside Slicer and under plain Python with ``slicer-core``. The engine runs in a separate process
(:class:`~MedSegLib.engineprocess.EngineProcess`) on temporary files; nothing in the scene changes until it has
succeeded, and a failure or a cancel leaves the scene as it was.

Nothing here imports torch or MONAI: the module must load in Slicer before they are installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
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

from .engineprocess import EngineProcess, defaultPythonExecutable
from .nodes import arrayFromVtkMatrix, imageFromVolumeNode
from .segmentationio import (
    exportSegmentsToArray,
    registerConverterRules,
    replaceSegmentsFromLabelmap,
    updateSegmentationFromLabelmap,
)

logger = logging.getLogger(__name__)

#: Share of the whole run taken by each engine stage, for one overall progress bar.
STAGE_WEIGHTS = {
    "loading model": 0.10,
    "reading": 0.05,
    "preprocessing": 0.10,
    "inference": 0.55,
    "postprocessing": 0.10,
    "refining": 0.05,
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


def _sameFrame(a, b, tolerance_mm: float = 1e-3) -> bool:
    """Whether ``b``'s parent transforms place it exactly where ``a``'s place ``a`` (an identity between them)."""
    if a.GetTransformNodeID() == b.GetTransformNodeID():
        return True
    between = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        b.GetParentTransformNode(), a.GetParentTransformNode(), between
    )
    bounds = [0.0] * 6
    b.GetBounds(bounds)  # the volume's corners (and centre) in its own frame, before its transforms
    corners = [(x, y, z) for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]]
    corners.append(tuple(np.mean(np.reshape(bounds, (3, 2)), axis=1)))
    return all(np.allclose(between.TransformPoint(*p), p, atol=tolerance_mm) for p in corners)


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
        keepProbabilities: bool = False,
        engineOptions: Sequence[str] = (),
        preview: bool = False,
    ) -> None:
        self.scene = scene
        self.preview = preview  #: the engine's quick look: node and segment names say so
        self.probabilities: np.ndarray | None = None  #: (C, z, y, x) float16 on the input grid, after finish()
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
            self.probabilitiesPath = self.workDir / "probabilities.nrrd" if keepProbabilities else None
            arguments = ["segment", *map(str, self.inputPaths), "-o", str(self.outputPath)]
            arguments += ["--model", str(folder), "--device", device, "--progress-json", "--exit-with-stdin"]
            if self.probabilitiesPath is not None:
                arguments += ["--probabilities", str(self.probabilitiesPath)]
            arguments += roiBox.engineArguments() if roiBox is not None else []
            arguments += list(engineOptions)
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
            if not self.outputPath.is_file():  # exit status 0 without a result: not an engine that finished
                raise MedSegError(
                    self._explain(f"the engine ended without writing its result; {self.process.errorMessage()}")
                )
            labelmap = sitk.ReadImage(str(self.outputPath))
            if self.probabilitiesPath is not None and self.probabilitiesPath.exists():  # read before the scene changes
                vector = sitk.GetArrayFromImage(sitk.ReadImage(str(self.probabilitiesPath)))  # (z, y, x, C)
                self.probabilities = np.moveaxis(vector, -1, 0).astype(np.float16)
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
        registerConverterRules()  # before the node is made: a segmentation copies the rules known at its creation
        if created:
            kind = "preview" if self.preview else "segmentation"
            name = self.scene.GenerateUniqueName(f"{volume.GetName()} {kind} ({self.card.id})")
            node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        else:
            node = self.outputSegmentation
            backup = slicer.vtkSegmentation()
            backup.DeepCopy(node.GetSegmentation())
            transformId = node.GetTransformNodeID()
        try:
            suffix = " (preview)" if self.preview else ""
            # the result lives in the volume's frame: the segmentation goes under its transform before the import
            node.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
            updateSegmentationFromLabelmap(
                self.scene, node, labelmap, self.card.labels, nameSuffix=suffix, referenceVolume=volume
            )
            node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            _showSegmentation(node)
            _placeBeside(self.scene, node, volume)
        except BaseException:
            if created:
                self.scene.RemoveNode(node)
            else:
                node.GetSegmentation().DeepCopy(backup)
                node.SetAndObserveTransformNodeID(transformId)
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

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # the engine's (medseg.inference.PRECISIONS; no torch import here)


def _engineOptions(preview: bool, precision: str, testTimeAugmentation: bool) -> list[str]:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    options = ["--precision", precision]
    options += ["--preview"] if preview else []
    options += ["--tta"] if testTimeAugmentation else []
    return options


class _Forgetting:
    """A scene observer that calls the logic's ``_forget``, holding the logic weakly (the scene's observers must not
    keep it alive).

    An object, not a closure: a scene that becomes garbage together with its observers (a traceback holding both)
    is destroyed by the garbage collector, and its destructor fires these events after the collector may have
    cleared the observers. A cleared closure crashes the interpreter (a segmentation fault, seen in the test
    suite); a cleared object has merely lost its attributes, and does nothing."""

    def __init__(self, logic: MedSegLogic, everything: bool) -> None:
        self.logic, self.everything = weakref.ref(logic), everything

    def __call__(self, caller, event) -> None:
        reference = getattr(self, "logic", None)
        logic = reference() if reference is not None else None
        if logic is not None:
            logic._forget(getattr(self, "everything", True))


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
        #: segmentation node id -> probabilities kept from its last run (for refinement), see keptProbabilities
        self._probabilities: dict[str, KeptProbabilities] = {}
        self._refinements: dict[str, _RefinementState] = {}
        #: segmentation node id -> digest of its model segments as the last run or refinement left them: a
        #: segmentation edited since (Segment Editor) is refined from what it now holds, not from the kept state
        self._outputs: dict[str, bytes] = {}
        # node ids come back after a scene is closed (another patient's nodes): forget what was kept for them
        self.scene.AddObserver(slicer.vtkMRMLScene.EndCloseEvent, _Forgetting(self, everything=True))
        self.scene.AddObserver(slicer.vtkMRMLScene.NodeRemovedEvent, _Forgetting(self, everything=False))

    def _forget(self, everything: bool) -> None:
        """Drop what was kept for segmentations (or their volumes) no longer in the scene; everything on close."""
        exists = self.scene.GetNodeByID
        for kept in (self._probabilities, self._refinements, self._outputs):
            for nodeId in list(kept):
                entry = kept[nodeId]
                volumeId = getattr(entry, "volumeId", None)
                if everything or exists(nodeId) is None or (volumeId is not None and exists(volumeId) is None):
                    del kept[nodeId]

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

    def cudaDevices(self, timeout: float = 120.0) -> list[tuple[str, str]]:
        """(device, name) of each CUDA GPU, asked of the engine's Python so torch never loads into Slicer.

        Returns an empty list when there is none, or when torch is missing or broken (the reason is logged).
        """
        script = (
            "import json, torch; print(json.dumps([(f'cuda:{i}', torch.cuda.get_device_name(i)) "
            "for i in range(torch.cuda.device_count())]))"
        )
        try:
            python = self.pythonExecutable or defaultPythonExecutable()
            done = subprocess.run(
                [python, "-c", script], capture_output=True, text=True, encoding="utf-8", timeout=timeout, check=True
            )
            return [tuple(device) for device in json.loads(done.stdout.strip().splitlines()[-1])]
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            logger.warning("could not list CUDA devices: %s", exc)
            return []

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
        preview: bool = False,
        precision: str = "auto",
        testTimeAugmentation: bool = False,
    ) -> SegmentationJob:
        """Check the inputs and start the engine; returns at once with a running :class:`SegmentationJob`.

        ``preview`` is the engine's quick look (``medseg segment --preview``; the node's and segments' names say
        "preview"); ``precision`` is the engine's (``auto``, ``fp32``, ``bf16``, ``fp16``);
        ``testTimeAugmentation`` mirrors each window along the axes the model's card allows (``--tta``).
        """
        volumes = [inputVolumes] if not isinstance(inputVolumes, (list, tuple)) else list(inputVolumes)
        folder, card = self.resolveModel(model)
        self._checkInputs(volumes, card)
        if testTimeAugmentation and not card.inference.mirror_axes:
            raise MedSegError(
                f"model {card.id} ({folder}): test-time mirroring needs the axes its training flipped, and its card "
                "lists none (inference.mirror_axes)"
            )
        roiBox = roiVoxelBox(volumes[0], roi) if roi is not None else None
        dims = volumes[0].GetImageData().GetDimensions()
        keep = int(np.prod(dims)) * (len(card.labels) + 1) <= MAX_KEPT_PROBABILITY_VALUES
        return SegmentationJob(
            self.scene,
            volumes,
            folder=folder,
            card=card,
            roiBox=roiBox,
            device=device,
            outputSegmentation=outputSegmentation,
            pythonExecutable=self.pythonExecutable,
            keepProbabilities=keep,
            engineOptions=_engineOptions(preview, precision, testTimeAugmentation),
            preview=preview,
        )

    def finishSegmentation(self, job: SegmentationJob):
        """Finish a job (see :meth:`SegmentationJob.finish`) and keep its probabilities for :meth:`refine`."""
        node = job.finish()
        self._refinements.pop(node.GetID(), None)
        segmentIds = _refinableSegments(node.GetSegmentation(), set())
        self._outputs[node.GetID()] = _digest(exportSegmentsToArray(node, segmentIds, job.inputVolumes[0]))
        if job.probabilities is not None:
            self._probabilities[node.GetID()] = KeptProbabilities(
                job.probabilities, job.inputVolumes[0].GetID(), [label.value for label in job.card.labels]
            )
        else:
            self._probabilities.pop(node.GetID(), None)
        return node

    def keptProbabilities(self, segmentationNode) -> KeptProbabilities | None:
        return self._probabilities.get(segmentationNode.GetID())

    def refine(
        self,
        segmentationNode,
        inputVolume,
        *,
        targetSegmentId: str | None = None,
        foregroundStrokeSegmentId: str | None = None,
        backgroundStrokeSegmentId: str | None = None,
        options=None,
    ) -> list[str]:
        """Refine the segmentation by graph cut on the volume, optionally with strokes; segments change in place.

        The refined segments are the model's (``label_<value>``), or all segments but the strokes for a
        segmentation MedSeg did not make. The probabilities kept from the last run are used when there are
        some; otherwise soft probabilities come from the segmentation itself. Strokes are segments (painted in
        the Segment Editor): the foreground stroke marks voxels of ``targetSegmentId``, the background stroke
        voxels of none. A stroke added to the same stroke segments re-solves from the previous cut.

        Returns:
            The ids of the refined segments.

        Raises:
            MedSegError: a stroke segment is empty or missing, or the inputs do not fit; the scene is unchanged.
        """
        from medseg.graphcut import GraphCutOptions, LabelmapRefinement, probabilities_from_labelmap

        segmentation = segmentationNode.GetSegmentation()
        strokeIds = {foregroundStrokeSegmentId, backgroundStrokeSegmentId} - {None}
        segmentIds = _refinableSegments(segmentation, strokeIds)
        if not segmentIds:
            raise MedSegError(f'segmentation "{segmentationNode.GetName()}" has no segment to refine')
        values = list(range(1, len(segmentIds) + 1))  # segments in order are labels 1..N
        image = imageFromVolumeNode(inputVolume)
        current = exportSegmentsToArray(segmentationNode, segmentIds, inputVolume)
        foreground = background = None
        if foregroundStrokeSegmentId is not None:
            if targetSegmentId is None:
                if len(segmentIds) > 1:
                    raise MedSegError("choose which segment the foreground stroke belongs to")
                targetSegmentId = segmentIds[0]
            if targetSegmentId not in segmentIds:
                raise MedSegError(f'"{targetSegmentId}" is not one of the segments being refined')
            painted = _exportStroke(segmentationNode, foregroundStrokeSegmentId, inputVolume)
            foreground = painted.astype(np.uint8) * np.uint8(segmentIds.index(targetSegmentId) + 1)
        if backgroundStrokeSegmentId is not None:
            background = _exportStroke(segmentationNode, backgroundStrokeSegmentId, inputVolume)

        state = self._refinements.get(segmentationNode.GetID())
        key = (inputVolume.GetID(), tuple(segmentIds), options)
        edited = self._outputs.get(segmentationNode.GetID()) != _digest(current)  # since MedSeg last wrote it
        if edited or state is None or state.key != key or not state.extendedBy(foreground, background):
            kept = None if edited else self._probabilities.get(segmentationNode.GetID())
            if kept is not None and kept.matches(inputVolume, segmentationNode, segmentIds):
                probabilities = kept.forSegments(segmentationNode, segmentIds)
            else:
                probabilities = probabilities_from_labelmap(current, values, image.GetSpacing())
            refinement = LabelmapRefinement(
                sitk.GetArrayFromImage(image),  # a copy: the refinement outlives this image
                probabilities,
                spacing=image.GetSpacing(),
                labels=values,
                options=options or GraphCutOptions(),
            )
            state = _RefinementState(key, refinement)
            self._refinements[segmentationNode.GetID()] = state
        labels = state.refine(foreground, background)
        result = sitk.GetImageFromArray(labels)
        result.CopyInformation(image)
        replaceSegmentsFromLabelmap(self.scene, segmentationNode, result, segmentIds, referenceVolume=inputVolume)
        self._outputs[segmentationNode.GetID()] = _digest(labels)
        return segmentIds

    @staticmethod
    def _checkInputs(volumes: list, card: ModelCard) -> None:
        names = ", ".join(c.name for c in card.channels)
        if len(volumes) != len(card.channels) or any(v is None for v in volumes):
            given = sum(v is not None for v in volumes)
            raise MedSegError(f"model {card.id} needs {len(card.channels)} input volume(s) ({names}), got {given}")
        for volume in volumes:
            if volume.GetImageData() is None:
                raise MedSegError(f'volume "{volume.GetName()}" has no voxels')
            components = volume.GetImageData().GetNumberOfScalarComponents()
            if components != 1:
                raise MedSegError(
                    f'volume "{volume.GetName()}" has {components} components per voxel (a colour or vector volume); '
                    "MedSeg segments scalar volumes: take one component first (Vector to Scalar Volume module)"
                )
        if len({volume.GetID() for volume in volumes}) != len(volumes):
            raise MedSegError(f"model {card.id} needs a different volume for each channel ({names})")
        for volume in volumes[1:]:
            if not _sameGrid(volumes[0], volume):
                raise MedSegError(
                    f'volume "{volume.GetName()}" is not on the voxel grid of "{volumes[0].GetName()}"; '
                    "resample it onto that volume first (Resample Scalar/Vector/DWI Volume)"
                )
            if not _sameFrame(volumes[0], volume):
                raise MedSegError(
                    f'volume "{volume.GetName()}" is under another transform than "{volumes[0].GetName()}": the '
                    "engine reads the voxels as stored, which would not be aligned; harden the transforms "
                    "(Data module) or resample it onto that volume first"
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
        preview: bool = False,
        precision: str = "auto",
        testTimeAugmentation: bool = False,
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
            preview, precision, testTimeAugmentation: see :meth:`startSegmentation`.

        Raises:
            MedSegError: bad input, an unknown model or a failure of the engine; the scene is unchanged.
        """
        job = self.startSegmentation(
            inputVolumes,
            model=model,
            roi=roi,
            device=device,
            outputSegmentation=outputSegmentation,
            preview=preview,
            precision=precision,
            testTimeAugmentation=testTimeAugmentation,
        )
        try:
            while job.running:
                if cancelEvent is not None and cancelEvent.is_set():
                    raise CancelledError()
                for stage, fraction in job.poll():
                    if progress is not None:
                        progress(stage, fraction)
                time.sleep(0.05)
            for stage, fraction in job.poll():
                if progress is not None:
                    progress(stage, fraction)
        except BaseException:  # cancelled, Ctrl-C, or a progress callback that raised: no engine left running
            job.cancel()  # its own process group ignores this process's Ctrl-C; the temporary files go too
            raise
        return self.finishSegmentation(job)


#: Probabilities are kept for refinement only up to this many values (float16: 256 MiB).
MAX_KEPT_PROBABILITY_VALUES = 2**27


@dataclass
class KeptProbabilities:
    """The per-class probabilities of a segmentation's last run, on its input volume's grid."""

    array: np.ndarray  #: (C, z, y, x) float16, component 0 background
    volumeId: str
    labelValues: list[int]

    def matches(self, volume, segmentationNode, segmentIds: list[str]) -> bool:
        dims = volume.GetImageData().GetDimensions() if volume.GetImageData() else None
        known = {f"label_{v}" for v in self.labelValues}
        return volume.GetID() == self.volumeId and dims == self.array.shape[1:][::-1] and set(segmentIds) <= known

    def forSegments(self, segmentationNode, segmentIds: list[str]) -> np.ndarray:
        """(N + 1, z, y, x) float32: background, then one component per segment in ``segmentIds`` order."""
        components = [int(segmentId.removeprefix("label_")) for segmentId in segmentIds]
        return self.array[[0, *components]].astype(np.float32)


class _RefinementState:
    """A refinement kept between strokes, and the strokes it has seen."""

    def __init__(self, key, refinement) -> None:
        self.key = key  #: (volume id, segment ids, options)
        self.refinement = refinement
        self.foreground: np.ndarray | None = None
        self.background: np.ndarray | None = None

    @property
    def volumeId(self) -> str:
        return self.key[0]

    def extendedBy(self, foreground: np.ndarray | None, background: np.ndarray | None) -> bool:
        """Whether the new strokes only add to the old ones (erasing needs a fresh cut)."""
        for old, new in ((self.foreground, foreground), (self.background, background)):
            if old is not None and (new is None or (old.astype(bool) & ~new.astype(bool)).any()):
                return False
        if self.foreground is not None and ((self.foreground > 0) & (foreground != self.foreground)).any():
            return False  # the same strokes now belong to another segment
        return True

    def refine(self, foreground: np.ndarray | None, background: np.ndarray | None) -> np.ndarray:
        newForeground = foreground
        if foreground is not None and self.foreground is not None:
            newForeground = np.where(self.foreground > 0, 0, foreground).astype(foreground.dtype)
        newBackground = background
        if background is not None and self.background is not None:
            newBackground = background & ~self.background
        labels = self.refinement.refine(
            newForeground if newForeground is not None and newForeground.any() else None,
            newBackground if newBackground is not None and newBackground.any() else None,
        )
        self.foreground, self.background = foreground, background
        return labels


def _digest(labels: np.ndarray) -> bytes:
    """A fingerprint of a labelmap array, to tell whether a segmentation changed since MedSeg wrote it."""
    digest = hashlib.blake2b(str((labels.shape, labels.dtype.str)).encode(), digest_size=16)
    digest.update(memoryview(np.ascontiguousarray(labels)).cast("B"))
    return digest.digest()


def _refinableSegments(segmentation, strokeIds: set[str]) -> list[str]:
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    model = [i for i in ids if i.startswith("label_") and i not in strokeIds]
    return model if model else [i for i in ids if i not in strokeIds]


def _exportStroke(segmentationNode, segmentId: str, referenceVolume) -> np.ndarray:
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise MedSegError(f'segmentation "{segmentationNode.GetName()}" has no stroke segment "{segmentId}"')
    painted = exportSegmentsToArray(segmentationNode, [segmentId], referenceVolume) > 0
    if not painted.any():
        raise MedSegError(f'the stroke segment "{segment.GetName()}" is empty: paint at least one voxel in it')
    return painted
