"""Progress reporting and cancellation, passed down as plain callables so no stage knows about a GUI."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import CancelledError

#: ``progress(stage, fraction)``: ``stage`` is a short human-readable step name, ``fraction`` in [0, 1] of it.
ProgressCallback = Callable[[str, float], None]


@dataclass
class RunControl:
    """Carries a progress callback and a cancel flag through a run."""

    progress: ProgressCallback | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def report(self, stage: str, fraction: float) -> None:
        self.check()
        if self.progress is not None:
            self.progress(stage, min(max(fraction, 0.0), 1.0))

    def cancel(self) -> None:
        self.cancel_event.set()

    def check(self) -> None:
        """Raise :class:`CancelledError` if cancellation was requested."""
        if self.cancel_event.is_set():
            raise CancelledError()
