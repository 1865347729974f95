"""MedSeg: deep-learning segmentation of CT and MRI in 3D Slicer.

Thin by design: the Widget binds the .ui to a parameter node, starts and cancels work, shows progress and errors.
The scene work is in :mod:`MedSegLib.logic` (MRML and VTK only, tested on slicer-core), and the heavy work runs
in the engine (``medseg``) in a separate process. Nothing imported here at load time needs torch or MONAI, so
Slicer starts and the module opens before they are installed.
"""

import logging
import os
from html import escape
from pathlib import Path

import qt
import slicer
import vtk
from MedSegLib import dependencies
from MedSegLib.logic import MedSegLogic as SceneLogic
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: The most input channels a model may have in this GUI (BraTS-style models use four).
MAX_CHANNELS = 4
CHANNEL_SUFFIXES = ("", "2", "3", "4")
MODEL_FOLDERS_SETTING = "MedSeg/ModelFolders"


class MedSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSeg contributors"]
        self.parent.helpText = (
            "Segment CT and MRI volumes with deep-learning models (MONAI sliding-window inference). "
            "Pick the volume, a model and optionally a region of interest, then Apply. "
            "The result is a segmentation with the model's names, colours and terminology. "
            '<a href="https://github.com/medseg/SlicerMedSeg">Documentation</a>.'
        )
        self.parent.acknowledgementText = (
            "MedSeg builds on MONAI, PyTorch, SimpleITK and 3D Slicer. The bundled hippocampus model was trained on "
            "the Medical Segmentation Decathlon (Task04, CC BY-SA 4.0)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The bundled T1 sample in the Sample Data module, so a new user can try MedSeg in two clicks."""
    import SampleData
    from MedSegLib.selftest import SAMPLE_NODE_NAME, sampleFile

    path = sampleFile()
    if path is None:
        logging.warning("MedSeg: the bundled sample is missing from this installation")
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MedSeg",
        sampleName=SAMPLE_NODE_NAME,
        uris=[path.as_uri()],  # a local file: Sample Data copies it into its cache, no download
        fileNames=[path.name],
        nodeNames=[SAMPLE_NODE_NAME],
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "MedSeg.png"),
        loadFileType="VolumeFile",
    )


@parameterNodeWrapper
class MedSegParameterNode:
    """The module's state, saved with the scene. The model and device are plain strings (their lists change)."""

    inputVolume: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    inputVolume4: vtkMRMLScalarVolumeNode
    roi: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""  #: a model id, or the path of a model folder the user added
    device: str = "auto"
    preview: bool = False  #: the engine's quick look (no window overlap, labels at the network's resolution)
    fullPrecision: bool = False  #: float32 only, never the verified bf16/fp16 of the default
    testTimeAugmentation: bool = False  #: mirror each window along the axes the model's card allows
    refineSmoothness: float = 1.0


class MedSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.job = None
        self._lastInputVolume = None  # to notice when the user picks another volume
        self._lastModel = None  # and another model
        self._cudaDevices = None  # listed when the Advanced section first opens
        self._observedSegmentation = None  # the output segmentation whose segments the Refine section lists

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSegLogic()
        self.logic.extraModelFolders = [Path(p) for p in _settingsList(MODEL_FOLDERS_SETTING) if Path(p).is_dir()]

        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onTimer)
        self.ui.progressBar.setVisible(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceSelected)
        self.ui.refineButton.connect("clicked(bool)", self.onRefineButton)
        self.ui.advancedCollapsibleButton.connect("contentsCollapsed(bool)", self.onAdvancedExpanded)
        self.ui.refineCollapsibleButton.connect("contentsCollapsed(bool)", lambda collapsed: self.updateRefineSection())

        self.populateModels()
        self.populateDevices()
        self.initializeParameterNode()

    def cleanup(self):
        if self.job is not None:
            self.cancelJob()
        self.removeObservers()
        self._observedSegmentation = None

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)

    def onSceneStartClose(self, caller, event):
        if self.job is not None:
            self.cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.model and self.ui.modelComboBox.count:
            self._parameterNode.model = self.ui.modelComboBox.itemData(0)

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
            self.updateGuiFromParameterNode()

    # Models and devices -------------------------------------------------------------------------------------

    def populateModels(self):
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        self.modelEntries = {}
        for entry in self.logic.models():
            key = entry.card.id if entry.source != "added" and entry.card else str(entry.folder)
            label = f"{entry.card.name} ({entry.card.id})" if entry.card else f"{entry.folder.name} (broken)"
            combo.addItem(label, key)
            self.modelEntries[key] = entry
        combo.blockSignals(wasBlocked)

    def populateDevices(self):
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem("auto (GPU if available)", "auto")
        combo.addItem("CPU", "cpu")
        for device, name in self._cudaDevices or []:
            combo.addItem(f"{device}: {name}", device)
        combo.blockSignals(wasBlocked)

    def onAdvancedExpanded(self, collapsed):
        """List the CUDA GPUs the first time the section opens (it takes the engine's Python a few seconds)."""
        if collapsed or self._cudaDevices is not None:
            return
        if not dependencies.missingRequirements():
            with slicer.util.WaitCursor():
                self._cudaDevices = self.logic.cudaDevices()
            self.populateDevices()
            self.updateGuiFromParameterNode()

    def onModelSelected(self, index):
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index)

    def onDeviceSelected(self, index):
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def onAddModelFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Model folder (model.json, model.pt)")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("This folder is not a MedSeg model.", waitCursor=True):
            from medseg.models.card import read_card

            read_card(Path(folder))  # refuse a broken card now, with the card's own explanation
            folders = [f for f in self.logic.extraModelFolders if f.resolve() != Path(folder).resolve()]
            self.logic.extraModelFolders = [Path(folder), *folders]
            _setSettingsList(MODEL_FOLDERS_SETTING, [str(p) for p in self.logic.extraModelFolders])
            self.populateModels()
            self._parameterNode.model = str(Path(folder))

    def modelInfoHtml(self, entry) -> str:
        if entry is None:
            return ""
        if entry.card is None:
            return f"<b>This model cannot be used:</b> {entry.problem}"
        card = entry.card
        swatches = " ".join(
            f'<span style="color:rgb{tuple(label.color)}">&#9632;</span> {label.value} {escape(label.name)}'
            for label in card.labels
        )
        channels = ", ".join(f"{escape(c.name)} ({escape(c.modality)})" for c in card.channels)
        html = f"<p>{escape(card.description)}</p><p><b>Channels:</b> {channels}<br><b>Labels:</b> {swatches}"
        html += f"<br><b>Licence:</b> {escape(card.licence)}"
        validation = (card.training or {}).get("validation", {}).get("mean")
        if isinstance(validation, dict):
            scores = ", ".join(f"{escape(str(k))} {v:.3f}" for k, v in validation.items() if isinstance(v, float))
            html += f"<br><b>Validation Dice:</b> {scores}"
        return html + "</p>"

    # GUI state ----------------------------------------------------------------------------------------------

    def updateGuiFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None:
            return
        model = self._parameterNode.model
        index = self.ui.modelComboBox.findData(model)  # -1 shows no model when a saved one is not installed
        if index != self.ui.modelComboBox.currentIndex:
            wasBlocked = self.ui.modelComboBox.blockSignals(True)
            self.ui.modelComboBox.setCurrentIndex(index)
            self.ui.modelComboBox.blockSignals(wasBlocked)
        if self.ui.deviceComboBox.findData(self._parameterNode.device) < 0:
            self._parameterNode.device = "auto"  # e.g. cuda:1 saved on another machine
            return
        deviceIndex = self.ui.deviceComboBox.findData(self._parameterNode.device)
        if deviceIndex != self.ui.deviceComboBox.currentIndex:
            self.ui.deviceComboBox.setCurrentIndex(deviceIndex)
        if self._parameterNode.inputVolume is not self._lastInputVolume:
            # another volume: a new result instead of overwriting the previous volume's segmentation
            self._lastInputVolume = self._parameterNode.inputVolume
            if self._parameterNode.outputSegmentation is not None:
                self._parameterNode.outputSegmentation = None
                return
        if self._parameterNode.model != self._lastModel:
            # another model: a new result, not one node mixing two models' segments
            changed, self._lastModel = self._lastModel is not None, self._parameterNode.model
            if changed and self._parameterNode.outputSegmentation is not None:
                self._parameterNode.outputSegmentation = None
                return
        entry = self.modelEntries.get(model)
        self.ui.modelInfoLabel.text = self.modelInfoHtml(entry)
        channels = entry.card.channels if entry is not None and entry.card is not None else []
        for index, (selector, label) in enumerate(self.channelWidgets()):
            visible = index < max(1, len(channels))
            selector.setVisible(visible)
            label.setVisible(visible)
            if index < len(channels):
                label.text = f"{channels[index].name} volume:"
        self.updateMirroringBox(entry)
        self.updateRefineSection()
        if self.job is None:
            volumes = self.selectedVolumes()
            usable = entry is not None and entry.card is not None and len(channels) <= MAX_CHANNELS
            ready = usable and all(volumes)
            self.ui.applyButton.enabled = ready
            if entry is not None and entry.card is not None and not usable:
                self.ui.applyButton.toolTip = f"This module takes at most {MAX_CHANNELS} channels; use medseg segment."
            else:
                self.ui.applyButton.toolTip = "Run the model." if ready else "Select the model and every input volume."

    def mirrorAxes(self, entry=None):
        """The axes the selected model's card allows test-time mirroring along; () for none or no model."""
        entry = entry if entry is not None else self.modelEntries.get(self._parameterNode.model)
        card = entry.card if entry is not None else None
        return tuple(card.inference.mirror_axes or ()) if card is not None else ()

    def updateMirroringBox(self, entry):
        """Offer mirroring only along the axes the model's training flipped; the user's choice is kept for others."""
        mirrorAxes = self.mirrorAxes(entry)
        box = self.ui.ttaCheckBox
        box.enabled = bool(mirrorAxes) and not self._parameterNode.preview
        if mirrorAxes and self._parameterNode.preview:
            box.text = "Test-time augmentation (not with a fast preview)"
            box.toolTip = "A fast preview runs each window once; untick Fast preview to mirror."
            return
        if mirrorAxes:
            axes = ", ".join("xyz"[a] for a in mirrorAxes)
            box.text = f"Test-time augmentation (mirroring along {axes}, {2 ** len(mirrorAxes)}x slower)"
            box.toolTip = (
                "Average the network's output over mirrorings of each window along the axes this model's training "
                "flipped, as nnU-Net does: sometimes a little more accurate, more work."
            )
            return
        box.text = "Test-time augmentation (not for this model)"
        if entry is not None and entry.card is not None and entry.card.inference.mirror_axes is None:
            box.toolTip = "This model's card does not list the axes its training flipped (inference.mirror_axes)."
        else:
            box.toolTip = "This model's training flipped no axis, so its mirrored predictions would not match."

    def channelWidgets(self):
        """(volume selector, label) per input channel, in the card's channel order."""
        return [
            (self.ui.inputVolumeSelector, self.ui.inputVolumeLabel),
            (self.ui.inputVolumeSelector2, self.ui.inputVolumeLabel2),
            (self.ui.inputVolumeSelector3, self.ui.inputVolumeLabel3),
            (self.ui.inputVolumeSelector4, self.ui.inputVolumeLabel4),
        ]

    def selectedVolumes(self):
        entry = self.modelEntries.get(self._parameterNode.model)
        count = len(entry.card.channels) if entry is not None and entry.card is not None else 1
        return [getattr(self._parameterNode, f"inputVolume{suffix}") for suffix in CHANNEL_SUFFIXES[:count]]

    def setRunning(self, running: bool):
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.toolTip = (
            "Stop the segmentation; the scene stays as it was." if running else "Run the model."
        )
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        for section in (
            self.ui.inputsCollapsibleButton,
            self.ui.outputsCollapsibleButton,
            self.ui.advancedCollapsibleButton,
        ):
            section.enabled = not running

    # Running ------------------------------------------------------------------------------------------------

    def onApplyButton(self):
        if self.job is not None:
            self.cancelJob()
            return
        with slicer.util.tryWithErrorDisplay("MedSeg could not install its Python packages."):
            if not ensureDependencies():  # asks first: no busy cursor over its questions
                return
        try:
            with slicer.util.tryWithErrorDisplay("MedSeg could not start the segmentation.", waitCursor=True):
                self.startJob()
        except Exception:
            self.ui.statusLabel.text = "Could not start; the scene was not changed."  # the message box said why

    def startJob(self):
        """Start the engine on the chosen inputs; the timer polls it."""
        self.ui.statusLabel.text = "Starting..."
        self.job = self.logic.startSegmentation(
            self.selectedVolumes(),
            model=self.modelEntries[self._parameterNode.model].folder,
            roi=self._parameterNode.roi,
            device=self._parameterNode.device,
            outputSegmentation=self._parameterNode.outputSegmentation,
            preview=self._parameterNode.preview,
            precision="fp32" if self._parameterNode.fullPrecision else "auto",
            testTimeAugmentation=self._parameterNode.testTimeAugmentation
            and bool(self.mirrorAxes())
            and not self._parameterNode.preview,
        )
        self.setRunning(True)
        self.timer.start()

    def onTimer(self):
        job = self.job
        if job is None:
            self.timer.stop()
            return
        if job.poll():
            self.ui.progressBar.value = int(round(100 * job.overallFraction))
            self.ui.statusLabel.text = f"{job.stage.capitalize()}..."
        if job.running:
            return
        self.timer.stop()
        self.job = None
        self.setRunning(False)
        self.ui.statusLabel.text = ""
        try:
            with slicer.util.tryWithErrorDisplay("Segmentation failed.", waitCursor=True):
                segmentationNode = self.logic.finishSegmentation(job)  # keeps the probabilities for Refine
                self._parameterNode.outputSegmentation = segmentationNode
                statistics = (job.result or {}).get("statistics", [])
                seconds = sum((job.result or {}).get("seconds", {}).values())
                volumes = ", ".join(f"{s['name']} {s['volume_ml']:.2f} mL" for s in statistics)
                device = (job.result or {}).get("device", "?")
                precision = (job.result or {}).get("precision", "")
                if (job.result or {}).get("backend") == "openvino":
                    precision += " in OpenVINO"
                preview = "PREVIEW (quick look, not for measurement). " if job.preview else ""
                notes = (job.result or {}).get("notes", [])
                for note in notes:  # e.g. the GPU ran out of memory and the run moved to the CPU
                    logging.info("MedSeg: %s", note)
                said = f" Note: {'; '.join(notes)}." if notes else ""
                self.ui.statusLabel.text = (
                    f"{preview}Done in {seconds:.1f} s on {device} ({precision}): {volumes}.{said}"
                )
        except Exception:
            self.ui.statusLabel.text = "Failed; the scene was not changed."  # the message box said why
        finally:
            self.updateGuiFromParameterNode()

    # Refine -------------------------------------------------------------------------------------------------

    def updateRefineSection(self, caller=None, event=None):
        """Fill the segment choices from the output segmentation, and follow its segments as they change."""
        node = self._parameterNode.outputSegmentation if self._parameterNode else None
        if node is not self._observedSegmentation:
            if self._observedSegmentation is not None:
                self.removeObserver(self._observedSegmentation, vtk.vtkCommand.ModifiedEvent, self.updateRefineSection)
            self._observedSegmentation = node
            if node is not None:
                self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateRefineSection)
        segments = []
        if node is not None:
            segmentation = node.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segments.append((segmentation.GetNthSegmentID(index), segmentation.GetNthSegment(index).GetName()))
        choices = (
            (self.ui.refineTargetComboBox, False),
            (self.ui.refineForegroundComboBox, True),
            (self.ui.refineBackgroundComboBox, True),
        )
        for combo, optional in choices:
            current = combo.currentData
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            if optional:
                combo.addItem("(none)", "")
            for segmentId, name in segments:
                combo.addItem(name, segmentId)
            index = combo.findData(current)
            combo.setCurrentIndex(index if index >= 0 else 0)
            combo.blockSignals(wasBlocked)
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        self.ui.refineButton.enabled = self.job is None and node is not None and volume is not None and bool(segments)

    def onRefineButton(self):
        node, volume = self._parameterNode.outputSegmentation, self._parameterNode.inputVolume
        with slicer.util.tryWithErrorDisplay("MedSeg could not install its Python packages."):
            if not ensureDependencies():
                return
        with slicer.util.tryWithErrorDisplay("Refinement failed.", waitCursor=True):
            from medseg.graphcut import GraphCutOptions

            _saveSegmentEditorUndoState(node)
            kept = self.logic.keptProbabilities(node) is not None
            segmentIds = self.logic.refine(
                node,
                volume,
                targetSegmentId=self.ui.refineTargetComboBox.currentData or None,
                foregroundStrokeSegmentId=self.ui.refineForegroundComboBox.currentData or None,
                backgroundStrokeSegmentId=self.ui.refineBackgroundComboBox.currentData or None,
                options=GraphCutOptions(smoothness=float(self._parameterNode.refineSmoothness)),
            )
            source = "the model's probabilities" if kept else "the segmentation itself (no probabilities kept)"
            self.ui.refineStatusLabel.text = f"Refined {len(segmentIds)} segment(s) from {source}."

    def cancelJob(self):
        self.timer.stop()
        job, self.job = self.job, None
        if job is not None:
            job.cancel()
        self.setRunning(False)
        self.ui.statusLabel.text = "Cancelled; the scene was not changed."
        self.updateGuiFromParameterNode()


