"""The bundled model on real data: the card's validation Dice reproduced through the medseg command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from medseg.cli import main
from medseg.metrics import evaluate_images
from medseg.models.folder import load_model_folder

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_bundled_weights_are_small_int8_cross_validated_and_documented(bundled_model_dir):
    import torch

    weights = bundled_model_dir / "model.pt"
    assert weights.stat().st_size < 6 * 2**20, "bundled weights must stay a few MB"
    state = torch.load(weights, weights_only=True)
    card = load_model_folder(bundled_model_dir).card
    assert card.weights_storage == "int8"  # convolutions in int8 with a float32 scale per output channel
    quantized = {name.removesuffix(":scale") for name in state if name.endswith(":scale")}
    assert quantized and all(state[name].dtype == torch.int8 for name in quantized)
    others = {t.dtype for n, t in state.items() if n not in quantized and not n.endswith(":scale")}
    assert others <= {torch.float16}
    assert "CC-BY-SA-4.0" in card.licence and "1902.09063" in card.citation
    split = card.training["split"]
    assert split["validation"] and not set(split["validation"]) & set(split["train"])
    # 5-fold cross-validation over all 240 cases; the shipped fold's held-out cases are its validation split
    cross = card.training["cross_validation"]
    assert cross["folds"] == 5 and cross["cases"] == 240 and len(cross["per_fold"]) == 5
    assert sum(f["cases"] for f in cross["per_fold"]) == 240
    for label, mean in cross["mean"].items():
        assert mean == pytest.approx(np.mean([f["dice"][label] for f in cross["per_fold"]]), abs=1e-4)
    shipped = cross["per_fold"][cross["shipped_fold"]]
    assert shipped["dice"] == card.training["validation_float16"]["mean"]
    assert cross["mirrored"]["mean"].keys() == cross["mean"].keys()


def segment_and_score(shared_data, cases, tmp_path, capsys, *options) -> tuple[dict[int, list[float]], list[str]]:
    """Dice per label of ``medseg segment CASE *options`` on MSD hippocampus cases, and what each run printed."""
    dice, printed = {1: [], 2: []}, []
    for case in cases:
        image = shared_data / "msd_hippocampus" / "imagesTr" / f"{case}.nii.gz"
        label = shared_data / "msd_hippocampus" / "labelsTr" / f"{case}.nii.gz"
        output = tmp_path / f"{case}_seg.nii.gz"
        assert main(["segment", str(image), "-o", str(output), "--device", "cpu", *options]) == 0
        printed.append(capsys.readouterr().out)
        reference = sitk.Cast(sitk.ReadImage(str(label)), sitk.sitkUInt8)
        for value, metrics in evaluate_images(sitk.ReadImage(str(output)), reference, [1, 2]).items():
            dice[value].append(metrics.dice)
    return dice, printed


def test_medseg_segment_reproduces_the_card_dice_on_every_validation_case(
    shared_data, bundled_model_dir, tmp_path, capsys
):
    card = json.loads((bundled_model_dir / "model.json").read_text())
    validation = card["training"]["validation"]
    cases = card["training"]["split"]["validation"]
    assert len(cases) == validation["cases"] == 48
    dice, _ = segment_and_score(shared_data, cases, tmp_path, capsys, "--quiet")
    names = {1: "Anterior hippocampus", 2: "Posterior hippocampus"}
    for value, scores in dice.items():
        mean = float(np.mean(scores))
        assert mean == pytest.approx(validation["mean"][names[value]], abs=0.01)
        assert mean >= 0.85, f"{names[value]}: mean validation Dice {mean:.4f} is below the 0.85 target"


def test_test_time_mirroring_keeps_the_bundled_models_dice(shared_data, bundled_model_dir, tmp_path, capsys):
    """--tta mirrors along x only, the axis the model's training flipped; along y or z it would wreck the labels
    (anterior and posterior trade places: Dice 0.09 / 0.06), so the engine refuses those."""
    from medseg.errors import MedSegError
    from medseg.inference import InferenceOptions
    from medseg.segmenter import Segmenter

    card = json.loads((bundled_model_dir / "model.json").read_text())
    augmentation = card["training"].get("augmentation") or card["training"]["config"]["augmentation"]
    assert card["inference"]["mirror_axes"] == [0] == augmentation["flip_axes"]
    cases = card["training"]["split"]["validation"][:12]
    mirrored, printed = segment_and_score(shared_data, cases, tmp_path, capsys, "--tta")
    assert all("windows, mirrored along x)" in out for out in printed)
    for value, scores in mirrored.items():
        plain = np.mean([card["training"]["validation"]["per_case"][case][str(value)] for case in cases])
        assert np.mean(scores) > plain - 0.01, (value, np.mean(scores), plain)  # 48 cases: +0.003 each label
    with pytest.raises(MedSegError, match=r"mirroring along y, z: the model card allows only x"):
        Segmenter(bundled_model_dir, device="cpu", inference=InferenceOptions(mirror_axes=(0, 1, 2)))


def test_demo_segments_the_bundled_sample(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    labelmap = sitk.ReadImage(str(tmp_path / "hippocampus-mni152-t1_seg.nii.gz"))
    counts = np.bincount(sitk.GetArrayFromImage(labelmap).ravel(), minlength=3)
    # An adult hippocampus holds about 3-4.5 mL in all; each part well over 0.5 mL. A model that fails on the
    # template would give nothing or a blob of the whole crop.
    assert 0.5 < counts[1] / 1000 < 3.0 and 0.5 < counts[2] / 1000 < 3.0
    assert 2.0 < (counts[1] + counts[2]) / 1000 < 5.5
    assert "Anterior hippocampus" in out and "mL" in out and str(tmp_path.resolve()) in out
    pytest.importorskip("slicer")
    assert (tmp_path / "hippocampus-mni152-t1.seg.nrrd").is_file()


def test_demo_runs_the_bundled_model_and_says_when_its_folder_cannot_be_made(tmp_path, capsys, monkeypatch):
    from helpers import write_model_folder

    # a user's own model of the bundled id, first on the search path: the demo still runs the bundled one
    write_model_folder(tmp_path / "mine" / "hippocampus-mri", id="hippocampus-mri")
    monkeypatch.setenv("MEDSEG_MODEL_PATH", str(tmp_path / "mine"))
    assert main(["demo", "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 0
    labelmap = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "hippocampus-mni152-t1_seg.nii.gz")))
    assert np.bincount(labelmap.ravel(), minlength=3)[1:].tolist() == [2105, 1915]  # the bundled model's answer
    capsys.readouterr()
    (tmp_path / "a file").write_text("")
    assert main(["demo", "--output-dir", str(tmp_path / "a file"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "a file: cannot make the output folder" in err and "Traceback" not in err
