"""Exceptions raised by the engine.

Every message is meant to be shown to a radiologist as it is: it names the file (or model) and says what is
wrong with it and, where possible, what to do.
"""

from __future__ import annotations

from pathlib import Path


class MedSegError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputImageError(MedSegError):
    """An input image is missing, unreadable, or unsuitable for segmentation."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        where = "input image" if path is None else f"{path}"
        super().__init__(f"{where}: {problem}")


class ModelNotFoundError(MedSegError):
    """No bundled or installed model has the requested id, and it is not a model folder."""


class ModelCardError(MedSegError):
    """A model folder's card (model.json) is invalid or does not match its weights."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class OutputError(MedSegError):
    """An output could not be written."""


class CancelledError(MedSegError):
    """The user cancelled the run; nothing was written."""

    def __init__(self) -> None:
        super().__init__("cancelled by the user; nothing was written")
