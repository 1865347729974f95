"""Finding models: bundled with MedSeg, installed by the user, or given as a folder path.

Search order for a model id (first match wins):

1. folders listed in ``MEDSEG_MODEL_PATH`` (separated like ``PATH``), each holding model folders;
2. the user's model folder, ``$MEDSEG_HOME/models`` (default ``~/.medseg/models``);
3. the models bundled with MedSeg (``Resources/Models`` of the source tree or extension, or the installed
   ``medseg_resources`` package).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MedSegError, ModelNotFoundError
from .card import CARD_FILE, ModelCard, read_card

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "hippocampus-mri"


def resources_dir() -> Path | None:
    """The folder holding ``Models/`` and ``SampleData/``: the Slicer extension's, the source tree's, or pip's."""
    here = Path(__file__).resolve()
    # In an installed Slicer extension the engine sits beside MedSeg.py and the models in its Resources/;
    # in the source tree they are in the repository's top-level Resources/.
    for candidate in (here.parents[2] / "Resources", here.parents[3] / "Resources"):
        if (candidate / "Models").is_dir():
            return candidate
    spec = importlib.util.find_spec("medseg_resources")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return None


def medseg_home() -> Path:
    return Path(os.environ.get("MEDSEG_HOME", Path.home() / ".medseg"))


def search_paths() -> list[tuple[str, Path]]:
    """(source, folder) pairs searched for model folders, in priority order."""
    paths: list[tuple[str, Path]] = []
    for entry in os.environ.get("MEDSEG_MODEL_PATH", "").split(os.pathsep):
        if entry:
            paths.append(("MEDSEG_MODEL_PATH", Path(entry)))
    paths.append(("user", medseg_home() / "models"))
    resources = resources_dir()
    if resources is not None:
        paths.append(("bundled", resources / "Models"))
    return paths


@dataclass(frozen=True)
class ModelEntry:
    """A model folder found on the search path. ``card`` is None and ``problem`` says why when it is broken."""

    folder: Path
    source: str
    card: ModelCard | None
    problem: str | None = None


def list_models() -> list[ModelEntry]:
    """Every model folder on the search path, valid or not; an id found twice is listed where it wins."""
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    for source, root in search_paths():
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if (p / CARD_FILE).is_file()):
            try:
                card = read_card(folder)
            except MedSegError as exc:
                entries.append(ModelEntry(folder=folder, source=source, card=None, problem=str(exc)))
                continue
            if card.id in seen:
                continue
            seen.add(card.id)
            entries.append(ModelEntry(folder=folder, source=source, card=card))
    return entries


def find_model_folder(model: str | os.PathLike[str] | None) -> Path:
    """Resolve a model id or folder path to a model folder.

    Args:
        model: a model id (``hippocampus-mri``), a path to a model folder, or None for the default model.

    Raises:
        ModelNotFoundError: no such folder and no model with that id, listing the ids that exist.
    """
    model = DEFAULT_MODEL_ID if model is None else model
    as_path = Path(model)
    if as_path.is_dir():
        return as_path
    if os.sep in str(model) or str(model).startswith("."):
        raise ModelNotFoundError(f"model folder {model} does not exist")
    for entry in list_models():
        if entry.card is not None and entry.card.id == str(model):
            return entry.folder
    known = sorted(e.card.id for e in list_models() if e.card is not None)
    searched = ", ".join(str(p) for _, p in search_paths())
    raise ModelNotFoundError(
        f"unknown model {model!r}; available: {', '.join(known) or 'none'} (searched {searched}); "
        "give a model id from 'medseg models' or the path of a model folder"
    )
