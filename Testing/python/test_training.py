"""The minimal training path: a tiny synthetic MSD dataset in, a model folder the engine loads out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import card_dict
from medseg.segmenter import Segmenter

from training.data import DatasetError, read_msd_dataset, split_cases
from training.train import load_config, train


def make_dataset(root, n=6, *, label_values=(0, 1, 2), shift_label_origin=False):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        labels = np.zeros((20, 24, 20), np.uint8)
        labels[5:12, 6:14, 4:10] = label_values[1]
        labels[5:12, 6:14, 10:16] = label_values[2]
        image = rng.normal(100, 10, labels.shape).astype(np.float32) + 80 * (labels > 0) + 40 * (labels == 2)
        for kind, array in (("imagesTr", image), ("labelsTr", labels)):
            out = sitk.GetImageFromArray(array)
            if kind == "labelsTr" and shift_label_origin and i == 0:
                out.SetOrigin((5.0, 0.0, 0.0))
            sitk.WriteImage(out, str(root / kind / f"case_{i:03d}.nii.gz"))
        entries.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    (root / "dataset.json").write_text(
        json.dumps({"name": "toy", "labels": {"0": "bg", "1": "a", "2": "b"}, "training": entries})
    )
    return root


def write_config(tmp_path, dataset, **overrides):
    card = card_dict(id="toy-model")
    card.pop("weights")
    card["inference"] = {"roi_size": [16, 16, 16], "overlap": 0.5, "blend_mode": "gaussian", "sw_batch_size": 2}
    config = {
        "dataset": str(dataset),
        "output": str(tmp_path / "out" / "toy-model"),
        "epochs": 3,
        "batch_size": 2,
        "patch_size": [16, 16, 16],
        "validate_every": 1,
        "validation_fraction": 0.34,
        "learning_rate": 0.01,
        "card": card,
    }
    config.update(overrides)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_split_is_fixed_by_the_seed_and_disjoint():
    ids = [f"c{i}" for i in range(10)]
    train_a, val_a = split_cases(ids, validation_fraction=0.2, seed=0)
    train_b, val_b = split_cases(list(reversed(ids)), validation_fraction=0.2, seed=0)
    assert (train_a, val_a) == (train_b, val_b)
    assert len(val_a) == 2 and not set(train_a) & set(val_a)
    assert split_cases(ids, validation_fraction=0.2, seed=1)[1] != val_a


@pytest.mark.slow
def test_training_writes_a_model_folder_the_engine_loads(tmp_path):
    dataset = make_dataset(tmp_path / "toy")
    folder = train(load_config(write_config(tmp_path, dataset)))
    card = json.loads((folder / "model.json").read_text())
    assert card["training"]["split"]["validation"] and card["training"]["epochs"] == 3
    assert set(card["training"]["validation"]["mean"]) == {"Bright", "Other"}
    assert len(card["training"]["validation"]["per_case"]) == 2
    segmenter = Segmenter(folder, device="cpu")
    image = sitk.ReadImage(str(dataset / "imagesTr" / "case_000.nii.gz"))
    assert segmenter.segment(image).labelmap.GetSize() == image.GetSize()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["toy-model"], "no temporary folder may remain"


@pytest.mark.slow
def test_training_is_reproducible_with_the_same_seed(tmp_path):
    dataset = make_dataset(tmp_path / "toy")
    first = train(load_config(write_config(tmp_path, dataset, epochs=2, output=str(tmp_path / "a" / "m"))))
    second = train(load_config(write_config(tmp_path, dataset, epochs=2, output=str(tmp_path / "b" / "m"))))
    card_a = json.loads((first / "model.json").read_text())
    card_b = json.loads((second / "model.json").read_text())
    assert card_a["weights"]["sha256"] == card_b["weights"]["sha256"]
    assert card_a["training"]["validation"] == card_b["training"]["validation"]


def test_config_typo_is_refused_before_training(tmp_path):
    path = write_config(tmp_path, tmp_path, epocs=3)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['epocs'\]"):
        load_config(path)


def test_label_value_not_in_dataset_json_is_refused(tmp_path):
    dataset = make_dataset(tmp_path / "toy", label_values=(0, 1, 5))
    with pytest.raises(DatasetError, match=r"label value\(s\) \[5\] not in dataset.json"):
        train(load_config(write_config(tmp_path, dataset)))
    assert not (tmp_path / "out").exists()


def test_missing_label_file_is_refused(tmp_path):
    dataset = make_dataset(tmp_path / "toy")
    (dataset / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case_002.nii.gz: listed in .*dataset.json but missing"):
        read_msd_dataset(dataset)


def test_image_label_grid_mismatch_is_refused(tmp_path):
    dataset = make_dataset(tmp_path / "toy", shift_label_origin=True)
    with pytest.raises(DatasetError, match=r"case_000.nii.gz: its grid differs from .*origin"):
        train(load_config(write_config(tmp_path, dataset)))


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [
        ("loss", "dice_typo", "ce, dice, dice_ce, dice_focal"),
        ("optimizer", "lbfgs", "adam, adamw, sgd"),
        ("schedule", "step", "poly, cosine"),
    ],
)
def test_unknown_loss_optimiser_or_schedule_is_refused_before_training(tmp_path, key, value, choices):
    path = write_config(tmp_path, tmp_path, **{key: value})
    with pytest.raises(ValueError, match=f"unknown {key} '{value}'; choose one of {choices}"):
        load_config(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {"loss": "ce"},
        {"loss": "dice"},
        {"loss": "dice_focal"},
        {"optimizer": "sgd", "learning_rate": 0.05},
        {"optimizer": "adam", "schedule": "cosine"},
    ],
)
def test_each_loss_optimiser_and_schedule_trains_and_is_recorded(tmp_path, overrides):
    dataset = make_dataset(tmp_path / "toy")
    folder = train(load_config(write_config(tmp_path, dataset, epochs=2, **overrides)))
    recorded = json.loads((folder / "model.json").read_text())["training"]
    for key, value in overrides.items():
        assert recorded[key] == value
    history = json.loads((folder / "history.json").read_text())
    assert all(np.isfinite(entry["loss"]) for entry in history)


@pytest.mark.parametrize("name", ["ce", "dice", "dice_ce", "dice_focal"])
def test_each_loss_is_near_zero_for_a_confident_right_answer_and_large_for_a_wrong_one(name):
    import torch

    from training.train import make_loss

    labels = torch.zeros((2, 1, 4, 4, 4), dtype=torch.int64)
    labels[:, :, :2] = 1
    right = torch.cat([(labels == 0).float(), (labels == 1).float()], dim=1) * 20 - 10
    loss = make_loss(name)
    assert float(loss(right, labels)) < 0.01
    assert float(loss(-right, labels)) > 0.5


def test_schedules_and_optimisers_follow_the_config():
    import math

    import torch

    from training.train import TrainConfig, make_optimizer, make_schedule

    parameter = [torch.nn.Parameter(torch.zeros(1))]
    for schedule, middle in (("poly", 0.5**0.9), ("cosine", 0.5)):
        config = TrainConfig(dataset="", output="", card={}, learning_rate=1.0, schedule=schedule, optimizer="sgd")
        optimizer = make_optimizer(config, parameter)
        assert optimizer.defaults["momentum"] == 0.99 and optimizer.defaults["nesterov"]
        lr = make_schedule(config, optimizer, 10).lr_lambdas[0]
        assert lr(0) == 1.0 and math.isclose(lr(5), middle, rel_tol=1e-9) and lr(10) == pytest.approx(0.0, abs=1e-12)