def ensureDependencies() -> bool:
    """Offer to install the engine's missing Python packages; True when everything is there.

    torch comes from the PyTorch extension's installer when it is present (it picks the build for the GPU);
    the rest from pip, with Slicer's own numpy and SimpleITK, and an installed torch, pinned so they are never
    replaced. An installed torch too old for MedSeg is reported (RuntimeError), not upgraded.
    """
    import importlib

    missing = dependencies.missingRequirements()
    if not missing:
        return True
    names = ", ".join(r.requirement for r in missing)
    if not slicer.util.confirmOkCancelDisplay(
        f"MedSeg needs these Python packages, which are not installed yet:\n\n{names}\n\n"
        "Install them now? This can take several minutes. Slicer's own numpy, SimpleITK and VTK, and an installed "
        "torch, are kept.",
        windowTitle="MedSeg: install dependencies",
    ):
        return False
    if any(r.module == "torch" for r in missing):
        try:
            import PyTorchUtils
        except ImportError:
            PyTorchUtils = None
        if PyTorchUtils is not None:  # the PyTorch extension picks the build that suits the GPU, and asks
            torchRequirement = next(r.requirement for r in dependencies.ENGINE_REQUIREMENTS if r.module == "torch")
            installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=True, torchVersionRequirement=torchRequirement.removeprefix("torch")
            )
            if installed is None:
                return False
    importlib.invalidate_caches()
    rest = dependencies.missingRequirements()
    if rest:
        outdated = dependencies.outdatedTorch()
        if outdated:  # pinned, pip would settle for an old MONAI; unpinned, it would replace this torch build
            raise RuntimeError(outdated)
        with slicer.util.WaitCursor():
            constraints = dependencies.writeConstraints(
                Path(slicer.app.temporaryPath) / "medseg-constraints.txt", dependencies.installedVersions()
            )
            slicer.util.pip_install(dependencies.pipArguments(rest, constraints))
    importlib.invalidate_caches()
    still = dependencies.missingRequirements()
    if still:
        raise RuntimeError(f"these packages are still missing after the installation: {[r.module for r in still]}")
    return True


