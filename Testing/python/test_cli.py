"""The medseg command: segment, models, demo, and bad input reported with the file and no output left."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import cpu_has_fast_bf16, write_dicom_series, write_model_folder
from medseg import inference, io
from medseg.cli import main
from medseg.models.card import read_card
from medseg.models.registry import resources_dir


@pytest.fixture
def scan(tmp_path, blob_image):
    return io.write_image(blob_image, tmp_path / "scan.nii.gz")


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_segment_writes_a_labelmap_on_the_input_grid(tmp_path, scan, tiny_model, capsys):
    out_path = tmp_path / "seg.nrrd"
    code, out, err = run(["segment", scan, "-o", out_path, "--model", tiny_model, "--device", "cpu"], capsys)
    assert code == 0, err
    seg = sitk.ReadImage(str(out_path))
    image = sitk.ReadImage(str(scan))
    assert (seg.GetSize(), seg.GetSpacing(), seg.GetOrigin(), seg.GetDirection()) == (
        image.GetSize(),
        image.GetSpacing(),
        image.GetOrigin(),
        image.GetDirection(),
    )
    assert "Bright" in out and "mL" in out and str(out_path.resolve()) in out


def test_dicom_series_folder_as_input(tmp_path, tiny_model, capsys):
    array = np.random.default_rng(2).integers(0, 400, (8, 20, 24)).astype(np.int16)
    folder = write_dicom_series(array, tmp_path / "dicom", spacing=(0.9, 0.9, 2.0), origin=(5.0, -3.0, 40.0))
    code, _, err = run(["segment", folder, "-o", tmp_path / "seg.nii.gz", "-m", tiny_model], capsys)
    assert code == 0, err
    seg = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    assert seg.GetSize() == (24, 20, 8)
    np.testing.assert_allclose(seg.GetOrigin(), (5.0, -3.0, 40.0), atol=1e-3)
    np.testing.assert_allclose(seg.GetSpacing(), (0.9, 0.9, 2.0), atol=1e-3)


def test_quiet_prints_nothing(tmp_path, scan, tiny_model, capsys):
    code, out, err = run(["segment", scan, "-o", tmp_path / "s.nii.gz", "-m", tiny_model, "-q"], capsys)
    assert (code, out, err) == (0, "", "")


def test_verbose_shows_progress_and_details(tmp_path, scan, tiny_model, capsys):
    code, out, err = run(["segment", scan, "-o", tmp_path / "s.nii.gz", "-m", tiny_model, "-v"], capsys)
    assert code == 0
    assert "loaded model tiny-test" in err and "inference" in err


def test_seg_nrrd_output_carries_the_card(tmp_path, scan, tiny_model, capsys):
    pytest.importorskip("slicer")
    from MedSegLib.segmentationio import readSegNrrd

    out_path = tmp_path / "scan.seg.nrrd"
    code, _, err = run(
        ["segment", scan, "-o", out_path, "-m", tiny_model, "--probabilities", tmp_path / "p.nii.gz"], capsys
    )
    assert code == 0, err
    segments, _ = readSegNrrd(out_path)
    assert [s.name for s in segments] == ["Bright", "Other"]
    probabilities = sitk.ReadImage(str(tmp_path / "p.nii.gz"))
    assert probabilities.GetNumberOfComponentsPerPixel() == 3


def test_models_lists_the_bundled_model(capsys):
    code, out, _ = run(["models"], capsys)
    assert code == 0
    assert "hippocampus-mri" in out and "Anterior hippocampus" in out and "CC-BY-SA-4.0" in out
    # the card's cross-validation, as the bundled card records it (training.crossval --tta --ship)
    cross = read_card(resources_dir() / "Models" / "hippocampus-mri").training["cross_validation"]
    plain, mirrored = cross["mean"], cross["mirrored"]["mean"]
    assert (
        f"5-fold cross-validated Dice: Anterior hippocampus {plain['Anterior hippocampus']:.3f}, "
        f"Posterior hippocampus {plain['Posterior hippocampus']:.3f}" in out
    )
    assert f"5-fold cross-validated Dice with --tta: Anterior hippocampus {mirrored['Anterior hippocampus']:.3f}" in out
    assert "validation Dice (48 held-out cases): Anterior hippocampus" in out
    code, out, _ = run(["models", "--json"], capsys)
    entries = json.loads(out)
    assert any(
        e["id"] == "hippocampus-mri" and e["card"]["labels"][1]["name"] == "Posterior hippocampus" for e in entries
    )


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda d: d / "missing.nii.gz", "missing.nii.gz: no such file"),
        (lambda d: write_bytes(d / "empty.nii.gz", b""), "empty.nii.gz: the file is empty"),
        (lambda d: write_bytes(d / "junk.mha", b"ObjectType = Image\nNDims = 3\n"), "junk.mha: cannot be read"),
        (
            lambda d: io.write_image(sitk.GetImageFromArray(np.ones((5, 5, 5), np.float32)), d / "flat.nii.gz"),
            "flat.nii.gz: every voxel has the same value",
        ),
        (
            lambda d: io.write_image(sitk.GetImageFromArray(np.eye(5, dtype=np.float32)), d / "flat2d.nii.gz"),
            "flat2d.nii.gz: expected a 3D volume, got a 2D image",
        ),
    ],
)
def test_bad_input_gives_one_clear_line_and_no_output(tmp_path, tiny_model, capsys, make_input, message):
    source = make_input(tmp_path)
    out_path = tmp_path / "out.nii.gz"
    code, out, err = run(["segment", source, "-o", out_path, "-m", tiny_model], capsys)
    assert code == 1
    assert err.startswith("medseg: error: ") and message in err and "Traceback" not in err
    assert not out_path.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no temporary file may remain"


def test_unknown_model_is_a_clear_error(tmp_path, scan, capsys):
    code, _, err = run(["segment", scan, "-o", tmp_path / "o.nii.gz", "--model", "liver-ct-9000"], capsys)
    assert code == 1 and "unknown model 'liver-ct-9000'" in err and "hippocampus-mri" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_broken_card_is_a_clear_error(tmp_path, scan, tiny_model, capsys):
    card = json.loads((tiny_model / "model.json").read_text())
    del card["preprocessing"]
    (tiny_model / "model.json").write_text(json.dumps(card))
    code, _, err = run(["segment", scan, "-o", tmp_path / "o.nii.gz", "--model", tiny_model], capsys)
    assert code == 1 and "model.json: missing field 'preprocessing'" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_weights_that_do_not_match_the_card_are_a_clear_error(tmp_path, scan, tiny_model, capsys):
    import torch

    state = torch.load(tiny_model / "model.pt", weights_only=True)
    next(iter(state.values())).mul_(2)
    torch.save(state, tiny_model / "model.pt")
    code, _, err = run(["segment", scan, "-o", tmp_path / "o.nii.gz", "--model", tiny_model], capsys)
    assert code == 1 and "model.pt: SHA-256 is" in err and "weights were changed or damaged" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_wrong_channel_count(tmp_path, scan, tiny_model, capsys):
    code, _, err = run(["segment", scan, scan, "-o", tmp_path / "o.nii.gz", "-m", tiny_model], capsys)
    assert code == 1 and "needs 1 input channel(s) (T1), got 2" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_missing_gpu_is_a_clear_error(tmp_path, scan, tiny_model, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run(["segment", scan, "-o", tmp_path / "o.nii.gz", "-m", tiny_model, "--device", "cuda"], capsys)
    assert code == 1 and "no CUDA GPU" in err


def test_console_script_is_installed_and_runs(tmp_path, scan, tiny_model):
    exe = os.path.join(os.path.dirname(sys.executable), "medseg")
    if not os.path.exists(exe):
        pytest.skip("medseg console script not installed in this environment")
    done = subprocess.run(
        [exe, "segment", str(scan), "-o", str(tmp_path / "o.nii.gz"), "-m", str(tiny_model)],
        capture_output=True,
        text=True,
        env={**os.environ, "LANG": "C", "LC_ALL": "C"},
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o.nii.gz").exists()


def test_roi_voxels_restrict_the_work_and_keep_the_grid(tmp_path, scan, tiny_model, capsys):
    full, boxed = tmp_path / "full.nrrd", tmp_path / "boxed.nrrd"
    common = ["--model", tiny_model, "--device", "cpu"]
    assert run(["segment", scan, "-o", full, *common], capsys)[0] == 0
    code, _, err = run(["segment", scan, "-o", boxed, *common, "--roi-voxels", 2, 3, 1, 9, 12, 7], capsys)
    assert code == 0, err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(boxed)))  # (z, y, x)
    assert labels.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(full))).shape
    outside = np.ones_like(labels, bool)
    outside[1:8, 3:13, 2:10] = False
    assert labels[~outside].any() and not labels[outside].any()


def test_roi_in_millimetres_equals_the_same_box_in_voxels(tmp_path, scan, tiny_model, capsys):
    image = sitk.ReadImage(str(scan))
    first, last = image.TransformIndexToPhysicalPoint((2, 3, 1)), image.TransformIndexToPhysicalPoint((9, 12, 7))
    by_mm, by_voxels = tmp_path / "mm.nrrd", tmp_path / "vox.nrrd"
    common = ["--model", tiny_model, "--device", "cpu"]
    assert run(["segment", scan, "-o", by_mm, *common, "--roi", *first, *last], capsys)[0] == 0
    assert run(["segment", scan, "-o", by_voxels, *common, "--roi-voxels", 2, 3, 1, 9, 12, 7], capsys)[0] == 0
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(by_mm))), sitk.GetArrayFromImage(sitk.ReadImage(str(by_voxels)))
    )


@pytest.mark.parametrize(
    "roi, message",
    [
        (["--roi-voxels", 40, 40, 40, 50, 50, 50], "scan.nii.gz: the region of interest (voxels (40, 40, 40) to "),
        (["--roi-voxels", 5, 5, 5, 4, 9, 9], "must not be below"),
        (["--roi", 900, 900, 900, 950, 950, 950], "scan.nii.gz: the region of interest does not overlap"),
    ],
)
def test_roi_outside_the_volume_is_a_clear_error_and_writes_nothing(tmp_path, scan, tiny_model, capsys, roi, message):
    out_path = tmp_path / "seg.nrrd"
    code, _, err = run(["segment", scan, "-o", out_path, "--model", tiny_model, "--device", "cpu", *roi], capsys)
    assert code == 1 and message in err and not out_path.exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--smoothness", 3], "--smoothness set(s) the graph-cut refinement; add --refine to use it"),
        (["--connectivity", 26, "--full-volume"], "--connectivity, --full-volume set(s) the graph-cut refinement"),
        (["--band-mm", 4], "--band-mm set(s) the graph-cut refinement"),
        (["--tta", "--preview"], "--tta with --preview: a preview runs without test-time mirroring"),
    ],
)
def test_options_that_would_do_nothing_are_refused_before_any_work(
    tmp_path, scan, tiny_model, capsys, options, message
):
    out_path = tmp_path / "seg.nii.gz"
    args = ["segment", scan, "-o", out_path, "--model", tiny_model, "--device", "cpu", *options]
    code, _, err = run(args, capsys)
    assert code == 1 and message in err and not out_path.exists()
    # with --refine the graph-cut options run; a preview alone runs (this card has no mirror axes for --tta)
    code, _, err = run([*args, "--refine"] if "--tta" not in options else [a for a in args if a != "--tta"], capsys)
    assert code == 0 and out_path.exists(), err


def test_progress_json_reports_stages_in_order_then_the_result(tmp_path, scan, tiny_model, capsys):
    out_path = tmp_path / "seg.nrrd"
    code, out, err = run(
        ["segment", scan, "-o", out_path, "--model", tiny_model, "--device", "cpu", "--progress-json"], capsys
    )
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    stages = [e["stage"] for e in events if e["event"] == "progress"]
    order = ["loading model", "reading", "preprocessing", "inference", "postprocessing", "writing"]
    assert [s for s in dict.fromkeys(stages)] == order
    assert all(0.0 <= e["fraction"] <= 1.0 for e in events if e["event"] == "progress")
    result = events[-1]
    assert result["event"] == "result" and result["output"] == str(out_path.resolve())
    # where the windows ran and what the run noted (a GPU out of memory moves to the CPU and says so): the Slicer
    # module shows both
    assert result["device"] == "cpu" and isinstance(result["notes"], list)
    assert all(isinstance(note, str) and note for note in result["notes"])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out_path)))
    assert [s["voxels"] for s in result["statistics"]] == [int((labels == v).sum()) for v in (1, 2)]


BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def benchmark_rows(script: str, *arguments: str, timeout: int) -> list[dict]:
    """The JSON lines a benchmark script prints, run in a fresh process; it must exit cleanly."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *arguments],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.slow
