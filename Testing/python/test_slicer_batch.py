"""The batch entry (MedSegLib/batch.py) run as a script, as Slicer's --python-script would, on real cases."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from medseg.segmenter import Segmenter

pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
pytestmark = pytest.mark.slicer

from MedSegLib.batch import SUMMARY_FILE, findCases  # noqa: E402
from MedSegLib.segmentationio import readSegNrrd  # noqa: E402
from MedSegLib.selftest import sampleFile  # noqa: E402

BATCH_SCRIPT = Path(__file__).resolve().parents[2] / "MedSegExtension" / "MedSegLib" / "batch.py"
CASES = ("hippocampus_003", "hippocampus_004", "hippocampus_006")


def run_batch(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BATCH_SCRIPT), *map(str, args)],
        cwd=cwd,  # not the repository: the script must find its own packages
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )


@pytest.mark.realdata
@pytest.mark.slow
def test_batch_segments_every_case_reports_the_corrupt_one_and_goes_on(tmp_path, shared_data):
    inputs, outputs = tmp_path / "scans", tmp_path / "results"
    inputs.mkdir()
    for case in CASES:
        shutil.copy(shared_data / "msd_hippocampus" / "imagesTr" / f"{case}.nii.gz", inputs)
    data = (inputs / f"{CASES[0]}.nii.gz").read_bytes()
    (inputs / "aaa_corrupt.nii.gz").write_bytes(data[: len(data) // 2])  # first in order: the batch must go on
    (inputs / "._hippocampus_003.nii.gz").write_bytes(b"macOS metadata")  # not a case
    (inputs / "notes.txt").write_text("not an image")

    done = run_batch("--input", inputs, "--output", outputs, "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "[1/4] aaa_corrupt: FAILED" in done.stdout and "truncated or corrupt" in done.stdout
    assert f"[4/4] {CASES[-1]}: ok" in done.stdout
    assert "3 succeeded, 1 failed" in done.stdout
    summary = json.loads((outputs / SUMMARY_FILE).read_text(encoding="utf-8"))
    assert (summary["succeeded"], summary["failed"]) == (3, 1)
    failed = [c for c in summary["cases"] if not c["ok"]]
    assert failed[0]["case"] == "aaa_corrupt" and "aaa_corrupt.nii.gz" in failed[0]["error"]
    assert sorted(p.name for p in outputs.iterdir()) == sorted([f"{c}.seg.nrrd" for c in CASES] + [SUMMARY_FILE])

    segmenter = Segmenter(None, device="cpu")
    for case in CASES:
        image = sitk.ReadImage(str(inputs / f"{case}.nii.gz"))
        expected = sitk.GetArrayFromImage(segmenter.segment(image).labelmap)
        segments, labelmap = readSegNrrd(outputs / f"{case}.seg.nrrd", referenceImage=image)
        assert [s.name for s in segments] == ["Anterior hippocampus", "Posterior hippocampus"]
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labelmap), expected)
        assert (expected == 1).sum() > 100 and (expected == 2).sum() > 100

    again = run_batch("--input", inputs, "--output", outputs, "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 1 and again.stdout.count("already done") == 3


def test_batch_with_a_bad_folder_or_model_says_so(tmp_path):
    missing = run_batch("--input", tmp_path / "nowhere", "--output", tmp_path / "out", cwd=tmp_path)
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
    (tmp_path / "in").mkdir()
    unknown = run_batch("--input", tmp_path / "in", "--output", tmp_path / "out", "--model", "nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "nope" in unknown.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "in" / "IMG0001.dcm").write_bytes(b"")  # loose DICOM files, not a series folder: no case
    empty = run_batch("--input", tmp_path / "in", "--output", tmp_path / "out", "--device", "cpu", cwd=tmp_path)
    assert empty.returncode == 2 and "no images in" in empty.stderr and "DICOM series folders" in empty.stderr


def test_batch_without_the_engine_packages_names_them_and_installs_nothing(tmp_path):
    """As in a Slicer without torch and MONAI: one line saying what is missing and how to install it, exit status 2."""
    (tmp_path / "in").mkdir()
    shutil.copy(sampleFile(), tmp_path / "in")  # a real case: the batch would otherwise go on to the engine
    script = f"""
import runpy, sys
for name in ("torch", "monai"):
    sys.modules[name] = None  # what find_spec and import see where a package is not installed
sys.argv = [{str(BATCH_SCRIPT)!r}, "--input", {str(tmp_path / "in")!r}, "--output", {str(tmp_path / "out")!r}]
runpy.run_path({str(BATCH_SCRIPT)!r}, run_name="__main__")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "torch>=2.8, monai>=1.4" in done.stderr and 'pip install "torch>=2.8" "monai>=1.4"' in done.stderr
    assert "Nothing was installed" in done.stderr and not (tmp_path / "out").exists()


def test_the_output_folder_inside_the_input_is_no_case_and_shared_case_names_are_reported(tmp_path):
    for name in ("a.nii.gz", "a.nrrd", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    output = tmp_path / "seg"
    output.mkdir()
    (output / "b.seg.nrrd").write_bytes(b"")  # the results of an earlier run
    cases, problems = findCases(tmp_path, channels=1, exclude=output)
    assert [c.name for c in cases] == ["b"]
    (problem,) = problems
    assert problem.case == "a" and "2 inputs share this case name (a.nii.gz, a.nrrd)" in problem.error
    cases, _ = findCases(tmp_path, channels=1)
    assert [c.name for c in cases] == ["b", "seg"]  # without exclude, the folder looks like a DICOM series
    for name in ("c_0000.nii.gz", "c_0000.mha", "c_0001.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    cases, problems = findCases(tmp_path, channels=2, exclude=output)
    assert [p.case for p in problems if "share this case name" in p.error] == ["a", "c_0000"]


def test_multi_channel_cases_are_grouped_by_nnunet_suffix(tmp_path):
    for name in ("b_0001.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "c_0000.nrrd", "loose.mha"):
        (tmp_path / name).write_bytes(b"")
    cases, problems = findCases(tmp_path, channels=2)
    assert [(c.name, [p.name for p in c.inputs]) for c in cases] == [
        ("a", ["a_0000.nii.gz", "a_0001.nii.gz"]),
        ("b", ["b_0000.nii.gz", "b_0001.nii.gz"]),
    ]
    assert {p.case: p.error for p in problems} == {
        "loose": "not named <case>_0000 ... <case>_0001",
        "c": "needs channels _0000 to _0001, found ['_0000']",
    }
    single, none = findCases(tmp_path, channels=1)
    assert len(single) == 6 and none == []
