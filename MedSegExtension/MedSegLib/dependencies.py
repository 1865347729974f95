"""Which engine dependencies are missing inside Slicer, and the pip command that adds them safely.

Slicer ships its own numpy, SimpleITK and VTK; replacing them breaks Slicer. Installing MONAI and friends
therefore pins those packages to the versions already present with a pip constraints file. torch comes from
the PyTorch extension's installer when it is there (it picks the right CUDA build). Standard library only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Requirement:
    module: str  #: the import name
    requirement: str  #: what pip installs


#: What the engine needs beyond what Slicer ships (numpy, SimpleITK, VTK). torch first: the others need it.
ENGINE_REQUIREMENTS = (
    Requirement("torch", "torch>=2.1"),
    Requirement("monai", "monai>=1.4"),
    Requirement("scipy", "scipy"),
    Requirement("tqdm", "tqdm"),
    Requirement("einops", "einops"),
    Requirement("maxflow", "PyMaxflow"),
    Requirement("isal", "isal"),  # faster .nii.gz; the engine falls back to zlib without it
)

#: Distributions Slicer ships and pip must never replace.
PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "vtk")


def missingRequirements(findSpec: Callable[[str], object] = importlib.util.find_spec) -> list[Requirement]:
    """The engine requirements whose module cannot be imported here."""
    return [r for r in ENGINE_REQUIREMENTS if findSpec(r.module) is None]


def installedVersions(
    distributions=PROTECTED_DISTRIBUTIONS, version: Callable[[str], str] = importlib.metadata.version
) -> dict[str, str]:
    """Installed version of each distribution that has one (VTK in Slicer is not a pip distribution)."""
    versions = {}
    for name in distributions:
        try:
            versions[name] = version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def writeConstraints(path: Path, versions: dict[str, str]) -> Path:
    """A pip constraints file pinning each protected distribution to its installed version."""
    path.write_text("".join(f"{name}=={version}\n" for name, version in sorted(versions.items())), encoding="utf-8")
    return path


def pipArguments(requirements: list[Requirement], constraintsFile: Path) -> list[str]:
    """Arguments for ``pip install`` that add ``requirements`` without touching the protected packages."""
    return [r.requirement for r in requirements] + ["--constraint", str(constraintsFile)]