def _saveSegmentEditorUndoState(segmentationNode):
    """Let the Segment Editor's Undo revert the next change of ``segmentationNode`` (when the editor is loaded)."""
    try:
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    except AttributeError:
        return
    if editor.segmentationNode() is not segmentationNode:
        editor.setSegmentationNode(segmentationNode)
    editor.saveStateForUndo()


def _settingsList(key):
    value = qt.QSettings().value(key)
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _setSettingsList(key, values):
    qt.QSettings().setValue(key, values)


class MedSegLogic(ScriptedLoadableModuleLogic, SceneLogic):
    """The scene logic of :mod:`MedSegLib.logic` with Slicer's parameter node; usable without the GUI."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        SceneLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self):
        return MedSegParameterNode(super().getParameterNode())


class MedSegTest(ScriptedLoadableModuleTest):
    """Runs the real logic and engine on the bundled sample with the bundled model (needs torch and MONAI).

    Where the engine's packages are not installed (the Extensions factory), it says so and is skipped.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        missing = dependencies.missingRequirements()
        if missing:
            message = (
                "MedSegTest skipped: the engine's Python packages are not installed here ("
                + ", ".join(r.requirement for r in missing)
                + "). MedSeg offers to install them the first time Apply is pressed."
            )
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_SegmentBundledSample()
        self.setUp()
        self.test_RerunUpdatesInPlace()

    def test_SegmentBundledSample(self):
        from MedSegLib.selftest import EXPECTED_VOLUMES_ML, runSampleCheck

        self.delayDisplay("Segmenting the bundled sample with the bundled model")
        volumes = runSampleCheck(slicer.mrmlScene, MedSegLogic(), device="cpu")
        self.assertEqual(list(volumes), list(EXPECTED_VOLUMES_ML))
        self.delayDisplay(f"Test passed: {volumes}")

    def test_RerunUpdatesInPlace(self):
        from MedSegLib.selftest import SAMPLE_NODE_NAME, loadVolume, sampleFile

        logic = MedSegLogic()
        volume = loadVolume(slicer.mrmlScene, sampleFile(), SAMPLE_NODE_NAME)
        first = logic.segment(volume, device="cpu")
        second = logic.segment(volume, device="cpu", outputSegmentation=first)
        self.assertIs(second, first)
        self.assertEqual(first.GetSegmentation().GetNumberOfSegments(), 2)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 1)
        self.delayDisplay("Test passed: a second run updated the segmentation in place")
