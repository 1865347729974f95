"""Which engine dependencies are missing inside Slicer, and the pip command that adds them safely.

Slicer ships its own numpy, SimpleITK and VTK; replacing them breaks Slicer. Installing MONAI and friends
therefore pins those packages to the versions already present with a pip constraints file. torch comes from
the PyTorch extension's installer when it is there (it picks the right CUDA build); a torch already installed is
pinned too, since MONAI's newest release would otherwise pull PyPI's newest torch (a multi-GB CUDA build on Linux)
over it, and one too old for MedSeg is reported, not upgraded. Standard library only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Requirement:
    module: str  #: the import name
    requirement: str  #: what pip installs


#: The oldest torch MedSeg supports (pyproject.toml's floor): MONAI 1.6 requires torch>=2.8.
TORCH_MINIMUM = (2, 8)

#: What the engine needs beyond what Slicer ships (numpy, SimpleITK, VTK). torch first: the others need it.
ENGINE_REQUIREMENTS = (
    Requirement("torch", "torch>={}.{}".format(*TORCH_MINIMUM)),
    Requirement("monai", "monai>=1.4"),
    Requirement("scipy", "scipy"),
    Requirement("tqdm", "tqdm"),
    Requirement("einops", "einops"),
    Requirement("maxflow", "PyMaxflow"),
    Requirement("isal", "isal"),  # faster .nii.gz; the engine falls back to zlib without it
)

#: Distributions Slicer ships and pip must never replace.
PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "vtk")
#: Pinned too when installed: pip must not swap the torch build the PyTorch extension (or the user) chose.
PINNED_DISTRIBUTIONS = (*PROTECTED_DISTRIBUTIONS, "torch")


def missingRequirements(findSpec: Callable[[str], object] = importlib.util.find_spec) -> list[Requirement]:
    """The engine requirements whose module cannot be imported here."""
    return [r for r in ENGINE_REQUIREMENTS if findSpec(r.module) is None]


def installedVersions(
    distributions=PINNED_DISTRIBUTIONS, version: Callable[[str], str] = importlib.metadata.version
) -> dict[str, str]:
    """Installed version of each distribution that has one (VTK in Slicer is not a pip distribution)."""
    versions = {}
    for name in distributions:
        try:
            versions[name] = version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def outdatedTorch(version: Callable[[str], str] = importlib.metadata.version) -> str | None:
    """Why the installed torch is too old for MedSeg, to show as it is; None when it is new enough or absent.

    MedSeg never upgrades an installed torch itself: the build (CPU, or the CUDA version for the GPU) is the user's
    or the PyTorch extension's choice.
    """
    try:
        installed = version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    match = re.match(r"(\d+)\.(\d+)", installed)
    if match is None or (int(match[1]), int(match[2])) >= TORCH_MINIMUM:
        return None
    needed = next(r.requirement for r in ENGINE_REQUIREMENTS if r.module == "torch")
    return (
        f"torch {installed} is installed, but MedSeg needs {needed} (MONAI needs it too). MedSeg does not replace "
        "it, so that the build for your GPU is kept: update torch with the PyTorch extension (PyTorch Utils module) "
        "or with pip, restart Slicer, and try again."
    )


def writeConstraints(path: Path, versions: dict[str, str]) -> Path:
    """A pip constraints file pinning each pinned distribution (Slicer's own, and torch) to its installed version."""
    path.write_text("".join(f"{name}=={version}\n" for name, version in sorted(versions.items())), encoding="utf-8")
    return path


def pipArguments(requirements: list[Requirement], constraintsFile: Path) -> list[str]:
    """Arguments for ``pip install`` that add ``requirements`` without touching the pinned packages."""
    return [r.requirement for r in requirements] + ["--constraint", str(constraintsFile)]
