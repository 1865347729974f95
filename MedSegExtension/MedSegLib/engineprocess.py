"""The engine in a separate Python process: started, read without blocking, and killed with all its children.

Slicer stays responsive because the heavy work (torch, MONAI) never runs in its process: the module writes the
input to temporary files and runs ``python -m medseg segment ... --progress-json``. The engine prints one JSON
object per line on stdout (progress events, then the result) and its error message on stderr.

This file uses only the standard library, so it loads in Slicer before any engine dependency is installed.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

ENGINE_PARENT_DIR = Path(__file__).resolve().parents[1]  # the folder holding the ``medseg`` package
#: the engine's error line: its own (``medseg: error:``) or its argument parser's (``medseg segment: error:``)
ERROR_LINE = re.compile(r"^medseg(?: [a-z]+)?: error: ")
#: how long a killed engine may take to end on Windows before it is terminated directly
KILL_WAIT_SECONDS = 10.0
#: the engine's last stderr lines kept for its error message (its log can be long; its error comes last)
STDERR_LINES_KEPT = 2000


def defaultPythonExecutable() -> str:
    """The Python that runs the engine: this one, or Slicer's ``PythonSlicer`` when running inside Slicer.

    Inside Slicer ``sys.executable`` is the Slicer application itself, which cannot run ``-m medseg``; its
    ``PythonSlicer`` is in the same folder (``bin``) in Slicer's installations, else on the PATH.
    """
    executable = Path(sys.executable)
    if executable.name.lower().startswith("python"):  # python3, python.exe, PythonSlicer
        return sys.executable
    for name in ("PythonSlicer.exe", "PythonSlicer") if sys.platform == "win32" else ("PythonSlicer",):
        beside = executable.with_name(name)
        if beside.is_file():
            return str(beside)
    found = shutil.which("PythonSlicer")
    if found is None:
        raise FileNotFoundError(
            f"no Python to run the MedSeg engine: {executable} is not one, and PythonSlicer is neither beside it "
            "nor on the PATH"
        )
    return found


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
        quoted = subprocess.list2cmdline(command) if sys.platform == "win32" else shlex.join(command)
        logger.info("starting the engine: %s", quoted)
        # Windows: no console window for the console program (Slicer is a GUI; closing that window killed the run)
        newGroup = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
            if sys.platform == "win32"
            else {"start_new_session": True}
        )
        # stdin is a pipe held open for the engine's life: an engine started with --exit-with-stdin stops when it
        # closes, as it does when this process crashes or is killed
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env,
            **newGroup,
        )
        self._events: queue.Queue[dict] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)  # a long run's log
        self._readers = [
            threading.Thread(target=self._readStdout, daemon=True),
            threading.Thread(target=self._readStderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.killed = False
        self._ended = False  # the engine's end was handled: its group swept, its output read

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
        """None while running; the exit status once it ended (its output read, waiting up to 5 s per stream)."""
        code = self.process.poll()
        if code is None:
            return None
        self._end()
        return code

    def wait(self, timeout: float | None = None) -> int:
        self.process.wait(timeout)
        return self.returnCode()

    def _end(self) -> None:
        """Once the engine has ended: end what it left running in its group (a child holding its output pipes would
        keep the readers, and any later call, waiting), read its output, close its pipes."""
        if self._ended:
            return
        self._ended = True
        self._killGroup()
        for reader in self._readers:
            reader.join(timeout=5)
        streams = [self.process.stdin]  # and each output stream its reader has finished with
        streams += [
            stream
            for stream, reader in zip((self.process.stdout, self.process.stderr), self._readers)
            if not reader.is_alive()
        ]
        for stream in streams:
            try:
                stream.close()
            except OSError:  # a broken pipe on flushing stdin: nothing was written to it
                pass

    def _killGroup(self) -> None:
        """POSIX: SIGKILL to the engine's process group (the engine and what it started); nothing left is fine."""
        if sys.platform == "win32":
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:  # ProcessLookupError: none left; PermissionError: macOS, for a group of one zombie
            pass

    def errorMessage(self) -> str:
        """The engine's own explanation of a failure: its error line and what follows it (a message of several
        lines); else how it ended and the end of its stderr."""
        lines = list(self._stderr)
        for index in range(len(lines) - 1, -1, -1):
            match = ERROR_LINE.match(lines[index])
            if match:
                rest = [line for line in lines[index + 1 :] if line.strip()]
                return "\n".join([lines[index][match.end() :], *rest])
        code = self.process.returncode
        if code is not None and code < 0:
            try:
                how = f"the engine was stopped by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"the engine was stopped by signal {-code}"
        else:
            how = f"the engine stopped with exit status {code}"
        tail = [line for line in lines if line.strip()][-15:]
        return "\n".join([f"{how}; its last messages:", *tail]) if tail else how

    def kill(self) -> None:
        """End the engine and every process it started (its whole process group or tree)."""
        if self.process.poll() is not None:
            self._end()  # ended meanwhile: what it left running goes all the same
            return
        self.killed = True
        if sys.platform == "win32":
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
                creationflags=subprocess.CREATE_NO_WINDOW,
            )
            try:
                self.process.wait(KILL_WAIT_SECONDS)
            except subprocess.TimeoutExpired:  # taskkill refused or missed it: terminate it directly
                self.process.kill()
        else:
            self._killGroup()
        self.process.wait()
        self._end()
