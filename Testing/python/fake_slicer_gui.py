"""A stand-in for the parts of 3D Slicer that slicer-core lacks: the Qt application and its widgets.

Only what MedSeg.py touches is here: ``qt`` (timer, settings, file dialog), ``ctk``, the widgets that
``slicer.util.loadUI`` would build from ``MedSeg.ui`` (one fake per widget name found in the file, so a name
missing from the .ui fails here too), ``slicer.util``'s dialogs and context managers, ``slicer.app``,
``slicer.ScriptedLoadableModule`` and a minimal ``slicer.parameterNodeWrapper``. Everything else is real: the MRML
scene and nodes come from slicer-core, and the module's logic runs the real engine.
"""

from __future__ import annotations

import contextlib
import sys
import types
import xml.etree.ElementTree as ElementTree
from pathlib import Path


class FakeSignalOwner:
    """Records ``connect(signal, slot)`` so a test can emit the signal."""

    def __init__(self) -> None:
        self.slots: dict[str, list] = {}

    def connect(self, signal, slot) -> bool:
        self.slots.setdefault(signal, []).append(slot)
        return True

    def emit(self, signal, *args) -> None:
        for slot in self.slots.get(signal, []):
            slot(*args)


class FakeWidget(FakeSignalOwner):
    def __init__(self, name: str = "", className: str = "QWidget") -> None:
        super().__init__()
        self.name, self.className = name, className
        self.enabled, self.visible, self.text, self.toolTip, self.value = True, True, "", "", 0

    def setVisible(self, visible: bool) -> None:
        self.visible = visible

    def setMRMLScene(self, scene) -> None:
        self.scene = scene

    def blockSignals(self, block: bool) -> bool:
        return False


class FakeComboBox(FakeWidget):
    def __init__(self, name: str = "", className: str = "QComboBox") -> None:
        super().__init__(name, className)
        self.items: list[tuple[str, object]] = []
        self.currentIndex = -1

    @property
    def count(self) -> int:
        return len(self.items)

    def addItem(self, text, data=None) -> None:
        self.items.append((text, data))
        if self.currentIndex < 0:
            self.currentIndex = 0

    def clear(self) -> None:
        self.items, self.currentIndex = [], -1

    def itemData(self, index):
        return self.items[index][1] if 0 <= index < len(self.items) else None

    def findData(self, data) -> int:
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def setCurrentIndex(self, index: int) -> None:
        self.currentIndex = index
        self.emit("currentIndexChanged(int)", index)

    @property
    def currentData(self):
        return self.itemData(self.currentIndex)


class FakeTimer(FakeSignalOwner):
    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def setInterval(self, milliseconds: int) -> None:
        self.interval = milliseconds

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def fire(self) -> None:
        self.emit("timeout()")


class FakeSettings:
    store: dict = {}

    def value(self, key):
        return self.store.get(key)

    def setValue(self, key, value) -> None:
        self.store[key] = value


def uiWidgets(uiFile: Path) -> types.SimpleNamespace:
    """One fake per widget named in the .ui file, of a kind that fits its class."""
    widgets = {}
    for element in ElementTree.parse(uiFile).iter("widget"):
        name, className = element.get("name"), element.get("class")
        widgets[name] = FakeComboBox(name, className) if className == "QComboBox" else FakeWidget(name, className)
    return types.SimpleNamespace(**widgets)


class Recorder:
    """What the fake dialogs were asked to show."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.sampleData: list[dict] = []


def install(monkeypatch, scene) -> Recorder:
    """Put the fakes into ``sys.modules`` and onto the real ``slicer`` package for one test."""
    import slicer
    import slicer.util

    recorder = Recorder()
    _VALUES.clear()  # a new scene: no parameters from an earlier test
    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    qt.QSettings = FakeSettings
    qt.QFileDialog = types.SimpleNamespace(getExistingDirectory=lambda *args: "")
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "ctk", types.ModuleType("ctk"))

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:  # Slicer shows a message box, then re-raises
            recorder.errors.append(f"{message} {exc}")
            raise

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", tryWithErrorDisplay, raising=False)
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext, raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: True, raising=False)
    monkeypatch.setattr(slicer.util, "mainWindow", lambda: None, raising=False)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: FakeWidget("MedSeg", "qMRMLWidget"), raising=False)
    monkeypatch.setattr(
        slicer.util, "childWidgetVariables", lambda widget: uiWidgets(Path(MODULE_DIR / "Resources/UI/MedSeg.ui"))
    )
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda *a: True, temporaryPath="/tmp"), False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(), raising=False)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            self.parent = parent or types.SimpleNamespace(isEntered=True)
            self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

        def setup(self) -> None:
            pass

        def resourcePath(self, relative: str) -> str:
            return str(MODULE_DIR / "Resources" / relative)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None) -> None:
            super().__init__()

        def getParameterNode(self):
            node = slicer.mrmlScene.GetFirstNodeByName("MedSeg")
            if node is None:
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MedSeg")
            return node

    class ScriptedLoadableModuleTest:
        def delayDisplay(self, message, msec=None) -> None:
            pass

        def assertEqual(self, a, b) -> None:
            assert a == b, (a, b)

        def assertIs(self, a, b) -> None:
            assert a is b

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic):
        setattr(scripted, cls.__name__, cls)
    scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = _parameterNodeWrapper
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    sampleData = types.ModuleType("SampleData")
    sampleData.SampleDataLogic = types.SimpleNamespace(
        registerCustomSampleDataSource=lambda **kwargs: recorder.sampleData.append(kwargs)
    )
    monkeypatch.setitem(sys.modules, "SampleData", sampleData)
    return recorder


MODULE_DIR = Path(__file__).resolve().parents[2] / "MedSegExtension"
_VALUES: dict[str, dict] = {}


def _parameterNodeWrapper(cls):
    """Attributes with the annotated defaults, stored in Python; changes fire the node's ModifiedEvent."""
    defaults = {name: getattr(cls, name, None) for name in cls.__annotations__}

    class Wrapper:
        def __init__(self, node) -> None:
            object.__setattr__(self, "parameterNode", node)
            # like Slicer's wrapper, the values live with the node: every wrapper of one node sees them
            object.__setattr__(self, "values", _VALUES.setdefault(node.GetID(), dict(defaults)))

        def __getattr__(self, name):
            values = object.__getattribute__(self, "values")
            if name in values:
                return values[name]
            raise AttributeError(name)

        def __setattr__(self, name, value) -> None:
            if name not in self.values:
                raise AttributeError(f"{cls.__name__} has no parameter {name}")
            self.values[name] = value
            self.parameterNode.Modified()

        def connectGui(self, ui):
            return "tag"

        def disconnectGui(self, tag) -> None:
            pass

        def AddObserver(self, event, method, priority=0.0):
            return self.parameterNode.AddObserver(event, method, priority)

        def RemoveObserver(self, tag) -> None:
            self.parameterNode.RemoveObserver(tag)

        def __hash__(self) -> int:
            return id(self.parameterNode)

        def __eq__(self, other) -> bool:
            return isinstance(other, Wrapper) and other.parameterNode is self.parameterNode

    Wrapper.__name__ = cls.__name__
    return Wrapper
