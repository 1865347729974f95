"""Finding models: bundled with MedSeg, installed by the user, or given as a folder path.

Search order for a model id (first match wins):

1. folders listed in ``MEDSEG_MODEL_PATH`` (separated like ``PATH``), each holding model folders;
2. the user's model folder, ``$MEDSEG_HOME/models`` (default ``~/.medseg/models``);
3. the models bundled with MedSeg (``Resources/Models`` of the source tree or extension, or the installed
   ``medseg_resources`` package).

Within the first folder that has the id, it must be unique: two model folders there whose cards give one id are
refused, not chosen between, and so is a model folder named after the id whose card is broken (rather than
falling through to an older model of that id further down).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MedSegError, ModelCardError, ModelNotFoundError
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


def _model_folders(root: Path) -> list[Path]:
    """The folders directly under ``root`` that hold a card, by name; none when ``root`` is not a folder."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / CARD_FILE).is_file())


def list_models() -> list[ModelEntry]:
    """Every model folder on the search path, valid or not; an id found twice is listed where it wins."""
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    for source, root in search_paths():
        for folder in _model_folders(root):
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
        model: a model id (``hippocampus-mri``), a path to a model folder, or None for the default model. A
            string is a path when it holds a path separator or starts with ``.`` or ``~``, or when it names a
            folder that holds a model card; else it is an id, even where a folder of that name (an earlier run's
            output, say) lies in the current directory.

    Raises:
        ModelNotFoundError: no such folder and no model with that id, listing the ids that exist.
        ModelCardError: the id is given by two model folders in one search folder, or its model folder (named
            after it) has a broken card.
    """
    model = DEFAULT_MODEL_ID if model is None else model
    text = os.fspath(model)
    as_path = Path(text).expanduser()
    separators = [s for s in (os.sep, os.altsep) if s]
    if isinstance(model, os.PathLike) or any(s in text for s in separators) or text.startswith((".", "~")):
        if as_path.is_dir():
            return as_path
        raise ModelNotFoundError(f"model folder {model} does not exist")
    if (as_path / CARD_FILE).is_file():
        return as_path
    for _, root in search_paths():
        found = _folder_for_id(root, text)
        if found is not None:
            return found
    known = sorted(e.card.id for e in list_models() if e.card is not None)
    searched = ", ".join(str(p) for _, p in search_paths())
    raise ModelNotFoundError(
        f"unknown model {model!r}; available: {', '.join(known) or 'none'} (searched {searched}); "
        "give a model id from 'medseg models' or the path of a model folder"
    )


def _folder_for_id(root: Path, model_id: str) -> Path | None:
    """The folder under ``root`` whose card gives ``model_id``, or None.

    Raises:
        ModelCardError: two folders give the id, or the folder named after it has a broken card.
    """
    matches: list[Path] = []
    for folder in _model_folders(root):
        try:
            card = read_card(folder)
        except MedSegError as exc:
            if folder.name == model_id:  # most likely the model asked for, and a newer one than any further down
                raise exc from None
            continue
        if card.id == model_id:
            matches.append(folder)
    if len(matches) > 1:
        raise ModelCardError(
            matches[1] / CARD_FILE,
            f"field 'id' is {model_id!r}, like {matches[0] / CARD_FILE}; two model folders in {root} give one id, "
            "so it is not clear which to run. Remove one, or give one another id",
        )
    return matches[0] if matches else None