def test_inference_benchmark_runs_every_variant_and_reports_ratios(tmp_path):
    tiny = ["--shape", "48", "48", "32", "--roi", "32", "32", "32", "--repeats", "1"]
    rows = benchmark_rows("inference.py", *tiny, timeout=600)
    assert not [row for row in rows if "error" in row], rows
    variants = {row["variant"]: row for row in rows if "variant" in row}
    openvino = importlib.util.find_spec("openvino") is not None  # then: a conversion step and its model's memory
    expected = {"monai", "tutorial", "model", "medseg", "medseg-fp32", "medseg-bf16"}
    assert set(variants) == expected | ({"convert", "model-openvino"} if openvino else set()), rows
    assert all(variants[name]["network_seconds"] > 0 for name in expected - {"model"})
    assert variants["medseg-fp32"]["precision"] == "fp32" and variants["medseg-bf16"]["precision"] == "bf16"
    assert variants["medseg-fp32"]["backend"] == ("openvino" if openvino else "torch")
    # bf16 runs in OpenVINO where it is installed and the CPU runs bf16 fast; a forced bf16 elsewhere: autocast
    assert variants["medseg-bf16"]["backend"] == ("openvino" if openvino and cpu_has_fast_bf16() else "torch")
    if openvino:
        assert variants["convert"]["source"] == "converted" and variants["model-openvino"]["source"] == "cache"
    summaries = {row["summary"]: row for row in rows if "summary" in row}
    assert set(summaries) == {"medseg", "medseg-fp32", "medseg-bf16"}
    for summary in summaries.values():
        assert summary["speedup_vs_monai"] > 0 and summary["end_to_end_speedup_vs_tutorial"] > 0
        assert summary["memory_budget_MiB"] > 0 and isinstance(summary["memory_within_budget"], bool)
    # float32 gives plain MONAI's labels: the same windows and the same blending
    assert summaries["medseg-fp32"]["agreement"] >= 0.9999
    assert summaries["medseg"]["agreement_labelmap_vs_tutorial"] is not None


