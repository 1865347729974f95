"""The engine's process as the Slicer module drives it (MedSegLib.engineprocess): real processes, real pipes.

Most tests start a small shell launcher in place of the Python interpreter (``EngineProcess`` runs
``<interpreter> -m medseg ...``; the launcher ignores those arguments) so that an engine can end in a chosen way.
POSIX only: the launchers are shell scripts, and the process checks read /proc.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from helpers import process_gone, shell_launcher
from medseg import io
from MedSegLib import engineprocess
from MedSegLib.engineprocess import EngineProcess

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not Path("/proc").is_dir(), reason="POSIX with /proc")


def launcher(folder: Path, script: str) -> str:
    return shell_launcher(folder / "engine.sh", script)


@pytest.mark.parametrize(
    "script, expected",
    [
        # the engine's own error, of several lines, after its log
        (
            "echo 'INFO loading' >&2; printf 'medseg: error: model.pt: not a checkpoint\\n  (truncated)\\n' >&2; "
            "exit 1",
            "model.pt: not a checkpoint\n  (truncated)",
        ),
        # its argument parser's, after the usage lines
        (
            "echo 'usage: medseg segment [-h] ...' >&2; echo 'medseg segment: error: unrecognized arguments: --x' "
            ">&2; exit 2",
            "unrecognized arguments: --x",
        ),
        # no error line: how it ended, then its last messages (a warning alone would mislead)
        (
            "echo 'WARNING GPU out of memory; retrying on the CPU' >&2; exit 7",
            "the engine stopped with exit status 7; its last messages:\nWARNING GPU out of memory; retrying on the CPU",
        ),
        (
            "echo 'WARNING GPU out of memory; retrying on the CPU' >&2; kill -9 $$",
            "the engine was stopped by signal SIGKILL; its last messages:\nWARNING GPU out of memory; retrying on "
            "the CPU",
        ),
        ("exit 5", "the engine stopped with exit status 5"),
    ],
)
def test_the_error_message_is_the_engines_own_or_says_how_it_ended(tmp_path, script, expected):
    engine = EngineProcess(["segment"], pythonExecutable=launcher(tmp_path, script))
    assert engine.wait(timeout=30) != 0
    assert engine.errorMessage() == expected


def test_a_child_left_running_by_the_engine_is_ended_and_does_not_hold_the_caller(tmp_path):
    """A child that outlives the engine holds its output pipes: reading them to the end waited 5 s per stream, on
    every call, in Slicer's main thread, and the child lived on. It is ended with the engine's group."""
    pid_file = tmp_path / "child.pid"
    engine = EngineProcess(
        ["segment"], pythonExecutable=launcher(tmp_path, f'sleep 300 & echo $! > "{pid_file}"; exit 0')
    )
    start = time.monotonic()
    assert engine.wait(timeout=30) == 0
    assert engine.returnCode() == 0 and time.monotonic() - start < 4
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not process_gone(child):
        assert time.monotonic() < deadline, "the engine's child is still running"
        time.sleep(0.05)


def test_kill_survives_a_refused_group_signal_and_still_waits(tmp_path, monkeypatch):
    """macOS refuses to signal a group whose only member is an unreaped zombie (EPERM): an engine ending just as
    the user cancels. kill() raised, and the job's clean-up and the GUI's reset never ran."""
    engine = EngineProcess(["segment"], pythonExecutable=launcher(tmp_path, "sleep 0.3; exit 0"))

    def refuse(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "killpg", refuse)
    engine.kill()
    assert engine.returnCode() == 0 and engine.killed


def test_the_engine_stops_when_its_stdin_closes_as_when_slicer_crashes(tmp_path, tiny_model, blob_image):
    """An engine outlived a crashed Slicer and held the GPU. With --exit-with-stdin (the module passes it) it stops
    when the pipe it reads closes, which happens when its parent dies; nothing is written."""
    image = io.write_image(blob_image, tmp_path / "scan.nii.gz")
    output = tmp_path / "labels.nii.gz"
    arguments = ["segment", str(image), "-o", str(output), "--model", str(tiny_model), "--progress-json"]
    engine = EngineProcess([*arguments, "--exit-with-stdin"], pythonExecutable=sys.executable)
    engine.process.stdin.close()  # what the parent's death does to the pipe
    assert engine.wait(timeout=120) == 3
    assert "the program that started the engine has gone" in engine.errorMessage()
    assert not output.exists()
    # with the pipe open it runs to the end and exits cleanly (a watcher blocked in sys.stdin's read made the
    # interpreter abort at exit, holding its buffer's lock)
    done = EngineProcess([*arguments, "--exit-with-stdin"], pythonExecutable=sys.executable)
    assert done.wait(timeout=120) == 0, done.errorMessage()
    assert output.exists()
    assert not any("Fatal Python error" in line for line in done._stderr)


def test_a_cancel_ends_the_engine_group_with_sigkill(tmp_path):
    engine = EngineProcess(["segment"], pythonExecutable=launcher(tmp_path, "sleep 300"))
    time.sleep(0.2)
    engine.kill()
    assert engine.killed and engine.returnCode() == -signal.SIGKILL
    assert engineprocess.ERROR_LINE.match("medseg: error: x") and engineprocess.ERROR_LINE.match(
        "medseg refine: error: x"
    )


def test_the_engine_keeps_the_end_of_a_long_log_and_finds_the_error_in_it(tmp_path):
    script = "seq 1 50000 >&2; echo 'medseg: error: the last word' >&2; exit 1"
    engine = EngineProcess(["segment"], pythonExecutable=launcher(tmp_path, script))
    assert engine.wait(timeout=60) == 1
    assert len(engine._stderr) == engineprocess.STDERR_LINES_KEPT
    assert engine.errorMessage() == "the last word"


def test_inside_slicer_the_engine_runs_in_the_pythonslicer_beside_the_application(tmp_path, monkeypatch):
    """Inside Slicer sys.executable is the application (bin/SlicerApp-real); its PythonSlicer is beside it."""
    application = tmp_path / "bin" / "SlicerApp-real"
    application.parent.mkdir()
    application.write_text("")
    monkeypatch.setattr(sys, "executable", str(application))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="PythonSlicer is neither beside it nor on the PATH"):
        engineprocess.defaultPythonExecutable()
    (application.parent / "PythonSlicer").write_text("")
    assert engineprocess.defaultPythonExecutable() == str(application.parent / "PythonSlicer")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3.11"))  # a plain Python runs the engine itself
    assert engineprocess.defaultPythonExecutable() == str(tmp_path / "python3.11")
