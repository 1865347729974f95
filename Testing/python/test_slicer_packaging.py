"""What would break in Slicer, checked without Slicer: .ui names, CMake lists, the catalog entry, load-time imports.

3D Slicer cannot be installed here, so these tests read MedSeg.py, the .ui and the CMake files as text and as
Python syntax trees. Nothing here fakes Slicer.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from medseg.models.card import read_card
from MedSegLib import dependencies

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MedSegExtension"
MODULE_FILE = MODULE_DIR / "MedSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedSeg.ui"
ENGINE_DEPENDENCIES = {"torch", "monai", "scipy", "tqdm", "einops", "maxflow", "isal"}


def ui_widgets() -> dict[str, ElementTree.Element]:
    return {w.get("name"): w for w in ElementTree.parse(UI_FILE).iter("widget")}


def cmake_list(path: Path, variable: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{path.name} sets no {variable}"
    return [item.replace("${MODULE_NAME}", "MedSeg") for item in match.group(1).split()]


def test_every_ui_name_the_module_uses_exists_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert len(used) > 15
    assert used - set(ui_widgets()) == set()


def parameter_fields() -> dict[str, str]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedSegParameterNode")
    return {n.target.id: ast.unparse(n.annotation) for n in wrapper.body if isinstance(n, ast.AnnAssign)}


def test_ui_parameter_bindings_name_wrapper_fields_of_the_right_widgets():
    fields = parameter_fields()
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert set(bound.values()) <= set(fields), set(bound.values()) - set(fields)
    assert len(bound) == 10
    for name, parameter in bound.items():
        widget = ui_widgets()[name]
        if fields[parameter] == "float":  # a number: bound to a slider
            assert widget.get("class") == "ctkSliderWidget", name
            continue
        if fields[parameter] == "bool":  # a switch: bound to a check box
            assert widget.get("class") == "QCheckBox", name
            continue
        assert widget.get("class") == "qMRMLNodeComboBox"
        node_types = [s.text for s in widget.find("property[@name='nodeTypes']").iter("string")]
        assert node_types == [fields[parameter]], (name, node_types, fields[parameter])


def test_ui_connections_reach_existing_widgets():
    root = ElementTree.parse(UI_FILE).getroot()
    names = set(ui_widgets())
    receivers = [c.find("receiver").text for c in root.iter("connection")]
    assert len(receivers) == 6 and set(receivers) <= names


def test_every_module_file_is_listed_in_the_module_cmake_file():
    cmake = MODULE_DIR / "CMakeLists.txt"
    scripts = cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")
    on_disk = sorted(str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(scripts) == on_disk
    resources = cmake_list(cmake, "MODULE_PYTHON_RESOURCES")
    resource_files = sorted(
        str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()
    )
    assert sorted(resources) == resource_files


def test_bundled_models_and_sample_are_installed_with_the_module():
    listed = cmake_list(MODULE_DIR / "CMakeLists.txt", "MODULE_BUNDLED_RESOURCES")
    for item in listed:
        assert (REPO / "Resources" / item).is_file(), item
    for folder in sorted((REPO / "Resources" / "Models").iterdir()):
        if folder.is_dir():
            card = read_card(folder)
            assert f"Models/{folder.name}/model.json" in listed
            assert f"Models/{folder.name}/{card.weights_file}" in listed
    assert "SampleData/hippocampus-mni152-t1.nii.gz" in listed


def test_cmake_files_build_a_scripted_module_with_its_tests_and_metadata():
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "CATEGORY"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', top), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "find_package(Slicer REQUIRED)" in top and "add_subdirectory(MedSegExtension)" in top
    module = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS", module, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
    icon_url = re.search(r'EXTENSION_ICONURL "([^"]+)"', top).group(1)
    assert icon_url.endswith("/main/MedSegExtension/Resources/Icons/MedSeg.png")


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "MedSeg.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_catalog_entry_has_exactly_the_schema_fields():
    entry = json.loads((REPO / "MedSeg.json").read_text(encoding="utf-8"))
    allowed = {"$schema", "category", "scm_url", "scm_revision", "build_dependencies", "build_subdirectory", "tier"}
    assert set(entry) == allowed
    assert entry["$schema"] == (
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
    )
    assert entry["build_dependencies"] == ["PyTorch"] and entry["tier"] in (1, 3, 5)
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    homepage = re.search(r'EXTENSION_HOMEPAGE "([^"]+)"', top).group(1)
    assert entry["scm_url"].removesuffix(".git") == homepage
    assert entry["category"] == re.search(r'EXTENSION_CATEGORY "([^"]+)"', top).group(1)


def module_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported: top-level statements only (not inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                package = path.parent.relative_to(MODULE_DIR).as_posix().replace("/", ".")
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module)
    return names


def source_of(module: str) -> Path | None:
    candidate = MODULE_DIR / Path(*module.split("."))
    for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
        if path.is_file():
            return path
    return None


def test_the_module_imports_no_engine_dependency_when_slicer_loads_it():
    seen: set[str] = set()
    third_party: set[str] = set()
    pending = [MODULE_FILE]
    while pending:
        path = pending.pop()
        for module in module_level_imports(path):
            parts = module.split(".")
            own = [source_of(".".join(parts[: i + 1])) for i in range(len(parts))]
            if any(own):
                for source in filter(None, own):
                    if str(source) not in seen:
                        seen.add(str(source))
                        pending.append(source)
            else:
                third_party.add(parts[0])
    assert "MedSegLib/logic.py" in {str(Path(p).relative_to(MODULE_DIR)) for p in seen}
    assert third_party & ENGINE_DEPENDENCIES == set(), third_party
    assert third_party <= {"slicer", "qt", "ctk", "vtk", "numpy", "SimpleITK"} | set(sys.stdlib_module_names)


def test_module_libraries_import_with_the_engine_dependencies_missing():
    """Run the imports in a Python where torch, MONAI, scipy, tqdm and einops cannot be imported."""
    blocker = f"""