def test_inference_options_reach_the_engine(tmp_path, scan, tiny_model, capsys):
    base = ["segment", scan, "--model", tiny_model, "--device", "cpu"]
    inference = {"roi_size": [16, 16, 16], "overlap": 0.25, "mirror_axes": [0, 2]}
    mirrorable = write_model_folder(tmp_path / "mirrorable", inference=inference)
    tta = ["segment", scan, "--model", mirrorable, "--device", "cpu", "--precision", "fp32", "--tta"]
    code, out, err = run([*tta, "-o", tmp_path / "fp32.nii.gz"], capsys)
    assert code == 0, err
    assert "(fp32 in " in out and "PREVIEW" not in out
    assert "windows, mirrored along x, z)" in out
    torch_only = ["-o", tmp_path / "torch.nii.gz", "--precision", "fp32", "--backend", "torch", "--progress-json"]
    code, out, err = run([*base, *torch_only], capsys)
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["backend"] == "torch"
    assert json.loads(out.splitlines()[-1])["mirror_axes"] == []
    code, out, err = run([*base, "-o", tmp_path / "preview.nii.gz", "--preview", "--progress-json"], capsys)
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["preview"] is True and result["precision"] in ("fp32", "bf16")
    code, out, err = run([*base, "-o", tmp_path / "preview2.nii.gz", "--preview"], capsys)
    assert "PREVIEW" in out and "not for measurement" in out
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "fp32.nii.gz")))
    preview = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "preview.nii.gz")))
    assert plain.shape == preview.shape


