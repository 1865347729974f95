"""The engine must stay Slicer-free: no module under MedSegExtension/medseg imports slicer, qt, ctk or vtk."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "MedSegExtension" / "medseg"
FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "MedSegLib", "PythonQt", "slicer_core"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            for arg in node.args[:1]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    roots.add(arg.value.split(".")[0])
    return roots


def test_engine_modules_import_no_gui_or_slicer_package():
    files = sorted(ENGINE.rglob("*.py"))
    assert len(files) >= 10, f"expected the engine's modules under {ENGINE}"
    offenders = {}
    for path in files:
        bad = imported_roots(path) & FORBIDDEN
        # The .seg.nrrd writer is Slicer's own, reached only through this one lazy, documented hook.
        if path.name == "segmenter.py":
            bad -= {"MedSegLib"}
        if bad:
            offenders[str(path.relative_to(ENGINE))] = sorted(bad)
    assert offenders == {}


def test_checker_catches_a_forbidden_import(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import os\nfrom vtk.util import numpy_support\nimport importlib\nimportlib.import_module('qt')\n"
    )
    assert imported_roots(sample) & FORBIDDEN == {"vtk", "qt"}


def test_running_the_engine_loads_no_slicer_or_vtk(tmp_path, tiny_model):
    code = (
        "import sys, SimpleITK as sitk, numpy as np\n"
        "from medseg.segmenter import Segmenter\n"
        "img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(12, 12, 12)).astype('float32'))\n"
        f"Segmenter(r'{tiny_model}', device='cpu').segment(img)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'slicer', 'vtk', 'vtkmodules', 'qt', 'ctk'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