import importlib.abc, importlib.machinery, sys
class Missing(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError("not installed: " + spec.name)
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(ENGINE_DEPENDENCIES)!r}:
            return importlib.machinery.ModuleSpec(name, Missing())
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(MODULE_DIR)!r})
import MedSegLib.logic, MedSegLib.dependencies, MedSegLib.engineprocess, MedSegLib.selftest, MedSegLib.batch
from MedSegLib.logic import MedSegLogic
import slicer
logic = MedSegLogic(slicer.vtkMRMLScene())
print(sorted(e.card.id for e in logic.models() if e.card))
try:
    import torch
except ImportError as exc:
    print("blocked:", exc)
"""
    pytest.importorskip("slicer", reason="needs slicer-core")
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, encoding="utf-8")
    assert done.returncode == 0, done.stderr
    assert "['hippocampus-mri']" in done.stdout and "blocked: not installed: torch" in done.stdout


def test_missing_dependencies_are_found_and_installed_without_touching_slicers_own(tmp_path):
    present = {"scipy", "tqdm"}
    missing = dependencies.missingRequirements(findSpec=lambda name: object() if name in present else None)
    assert [r.module for r in missing] == ["torch", "monai", "einops", "maxflow", "isal"]

    def version(name: str) -> str:
        if name in ("vtk", "torch"):  # inside Slicer VTK is not a pip distribution; torch is missing here
            raise dependencies.importlib.metadata.PackageNotFoundError(name)
        return {"numpy": "1.26.4", "SimpleITK": "2.3.1"}[name]

    versions = dependencies.installedVersions(version=version)
    assert versions == {"numpy": "1.26.4", "SimpleITK": "2.3.1"}
    constraints = dependencies.writeConstraints(tmp_path / "c.txt", versions)
    assert constraints.read_text(encoding="utf-8") == "SimpleITK==2.3.1\nnumpy==1.26.4\n"
    arguments = dependencies.pipArguments(missing[1:], constraints)
    assert arguments == ["monai>=1.4", "einops", "PyMaxflow", "isal", "--constraint", str(constraints)]
    assert not any(a.split("=")[0].split(">")[0] in ("numpy", "SimpleITK", "vtk") for a in arguments)


def test_an_installed_torch_is_pinned_and_one_too_old_is_reported_not_upgraded(tmp_path):
    """MONAI 1.6 needs torch>=2.8: unpinned, installing it would pull PyPI's newest torch over the chosen build."""
    installed = {"numpy": "1.26.4", "SimpleITK": "2.3.1", "torch": "2.4.1+cu121"}

    def version(name: str) -> str:
        if name not in installed:
            raise dependencies.importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    constraints = dependencies.writeConstraints(tmp_path / "c.txt", dependencies.installedVersions(version=version))
    assert "torch==2.4.1+cu121\n" in constraints.read_text(encoding="utf-8")
    message = dependencies.outdatedTorch(version=version)
    assert message and "torch 2.4.1+cu121 is installed" in message and "torch>=2.8" in message
    for new_enough in ("2.8.0", "2.13.0+cpu", "3.0.0"):
        installed["torch"] = new_enough
        assert dependencies.outdatedTorch(version=version) is None
    del installed["torch"]
    assert dependencies.outdatedTorch(version=version) is None  # absent: installed by the PyTorch extension
    assert "torch" not in dependencies.installedVersions(version=version)