def test_bad_inference_options_are_clear_errors(tmp_path, scan, tiny_model, capsys):
    base = ["segment", scan, "-o", tmp_path / "seg.nii.gz", "--model", tiny_model, "--device", "cpu"]
    code, _, err = run([*base, "--window-batch", "0"], capsys)
    assert code == 1 and "window_batch must be at least 1" in err
    with pytest.raises(SystemExit):
        run([*base, "--precision", "fp8"], capsys)
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    assert not (tmp_path / "seg.nii.gz").exists()


def test_mirroring_a_model_whose_card_lists_no_axes_is_refused(tmp_path, scan, tiny_model, capsys):
    out_path = tmp_path / "seg.nii.gz"
    code, _, err = run(["segment", scan, "-o", out_path, "--model", tiny_model, "--device", "cpu", "--tta"], capsys)
    assert code == 1
    assert "model tiny-test" in err and "tiny-model): test-time mirroring" in err
    assert "does not list the axes its training flipped (inference.mirror_axes" in err
    assert not out_path.exists()


def test_parsing_the_command_line_does_not_import_torch_and_knows_every_precision_and_backend():
    code = (
        "import sys; from medseg.cli import _parser, PRECISIONS, BACKENDS; _parser().parse_args(['models']); "
        "print('torch' in sys.modules, ','.join(PRECISIONS), ','.join(BACKENDS))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", check=True)
    from medseg.backends import BACKENDS
    from medseg.inference import PRECISIONS

    assert done.stdout.split() == ["False", ",".join(PRECISIONS), ",".join(BACKENDS)]


