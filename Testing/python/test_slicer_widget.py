"""MedSeg.py's Module, Widget and Test classes, run against fakes of the Qt parts only (see fake_slicer_gui).

The MRML scene, the nodes, the logic and the engine are real. This catches what static checks of MedSeg.py
cannot: a wrong attribute, a broken Apply/Cancel/Refine flow, an error that does not reach the user.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
pytestmark = [pytest.mark.slicer, pytest.mark.slow]

import fake_slicer_gui  # noqa: E402
from helpers import write_model_folder  # noqa: E402
from MedSegLib.selftest import SAMPLE_NODE_NAME, loadVolume, sampleFile  # noqa: E402


@pytest.fixture
def module(monkeypatch):
    scene = slicer.vtkMRMLScene()
    recorder = fake_slicer_gui.install(monkeypatch, scene)
    spec = importlib.util.spec_from_file_location("MedSeg", fake_slicer_gui.MODULE_DIR / "MedSeg.py")
    medseg_module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "MedSeg", medseg_module)
    spec.loader.exec_module(medseg_module)
    return types.SimpleNamespace(module=medseg_module, scene=scene, recorder=recorder)


def run_until_done(widget, timeout=120.0):
    deadline = time.time() + timeout
    while widget.timer.active:
        assert time.time() < deadline, "the engine did not finish"
        widget.timer.fire()
        time.sleep(0.05)


def test_module_registers_the_sample_and_the_widget_segments_refines_and_cancels(module):
    medseg = module.module
    parent = types.SimpleNamespace()
    medseg.MedSeg(parent)
    assert parent.title == "MedSeg" and "Segmentation" in parent.categories
    medseg.registerSampleData()
    (sample,) = module.recorder.sampleData
    assert sample["uris"][0].startswith("file://") and sample["nodeNames"] == [SAMPLE_NODE_NAME]

    volume = loadVolume(module.scene, sampleFile(), SAMPLE_NODE_NAME)
    widget = medseg.MedSegWidget()
    widget.setup()
    ui = widget.ui
    assert ui.modelComboBox.currentData == "hippocampus-mri" and "CC-BY-SA" in ui.modelInfoLabel.text
    assert widget._parameterNode.inputVolume is volume  # the first volume is preselected
    assert ui.applyButton.enabled and not ui.inputVolumeSelector2.visible  # one channel: one selector
    widget._parameterNode.device = "cpu"

    widget.onApplyButton()
    assert ui.applyButton.text == "Cancel" and ui.progressBar.visible
    run_until_done(widget)
    assert module.recorder.errors == []
    assert ui.applyButton.text == "Apply" and ui.statusLabel.text.startswith("Done in")
    output = widget._parameterNode.outputSegmentation
    assert output is not None and output.GetSegmentation().GetNumberOfSegments() == 2
    assert ui.refineButton.enabled and [d for _, d in ui.refineTargetComboBox.items] == ["label_1", "label_2"]

    widget.onRefineButton()
    assert module.recorder.errors == []
    assert ui.refineStatusLabel.text == "Refined 2 segment(s) from the model's probabilities."

    before = module.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    widget._parameterNode.outputSegmentation = None
    widget.onApplyButton()
    widget.onApplyButton()  # the button reads Cancel now
    assert not widget.timer.active and ui.statusLabel.text.startswith("Cancelled")
    assert module.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before
    assert ui.applyButton.text == "Apply" and ui.applyButton.enabled

    widget._parameterNode.preview = True  # the Outputs section's "Fast preview" box
    widget._parameterNode.fullPrecision = True
    widget.onApplyButton()
    run_until_done(widget)
    assert module.recorder.errors == []
    assert ui.statusLabel.text.startswith("PREVIEW")
    openvino = importlib.util.find_spec("openvino") is not None  # float32 windows run there when installed
    assert ("(fp32 in OpenVINO)" if openvino else "(fp32)") in ui.statusLabel.text
    preview = widget._parameterNode.outputSegmentation
    assert "preview" in preview.GetName() and preview.GetSegmentation().GetNthSegment(0).GetName().endswith("(preview)")
    widget.cleanup()


def test_an_engine_error_reaches_the_user_and_the_scene_stays(module, tmp_path):
    medseg = module.module
    image = sitk.Cast(sitk.ReadImage(str(sampleFile())), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[1, 2, 3] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(tmp_path / "broken.nrrd"))
    loadVolume(module.scene, tmp_path / "broken.nrrd", "Broken")
    widget = medseg.MedSegWidget()
    widget.setup()
    widget._parameterNode.device = "cpu"
    nodes = module.scene.GetNumberOfNodes()
    widget.onApplyButton()
    run_until_done(widget)
    assert len(module.recorder.errors) == 1 and 'volume "Broken"' in module.recorder.errors[0]
    assert "NaN" in module.recorder.errors[0] and widget.ui.statusLabel.text.startswith("Failed")
    assert module.scene.GetNumberOfNodes() == nodes and widget.ui.applyButton.text == "Apply"
    widget.cleanup()


def test_mirroring_is_offered_only_for_models_whose_training_flipped_an_axis(module, tmp_path, monkeypatch):
    medseg = module.module
    loadVolume(module.scene, sampleFile(), SAMPLE_NODE_NAME)
    widget = medseg.MedSegWidget()
    widget.setup()
    ui = widget.ui
    assert ui.ttaCheckBox.enabled and ui.ttaCheckBox.text.endswith("(mirroring along x, 2x slower)")
    widget._parameterNode.testTimeAugmentation = True
    folder = write_model_folder(tmp_path / "no-flips")  # a card without mirror axes
    monkeypatch.setattr(medseg.qt.QFileDialog, "getExistingDirectory", lambda *args: str(folder))
    widget.onAddModelFolder()
    assert widget._parameterNode.model == str(folder) and module.recorder.errors == []
    assert not ui.ttaCheckBox.enabled and "not for this model" in ui.ttaCheckBox.text
    assert "does not list the axes its training flipped" in ui.ttaCheckBox.toolTip
    assert widget._parameterNode.testTimeAugmentation, "browsing models keeps the user's choice"
    widget._parameterNode.device = "cpu"
    widget.onApplyButton()  # runs without mirroring: the engine would refuse it for this model
    run_until_done(widget)
    assert module.recorder.errors == [] and ui.statusLabel.text.startswith("Done in")
    widget._parameterNode.model = "hippocampus-mri"
    assert ui.ttaCheckBox.enabled and widget._parameterNode.testTimeAugmentation
    widget.cleanup()


def test_another_model_gets_a_new_result_a_preview_offers_no_mirroring_and_a_refused_start_says_so(
    module, tmp_path, monkeypatch
):
    medseg = module.module
    loadVolume(module.scene, sampleFile(), SAMPLE_NODE_NAME)
    widget = medseg.MedSegWidget()
    widget.setup()
    ui = widget.ui
    widget._parameterNode.device = "cpu"
    widget.onApplyButton()
    run_until_done(widget)
    first = widget._parameterNode.outputSegmentation
    assert first is not None and ui.statusLabel.text.startswith("Done in")
    # another model: its result goes into a new node, not over the first model's segments
    folder = write_model_folder(tmp_path / "other")
    monkeypatch.setattr(medseg.qt.QFileDialog, "getExistingDirectory", lambda *args: str(folder))
    widget.onAddModelFolder()
    assert widget._parameterNode.model == str(folder) and widget._parameterNode.outputSegmentation is None
    widget._parameterNode.model = "hippocampus-mri"
    # a fast preview runs each window once: no mirroring offered, and none asked of the engine
    assert ui.ttaCheckBox.enabled
    widget._parameterNode.testTimeAugmentation = True
    widget._parameterNode.preview = True
    assert not ui.ttaCheckBox.enabled and "not with a fast preview" in ui.ttaCheckBox.text
    widget.onApplyButton()
    run_until_done(widget)
    assert module.recorder.errors == [] and ui.statusLabel.text.startswith("PREVIEW")
    # a start the logic refuses: the message box says why, the status line does not stay on "Starting..."
    roi = module.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Far away")
    roi.SetCenter(900.0, 900.0, 900.0)
    roi.SetSize(10.0, 10.0, 10.0)
    widget._parameterNode.roi = roi
    nodes = module.scene.GetNumberOfNodes()
    widget.onApplyButton()
    assert len(module.recorder.errors) == 1 and "does not overlap" in module.recorder.errors[0]
    assert ui.statusLabel.text == "Could not start; the scene was not changed." and ui.applyButton.text == "Apply"
    assert module.scene.GetNumberOfNodes() == nodes and widget.job is None
    widget.cleanup()


def test_the_modules_own_self_test_runs(module):
    medseg = module.module
    test = medseg.MedSegTest()
    test.runTest()  # segments the bundled sample twice, checks names, volumes and the in-place update
    assert module.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_the_self_test_is_skipped_with_a_message_where_the_engine_packages_are_missing(module, monkeypatch, caplog):
    # the Extensions factory runs MedSegTest (ctest) without torch or MONAI: a skip that says why, not a failure
    medseg = module.module
    missing = [medseg.dependencies.Requirement("monai", "monai>=1.4")]
    monkeypatch.setattr(medseg.dependencies, "missingRequirements", lambda: missing)
    with caplog.at_level(logging.WARNING):
        medseg.MedSegTest().runTest()
    assert "MedSegTest skipped" in caplog.text and "monai>=1.4" in caplog.text
    assert module.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_installing_missing_packages_pins_the_installed_torch_and_refuses_one_too_old(module, monkeypatch, tmp_path):
    medseg = module.module
    dependencies = medseg.dependencies
    installs = []
    monkeypatch.setattr(slicer.util, "pip_install", installs.append, raising=False)
    monkeypatch.setattr(slicer.app, "temporaryPath", str(tmp_path))
    monai = dependencies.Requirement("monai", "monai>=1.4")
    monkeypatch.setattr(dependencies, "missingRequirements", lambda: [] if installs else [monai])
    assert medseg.ensureDependencies()
    arguments = installs[0]
    assert arguments[0] == "monai>=1.4" and arguments[1] == "--constraint"
    pins = Path(arguments[2]).read_text(encoding="utf-8").splitlines()
    assert f"torch=={importlib.metadata.version('torch')}" in pins  # MONAI cannot pull another torch over it

    installs.clear()
    monkeypatch.setattr(dependencies, "outdatedTorch", lambda: "torch 2.4.1 is installed, but MedSeg needs torch>=2.8")
    with pytest.raises(RuntimeError, match=r"torch 2\.4\.1 is installed, but MedSeg needs torch>=2\.8"):
        medseg.ensureDependencies()
    assert installs == []  # nothing installed: no older MONAI settled for, no torch replaced