def test_the_torch_floor_is_the_same_in_pyproject_and_in_slicer():
    declared = re.findall(r'"torch(>=[0-9.]+)"', (REPO / "pyproject.toml").read_text(encoding="utf-8"))
    slicer_requirement = next(r.requirement for r in dependencies.ENGINE_REQUIREMENTS if r.module == "torch")
    assert declared == [">=2.8"] and slicer_requirement == "torch>=2.8"


def make_dry_run(*arguments: str) -> str:
    """What ``make`` would run (``-n``: nothing is run), also under ``make test`` (no sub-make flags, no banners)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    command = ["make", "-n", "--no-print-directory", *arguments]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return "\n".join(" ".join(line.split()) for line in done.stdout.splitlines())


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_installs_torch_alone_from_torch_index_and_cleans_only_its_own_environment(tmp_path):
    env = tmp_path / "env"  # an environment of the user's: never the default .venv
    default = make_dry_run("setup", f"VENV={env}")
    assert "index-url" not in default and '-m pip install --quiet "torch==2.13.0"' in default
    index = "https://download.pytorch.org/whl/cpu"
    indexed = make_dry_run("setup", f"VENV={env}", f"TORCH_INDEX={index}").splitlines()
    assert [line for line in indexed if "index-url" in line] == [
        next(line for line in indexed if '"torch==2.13.0"' in line)
    ]
    assert f'--index-url "{index}" "torch==2.13.0"' in "\n".join(indexed)
    clean = make_dry_run("clean", f"VENV={env}")
    assert "rm -rf .venv " in clean and f"rm -rf {env}" not in clean
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split()
    assert [target for target in phony if not re.search(rf"^{target}:", makefile, re.M)] == []


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_hippocampus_reproduces_the_bundled_model_under_runs_not_into_resources():
    command = make_dry_run("train-hippocampus", "VENV=/nonexistent-env").strip().splitlines()[-1]
    card = read_card(REPO / "Resources" / "Models" / "hippocampus-mri")
    made_by = card.training["command"].removesuffix(" (fold 0)").removeprefix("python ")
    assert made_by in command and command.endswith("--tta --ship --weights int8") and "Resources" not in command
    config = json.loads((REPO / "training" / "configs" / "hippocampus-dynunet-cpu.json").read_text(encoding="utf-8"))
    assert config["output"].startswith("runs/") and config["card"]["version"] == card.version


def test_nothing_missing_in_this_environment():
    assert dependencies.missingRequirements() == []


@pytest.mark.parametrize("name", ["MedSegTest"])
def test_self_test_runs_the_real_logic_and_is_not_switched_off(name):
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    source = ast.unparse(test_class)
    run_test = next(n for n in test_class.body if isinstance(n, ast.FunctionDef) and n.name == "runTest")
    called = {c.func.attr for c in ast.walk(run_test) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)}
    assert {"test_SegmentBundledSample", "test_RerunUpdatesInPlace"} <= called
    assert "runSampleCheck" in source and ".segment(" in source and "testLogic = False" not in source