def test_the_device_check_script_runs_its_smoke_step_on_the_cpu(tmp_path):
    """benchmarks/device_check.sh is meant for a GPU lease; QUICK=1 DEVICE=cpu checks its plumbing here."""
    script = BENCHMARKS / "device_check.sh"
    env = {**os.environ, "OUT": str(tmp_path), "QUICK": "1", "DEVICE": "cpu", "STEPS": "smoke"}
    env["PYTHON"] = sys.executable
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["step"], r["exit"]) for r in rows if "exit" in r] == [("smoke", 0)]
    (smoke,) = [r for r in rows if "exit" not in r]
    assert smoke["step"] == "smoke" and smoke["agreement_with_cpu"] == 1.0 and smoke["cpu"]["ml"] == [2.105, 1.915]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nvidia-smi.txt", "results.jsonl", "stderr.log"]


def test_the_io_benchmark_checks_its_files_and_reports_every_case():
    """benchmarks/nifti_io.py asserts that what MedSeg wrote reads back as the image; here on a small volume."""
    rows = benchmark_rows("nifti_io.py", "--shape", "40", "36", "24", "--repeats", "1", timeout=120)
    header, cases = rows[0], {r["case"]: r for r in rows[1:]}
    assert header["shape"] == [40, 36, 24] and header["gzip"] in ("isal", "zlib")
    assert list(cases) == [
        "read ct .nii.gz",
        "write noisy labels .nii.gz",
        "write smooth labels .nii.gz",
        "write probabilities .nrrd",
    ]
    assert cases["read ct .nii.gz"]["itk_MB"] == cases["read ct .nii.gz"]["medseg_MB"]  # the same file, read
    assert cases["write probabilities .nrrd"]["uncompressed_MB"] == round(40 * 36 * 24 * 2 * 4 / 1e6, 3)
    for row in cases.values():
        assert row["voxels"] == [40, 36, 24] and row["itk_seconds"] > 0 and row["medseg_seconds"] > 0
        assert 0 < row["medseg_MB"] < 1.5 * row["uncompressed_MB"]


def test_the_gpu_profile_script_runs_on_the_cpu():
    """benchmarks/gpu_profile.py explains GPU ratios under a lease; on the CPU its parts run the same way, in the
    CPU's own low precision (bf16 where it runs fast; float16 there can take 250 times float32's time), and
    MedSeg's float32 labels are plain MONAI's."""
    tiny = ["--device", "cpu", "--model", "dynunet", "--classes", "3", "--shape", "40", "40", "24", "--repeats", "1"]
    parts = ["--roi", "32", "32", "32", "--parts", "window", "monai", "medseg"]
    rows = benchmark_rows("gpu_profile.py", *tiny, *parts, timeout=300)
    dtype = inference.low_precision_for(torch.device("cpu"))
    low = inference.precision_name(dtype) if dtype is not None else None
    dtypes = ["float32"] + (["bfloat16"] if low else [])
    windows = [r for r in rows if r.get("part") == "window"]
    assert {(r["dtype"], r["layout"], r["batch"]) for r in windows} == {
        (d, lay, b) for d in dtypes for lay in ("ncdhw", "channels_last") for b in (1, 2)
    }
    assert all(r["ms_per_window"] > 0 for r in windows)
    medseg = {r["requested"]: r for r in rows if r.get("part") == "medseg"}
    assert set(medseg) == {"fp32", "auto"} | ({low} if low else set())
    assert medseg["fp32"]["precision"] == "fp32" and medseg["fp32"]["agreement"] == 1.0
    if low:  # an untrained network's near ties: bfloat16 moves some labels, not many
        assert medseg[low]["precision"] == low and medseg[low]["agreement"] > 0.98
