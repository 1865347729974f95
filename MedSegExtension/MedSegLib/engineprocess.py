"""The engine in a separate Python process: started, read without blocking, and killed with all its children.

Slicer stays responsive because the heavy work (torch, MONAI) never runs in its process: the module writes the
input to temporary files and runs ``python -m medseg segment ... --progress-json``. The engine prints one JSON
object per line on stdout (progress events, then the result) and its error message on stderr.

This file uses only the standard library, so it loads in Slicer before any engine dependency is installed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

ENGINE_PARENT_DIR = Path(__file__).resolve().parents[1]  # the folder holding the ``medseg`` package
ERROR_PREFIX = "medseg: error: "


def defaultPythonExecutable() -> str:
    """The Python that runs the engine: this one, or Slicer's ``PythonSlicer`` when running inside Slicer.

    Inside Slicer ``sys.executable`` is the Slicer application itself, which cannot run ``-m medseg``.
    """
    if Path(sys.executable).name.lower().startswith("python"):  # python3, python.exe, PythonSlicer
        return sys.executable
    return shutil.which("PythonSlicer") or sys.executable


class EngineProcess:
    """``python -m medseg <arguments>`` in its own process group.

    Two reader threads move stdout events and stderr lines into queues, so :meth:`events` never blocks: a GUI
    calls it from a timer, a script from a loop.

    Args:
        arguments: the arguments after ``python -m medseg``.
        pythonExecutable: the interpreter; default :func:`defaultPythonExecutable`.
        environment: extra environment variables for the engine.
    """

    def __init__(
        self,
        arguments: Sequence[str],
        *,
        pythonExecutable: str | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        env = dict(os.environ)
        env.update(environment or {})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ENGINE_PARENT_DIR), env.get("PYTHONPATH", "")) if p)
        env["PYTHONIOENCODING"] = "utf-8"
        command = [pythonExecutable or defaultPythonExecutable(), "-m", "medseg", *arguments]
        logger.info("starting the engine: %s", subprocess.list2cmdline(command))
        newGroup = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
            if sys.platform == "win32"
            else {"start_new_session": True}
        )
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env,
            **newGroup,
        )
        self._events: queue.Queue[dict] = queue.Queue()
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._readStdout, daemon=True),
            threading.Thread(target=self._readStderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.killed = False

    def _readStdout(self) -> None:
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                logger.info("engine: %s", line)
                continue
            if isinstance(event, dict):
                self._events.put(event)

    def _readStderr(self) -> None:
        for line in self.process.stderr:
            self._stderr.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.process.pid

    def events(self) -> list[dict]:
        """The events printed since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def returnCode(self) -> int | None:
        """None while running; the exit status once it ended and its output has been read."""
        code = self.process.poll()
        if code is None:
            return None
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def wait(self, timeout: float | None = None) -> int:
        self.process.wait(timeout)
        return self.returnCode()

    def errorMessage(self) -> str:
        """The engine's own explanation of a failure: its ``medseg: error:`` line, else the end of stderr."""
        for line in reversed(self._stderr):
            if line.startswith(ERROR_PREFIX):
                return line[len(ERROR_PREFIX) :]
        tail = [line for line in self._stderr if line.strip()][-15:]
        if tail:
            return "\n".join(tail)
        return f"the engine stopped with exit status {self.process.returncode}"

    def kill(self) -> None:
        """End the engine and every process it started (its whole process group or tree)."""
        if self.process.poll() is not None:
            return
        self.killed = True
        if sys.platform == "win32":
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
