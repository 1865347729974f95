"""The minimal training path: a tiny synthetic MSD dataset in, a model folder the engine loads out."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import card_dict, cpu_has_fast_bf16
from medseg.inference import InferenceOptions
from medseg.metrics import evaluate_images
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
        "dataset": dataset if isinstance(dataset, dict) else str(dataset),
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
    assert sorted(p.name for p in folder.parent.iterdir()) == ["toy-model", "toy-model.run"], "no temporary folder"
    run = folder.parent / "toy-model.run"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt",
        "loss.png",
        "metrics.json",
        "splits.json",
        "validation.png",
    ]
    metrics = json.loads((run / "metrics.json").read_text())
    assert [entry["epoch"] for entry in metrics["history"]] == [1, 2, 3]
    last = metrics["history"][-1]["validation"]
    assert set(last) == {"Bright", "Other"}
    assert set(last["Bright"]) == {"dice", "iou", "precision", "recall", "hd95"}
    assert metrics["config"]["loss"] == "dice_ce" and metrics["config"]["augmentation"]["noise_std"] == 0.05
    assert card["training"]["config"] == metrics["config"], "every option, defaults included, is recorded"
    for png in ("loss.png", "validation.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_training_is_reproducible_with_the_same_seed(tmp_path):
    dataset = make_dataset(tmp_path / "toy")
    first = train(load_config(write_config(tmp_path, dataset, epochs=2, output=str(tmp_path / "a" / "m"))))
    second = train(load_config(write_config(tmp_path, dataset, epochs=2, output=str(tmp_path / "b" / "m"))))
    card_a = json.loads((first / "model.json").read_text())
    card_b = json.loads((second / "model.json").read_text())
    assert card_a["weights"]["sha256"] == card_b["weights"]["sha256"]
    for card in (card_a, card_b):
        card["training"]["validation"].pop("seconds_per_case")  # a timing, the one thing that may differ
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


def test_truncated_label_file_is_refused_not_zero_filled(tmp_path):
    """ITK would read the cut label as background from the cut on: training would learn from wrong labels."""
    from medseg.errors import InputImageError

    dataset = make_dataset(tmp_path / "toy")
    label = dataset / "labelsTr" / "case_001.nii.gz"
    label.write_bytes(label.read_bytes()[:-40])
    with pytest.raises(InputImageError, match=r"case_001\.nii\.gz: .*truncated"):
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


def _network_state(run_dir):
    import torch

    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["network"]


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(tmp_path):
    import torch

    dataset = make_dataset(tmp_path / "toy")
    augmentation = {"flip_axes": [1], "rotation_degrees": 10, "scale": 0.1, "elastic_probability": 0.3}
    # dropout draws from PyTorch's global generator, which the checkpoint carries on
    common = {"epochs": 3, "steps_per_epoch": 2, "augmentation": augmentation, "validate_every": 2, "dropout": 0.2}
    straight = load_config(write_config(tmp_path, dataset, output=str(tmp_path / "a" / "m"), **common))
    split = load_config(write_config(tmp_path, dataset, output=str(tmp_path / "b" / "m"), **common))
    folder_a = train(straight)
    assert train(split, stop_at_step=3) is None, "a stopped run writes no model folder"
    assert not (tmp_path / "b" / "m").exists()
    assert torch.load(split.run_path / "checkpoint.pt", weights_only=False)["state"]["step"] == 3
    folder_b = train(split, resume=True)
    state_a, state_b = _network_state(straight.run_path), _network_state(split.run_path)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), "resumed weights differ from uninterrupted"
    assert json.loads((folder_a / "model.json").read_text())["inference"]["mirror_axes"] == [1], "the flipped axis"
    card_a = json.loads((folder_a / "model.json").read_text())["training"]
    card_b = json.loads((folder_b / "model.json").read_text())["training"]
    for card in (card_a, card_b):
        card["validation"].pop("seconds_per_case")  # a timing, the one thing that may differ
    assert card_a["validation"] == card_b["validation"]
    history_a = json.loads((straight.run_path / "metrics.json").read_text())["history"]
    history_b = json.loads((split.run_path / "metrics.json").read_text())["history"]
    assert history_a == history_b


def test_resume_with_a_changed_config_is_refused(tmp_path):
    dataset = make_dataset(tmp_path / "toy")
    config = load_config(write_config(tmp_path, dataset, epochs=2))
    train(config, stop_at_step=1)
    changed = load_config(write_config(tmp_path, dataset, epochs=2, learning_rate=0.5))
    with pytest.raises(ValueError, match=r"checkpoint.pt: made with a different config \(learning_rate changed\)"):
        train(changed, resume=True)


def test_resume_with_a_changed_card_is_refused(tmp_path):
    """The weights were learnt on the card's preprocessing: other spacing or normalisation would not fit them."""
    import torch

    dataset = make_dataset(tmp_path / "toy")
    card = json.loads(write_config(tmp_path, dataset).read_text())["card"]
    train(load_config(write_config(tmp_path, dataset, epochs=2)), stop_at_step=1)
    for part, value, changed in (
        ("spacing", [2.0, 2.0, 2.0], "card.preprocessing.spacing"),
        (
            "normalization",
            {"method": "none"},
            "card.preprocessing.normalization.clip_percentiles, card.preprocessing.normalization.method",
        ),
    ):
        edited = json.loads(json.dumps(card))
        edited["preprocessing"][part] = value
        config = load_config(write_config(tmp_path, dataset, epochs=2, card=edited))
        with pytest.raises(ValueError, match=rf"checkpoint.pt: made with a different config \({changed} changed\)"):
            train(config, resume=True)
    edited = json.loads(json.dumps(card))
    edited["labels"][1]["name"] = "Renamed"
    with pytest.raises(ValueError, match=r"\(card.labels changed\)"):
        train(load_config(write_config(tmp_path, dataset, epochs=2, card=edited)), resume=True)
    edited["labels"][1]["name"] = card["labels"][1]["name"]
    edited["labels"][1]["color"] = [1, 2, 3]  # the colour only: the weights are as good
    edited["description"] = "a new description"
    folder = train(load_config(write_config(tmp_path, dataset, epochs=2, card=edited)), resume=True)
    assert json.loads((folder / "model.json").read_text())["labels"][1]["color"] == [1, 2, 3]
    checkpoint = torch.load(tmp_path / "out" / "toy-model.run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["card"]["preprocessing"]["spacing"] is None


def test_resume_with_fewer_epochs_than_done_is_refused_or_validates_its_last_epoch(tmp_path):
    """A checkpoint of a longer run at or past the new end: refused past it; at it, the last epoch is validated
    (it was not, the run's validations being further on) and the model folder written from it."""
    dataset = make_dataset(tmp_path / "toy")
    train(load_config(write_config(tmp_path, dataset, epochs=3, validate_every=5)), stop_at_step=4)  # 2 epochs
    fewer = load_config(write_config(tmp_path, dataset, epochs=1, validate_every=5))
    with pytest.raises(
        ValueError,
        match=r"checkpoint.pt: the run has done 4 steps \(2 epochs\), more than the 2 of epochs 1; resume with "
        r"epochs of at least 2",
    ):
        train(fewer, resume=True)
    config = load_config(write_config(tmp_path, dataset, epochs=2, validate_every=5))
    folder = train(config, resume=True)
    assert json.loads((folder / "model.json").read_text())["training"]["best_epoch"] == 2
    history = json.loads((config.run_path / "metrics.json").read_text())["history"]
    assert [e["epoch"] for e in history] == [1, 2] and "validation" in history[-1] and "validation" not in history[0]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """torchrun with two gloo processes (one sample each) against one process with the batch of two."""
    import os
    import socket
    import subprocess
    import sys

    import torch
    from conftest import REPO

    dataset = make_dataset(tmp_path / "toy")
    results = {}
    for processes in (1, 2):
        path = write_config(
            tmp_path,
            dataset,
            output=str(tmp_path / f"p{processes}" / "m"),
            epochs=2,
            steps_per_epoch=3,
            augmentation={"flip_axes": [0], "rotation_degrees": 15, "rotation_probability": 0.5},
            # SGD: Adam's first steps move each weight by +-lr whatever the gradient's size, so float rounding
            # in a near-zero gradient would flip whole steps and hide what this test compares.
            optimizer="sgd",
            momentum=0.9,
            learning_rate=0.05,
        )
        renamed = path.with_name(f"config{processes}.json")
        path.rename(renamed)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "training",
            str(renamed),
        ]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[processes] = _network_state(tmp_path / f"p{processes}" / "m.run")
        card = json.loads((tmp_path / f"p{processes}" / "m" / "model.json").read_text())
        assert ("x 2 processes" in card["training"]["machine"]) == (processes == 2)
    from medseg.models.architectures import build_network

    torch.manual_seed(0)
    initial = build_network("UNet", in_channels=1, out_channels=3, kwargs=card_dict()["network"]["kwargs"]).state_dict()
    one, two = results[1], results[2]
    worst = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    moved = max(float((one[k].float() - initial[k].float()).abs().max()) for k in one)
    assert moved > 0.01, "training must have moved the weights for the comparison to mean anything"
    assert worst < 1e-5, f"two-process weights differ from one-process weights by {worst} (moved {moved})"


def test_kfold_splits_are_saved_disjoint_and_reused(tmp_path):
    from training.data import DatasetError, load_or_make_splits

    ids = [f"case_{i}" for i in range(11)]
    path = tmp_path / "splits.json"
    splits = load_or_make_splits(path, ids, folds=5, validation_fraction=0.2, seed=3)
    validation = [c for split in splits for c in split["val"]]
    assert sorted(validation) == sorted(ids) and len(splits) == 5, "each case validates exactly once"
    assert all(not set(s["train"]) & set(s["val"]) and len(s["train"]) + len(s["val"]) == 11 for s in splits)
    assert load_or_make_splits(path, list(reversed(ids)), folds=5, validation_fraction=0.2, seed=99) == splits
    with pytest.raises(DatasetError, match=r"splits.json: the saved splits do not match the dataset"):
        load_or_make_splits(path, ids + ["case_new"], folds=5, validation_fraction=0.2, seed=3)
    with pytest.raises(DatasetError, match=r"splits.json: holds 5 split\(s\), the config asks for 1"):
        load_or_make_splits(path, ids, folds=0, validation_fraction=0.2, seed=3)


@pytest.mark.slow
def test_kfold_fold_trains_on_its_split(tmp_path):
    dataset = make_dataset(tmp_path / "toy")
    config = load_config(write_config(tmp_path, dataset, epochs=1, folds=3, fold=2))
    folder = train(config)
    split = json.loads((folder / "model.json").read_text())["training"]["split"]
    saved = json.loads(config.splits_path.read_text())
    assert split["validation"] == saved[2]["val"] and split["folds"] == 3 and split["fold"] == 2


def _write_image(array, path, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _two_channel_case(rng):
    labels = np.zeros((20, 24, 20), np.uint8)
    labels[5:12, 6:14, 4:10] = 1
    labels[5:12, 6:14, 10:16] = 2
    first = rng.normal(0, 1, labels.shape) + 3 * (labels > 0)  # sees the lesion, not its parts
    second = rng.normal(0, 1, labels.shape) + 3 * (labels == 2)  # tells the parts apart
    return first.astype(np.float32), second.astype(np.float32), labels


def _two_channel_card():
    card = card_dict(id="two-channel")
    card.pop("weights")
    card["channels"] = [{"name": "FLAIR", "modality": "MR"}, {"name": "T1c", "modality": "MR"}]
    card["inference"] = {"roi_size": [16, 16, 16], "overlap": 0.5, "blend_mode": "gaussian", "sw_batch_size": 2}
    return card


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folders", "case_folders"])
def test_two_channel_datasets_in_folder_layouts_train(tmp_path, layout):
    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    for i in range(6):
        first, second, labels = _two_channel_case(rng)
        if layout == "folders":
            (root / "images").mkdir(parents=True, exist_ok=True)
            (root / "labels").mkdir(exist_ok=True)
            _write_image(first, root / "images" / f"c{i}_0000.nii.gz")
            _write_image(second, root / "images" / f"c{i}_0001.nii.gz")
            _write_image(labels, root / "labels" / f"c{i}.nii.gz")
        else:
            (root / f"c{i}").mkdir(parents=True)
            _write_image(first, root / f"c{i}" / "flair.nii.gz")
            _write_image(second, root / f"c{i}" / "t1c.nii.gz")
            _write_image(labels.astype(np.float32), root / f"c{i}" / "truth.nii.gz")  # as BRATS stores it
    names = {"0": "background", "1": "a", "2": "b"}
    if layout == "folders":
        dataset = {
            "layout": "folders",
            "images": str(root / "images"),
            "labels_dir": str(root / "labels"),
            "channels": 2,
            "labels": names,
        }
    else:
        dataset = {
            "layout": "case_folders",
            "root": str(root),
            "channels": ["flair.nii.gz", "t1c.nii.gz"],
            "label": "truth.nii.gz",
            "labels": names,
        }
    config = load_config(
        write_config(tmp_path, dataset, card=_two_channel_card(), epochs=30, validate_every=30, learning_rate=0.02)
    )
    folder = train(config)
    validation = json.loads((folder / "model.json").read_text())["training"]["validation"]["mean"]
    assert validation["Other"] > 0.8, validation  # label 2 needs the second channel


def _folder_pairs(root, channels=None):
    """Empty ``images`` and ``labels`` folders under ``root``, one case's first channel and labels to write there,
    and the ``folders`` layout that reads them (``channels`` where given)."""
    first, _, labels = _two_channel_case(np.random.default_rng(1))
    (root / "images").mkdir()
    (root / "labels").mkdir()
    spec = {"layout": "folders", "images": str(root / "images"), "labels_dir": str(root / "labels")}
    if channels is not None:
        spec["channels"] = channels
    spec["labels"] = {"0": "bg", "1": "a", "2": "b"}
    return first, labels, spec


def test_folder_pairs_with_a_missing_image_channel_are_refused(tmp_path):
    from training.data import DatasetError, read_dataset

    first, labels, spec = _folder_pairs(tmp_path, channels=2)
    _write_image(first, tmp_path / "images" / "c0_0000.nii.gz")
    _write_image(labels, tmp_path / "labels" / "c0.nii.gz")
    with pytest.raises(DatasetError, match=r"c0_0001.nii.gz: the image for label .*c0.nii.gz is missing"):
        read_dataset(spec)


def test_single_channel_folder_pairs_with_nnunet_names_are_read(tmp_path):
    """case_0000.nii.gz pairs with labels/case.nii.gz when channels is 1, as it does for several channels."""
    from training.data import DatasetError, read_dataset

    first, labels, spec = _folder_pairs(tmp_path)
    for case in ("c0", "c1"):
        _write_image(first, tmp_path / "images" / f"{case}_0000.nii.gz")
        _write_image(labels, tmp_path / "labels" / f"{case}.nii.gz")
    cases, _ = read_dataset(spec)
    assert [(c.case_id, [p.name for p in c.images]) for c in cases] == [
        ("c0", ["c0_0000.nii.gz"]),
        ("c1", ["c1_0000.nii.gz"]),
    ]
    _write_image(first, tmp_path / "images" / "c2_0000.nii.gz")  # no labels/c2.nii.gz
    with pytest.raises(DatasetError, match=r"labels: no label file for image\(s\) \['c2'\]"):
        read_dataset(spec)


def test_two_label_files_with_one_case_id_are_refused(tmp_path):
    """labels/x.nii.gz and labels/x.nrrd are both case x: splits and results could not tell them apart."""
    from training.data import DatasetError, read_dataset

    first, labels, spec = _folder_pairs(tmp_path)
    for suffix in (".nii.gz", ".nrrd"):
        _write_image(first, tmp_path / "images" / f"x{suffix}")
        _write_image(labels, tmp_path / "labels" / f"x{suffix}")
    with pytest.raises(DatasetError, match=r"x\.nrrd: its case id 'x' is also that of .*x\.nii\.gz"):
        read_dataset(spec)


def test_saved_splits_that_leak_cases_are_refused(tmp_path):
    from training.data import DatasetError, load_or_make_splits

    ids = [f"c{i}" for i in range(6)]
    path = tmp_path / "splits.json"

    def load(splits, folds):
        path.write_text(json.dumps(splits))
        return load_or_make_splits(path, ids, folds=folds, validation_fraction=0.2, seed=0)

    with pytest.raises(DatasetError, match=r"splits.json: split 0 has case\(s\) \['c1'\] in both train and val"):
        load([{"train": ids, "val": ["c1"]}], 0)
    overlapping = [
        {"train": ["c2", "c3", "c4", "c5"], "val": ["c0", "c1"]},
        {"train": ["c0", "c4", "c5"], "val": ["c1", "c2", "c3"]},
        {"train": ["c0", "c1", "c2", "c3"], "val": ["c4", "c5"]},
    ]
    with pytest.raises(DatasetError, match=r"case\(s\) \['c1'\] validate in both fold 0 and fold 1"):
        load(overlapping, 3)
    with pytest.raises(DatasetError, match=r"split 0 names case\(s\) \['c2'\] more than once in train"):
        load([{"train": ["c2", "c2", "c3", "c4", "c5"], "val": ["c0", "c1"]}], 0)
    with pytest.raises(DatasetError, match=r"case id\(s\) \['c0'\] name more than one case"):
        load_or_make_splits(tmp_path / "new.json", [*ids, "c0"], folds=0, validation_fraction=0.2, seed=0)
    assert not (tmp_path / "new.json").exists()
    fine = [{"train": ["c2", "c3", "c4", "c5"], "val": ["c0", "c1"]}]
    assert load(fine, 0) == fine


def test_a_card_with_other_channels_than_the_dataset_is_refused(tmp_path):
    dataset = make_dataset(tmp_path / "toy")
    config = load_config(write_config(tmp_path, dataset, card=_two_channel_card()))
    with pytest.raises(DatasetError, match=r"case_000.nii.gz: case case_000 has 1 channel\(s\); the card names 2"):
        train(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"augmentation": {"rotation_degree": 5}}, r"\(augmentation\): unknown config key\(s\) \['rotation_degree'\]"),
        ({"folds": 5, "fold": 5}, r"fold 5 is outside 0..4"),
        ({"amp": "fp8"}, r"unknown amp 'fp8'; choose one of auto, off, bf16"),
        ({"export": ["tflite"]}, r"unknown export 'tflite'"),
        ({"dataset": {"layout": "nnunet", "root": "x"}}, r"unknown dataset layout 'nnunet'"),
        (
            {"dataset": {"layout": "folders", "images": "i", "labels": {}}},
            r"the folders dataset layout needs labels_dir",
        ),
        (
            {
                "dataset": {
                    "layout": "case_folders",
                    "root": "r",
                    "channels": [],
                    "label": "l",
                    "labels": {},
                    "chanels": 2,
                }
            },
            r"\(dataset, layout case_folders\): unknown config key\(s\) \['chanels'\]",
        ),
    ],
)
def test_config_mistakes_are_refused_before_any_data_is_read(tmp_path, overrides, message):
    dataset = overrides.pop("dataset", tmp_path / "nowhere")
    with pytest.raises(ValueError, match=message):
        load_config(write_config(tmp_path, dataset, **overrides))


@pytest.mark.slow
def test_early_stopping_dropout_and_clipping_are_applied(tmp_path):
    dataset = make_dataset(tmp_path / "toy")
    config = load_config(
        write_config(tmp_path, dataset, epochs=6, learning_rate=0.0, early_stopping=2, dropout=0.2, gradient_clip=1.0)
    )
    folder = train(config)
    card = json.loads((folder / "model.json").read_text())
    assert card["network"]["kwargs"]["dropout"] == 0.2
    history = json.loads((config.run_path / "metrics.json").read_text())["history"]
    assert len(history) == 3, "no improvement with a zero learning rate: stops after two stale validations"
    assert card["training"]["stopped_early"] is True and card["training"]["best_epoch"] == 1


@pytest.mark.slow
def test_exports_match_pytorch_and_report_dice_and_speed(tmp_path):
    import onnx
    import onnxruntime
    import torch

    dataset = make_dataset(tmp_path / "toy")
    config = load_config(
        write_config(tmp_path, dataset, epochs=20, validate_every=20, export=["torchscript", "onnx", "fp16", "int8"])
    )
    folder = train(config)
    exports = config.run_path / "exports"
    report = json.loads((exports / "report.json").read_text())
    assert report["torchscript"]["max_abs_logit_difference"] <= 1e-4
    assert report["onnx"]["max_abs_logit_difference"] <= 1e-3
    reference = report["pytorch_fp32"]["dice"]
    assert reference["Bright"] > 0.8, "the toy model must have learnt something for the comparison to mean anything"
    for kind in ("torchscript", "onnx"):
        assert report[kind]["dice"] == pytest.approx(reference, abs=0.002)
    for kind in ("fp16", "int8"):
        assert report[kind]["dice"]["Bright"] > reference["Bright"] - 0.05, report[kind]
        assert report[kind]["speed_vs_pytorch_fp32"] > 0
    quantised = {node.op_type for node in onnx.load(str(exports / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= quantised
    # the files run without MedSeg: TorchScript in torch alone, ONNX in ONNX Runtime alone
    window = np.random.default_rng(0).normal(size=(1, 1, 16, 16, 16)).astype(np.float32)
    scripted = torch.jit.load(str(exports / "model.torchscript.pt"))
    session = onnxruntime.InferenceSession(str(exports / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        from_script = scripted(torch.from_numpy(window)).numpy()
    np.testing.assert_allclose(session.run(None, {"image": window})[0], from_script, atol=1e-3)
    assert folder.is_dir()


@pytest.mark.slow
def test_adversarial_training_trains_records_and_resumes_exactly(tmp_path):
    import torch

    dataset = make_dataset(tmp_path / "toy")
    common = {"epochs": 2, "steps_per_epoch": 2, "adversarial_weight": 0.1, "validate_every": 2}
    straight = load_config(write_config(tmp_path, dataset, output=str(tmp_path / "a" / "m"), **common))
    split = load_config(write_config(tmp_path, dataset, output=str(tmp_path / "b" / "m"), **common))
    folder = train(straight)
    train(split, stop_at_step=1)
    train(split, resume=True)
    a = torch.load(straight.run_path / "checkpoint.pt", weights_only=False)
    b = torch.load(split.run_path / "checkpoint.pt", weights_only=False)
    for part in ("network",):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert all(torch.equal(v, b["adversary"]["network"][k]) for k, v in a["adversary"]["network"].items())
    history = json.loads((straight.run_path / "metrics.json").read_text())["history"]
    for entry in history:
        assert entry["loss"] == pytest.approx(entry["segmentation_loss"] + 0.1 * entry["adversarial_loss"], rel=1e-5)
        assert 0 < entry["discriminator_loss"] < 10
    assert json.loads((folder / "model.json").read_text())["training"]["config"]["adversarial_weight"] == 0.1


@pytest.mark.slow
def test_cross_validation_trains_every_fold_and_ships_the_summary(tmp_path, capsys):
    import torch

    from training.crossval import main as crossval

    dataset = make_dataset(tmp_path / "toy")
    description = "toy cross-validation, seconds on a CPU"
    path = write_config(tmp_path, dataset, epochs=2, folds=3, description=description, augmentation={"flip_axes": [2]})
    assert crossval([str(path), "--folds", "0"]) == 0
    assert not (tmp_path / "out" / "toy-model-cv.json").exists(), "no summary before every fold is done"
    assert crossval([str(path)]) == 0 and not (tmp_path / "out" / "toy-model").exists()
    for fold in range(3):  # as folds trained before cards listed mirror axes
        card_path = tmp_path / "out" / f"toy-model-fold{fold}" / "model.json"
        card = json.loads(card_path.read_text())
        assert card["inference"].pop("mirror_axes") == [2]
        card_path.write_text(json.dumps(card))
    assert crossval([str(path), "--tta", "--ship"]) == 0
    summary = json.loads((tmp_path / "out" / "toy-model-cv.json").read_text())
    assert summary["folds"] == 3 and summary["cases"] == 6, "each case is validated exactly once"
    splits = json.loads((tmp_path / "out" / "toy-model-splits.json").read_text())
    for fold in range(3):
        card = json.loads((tmp_path / "out" / f"toy-model-fold{fold}" / "model.json").read_text())
        assert card["training"]["split"]["validation"] == splits[fold]["val"]
        assert summary["per_fold"][fold]["dice"] == card["training"]["validation"]["mean"]
    for label in ("Bright", "Other"):
        assert summary["mean"][label] == pytest.approx(
            np.mean([f["dice"][label] for f in summary["per_fold"]]), abs=1e-4
        )
    # --tta: every fold's held-out cases again, mirrored along the axis its training flipped (z)
    mirrored = summary["mirrored"]
    assert [f["mirror_axes"] for f in mirrored["per_fold"]] == [[2]] * 3
    assert [f["cases"] for f in mirrored["per_fold"]] == [2, 2, 2]
    # after 2 epochs the toy model is far from mirror-symmetric: mirroring moves its Dice (by about 0.06 to 0.1)
    assert all(abs(mirrored["mean"][label] - summary["mean"][label]) > 0.02 for label in ("Bright", "Other"))
    fold0 = tmp_path / "out" / "toy-model-fold0"
    mirrorable = tmp_path / "fold0-mirrorable"
    shutil.copytree(fold0, mirrorable)
    card = json.loads((mirrorable / "model.json").read_text())
    card["inference"]["mirror_axes"] = [2]
    (mirrorable / "model.json").write_text(json.dumps(card))
    segmenter = Segmenter(mirrorable, device="cpu", inference=InferenceOptions(mirror_axes=(2,)))
    by_label = {"Bright": [], "Other": []}
    for case in splits[0]["val"]:
        result = segmenter.segment_files([dataset / "imagesTr" / f"{case}.nii.gz"], tmp_path / f"{case}-tta.nii.gz")
        assert result.inference.mirror_axes == (2,)
        reference = sitk.ReadImage(str(dataset / "labelsTr" / f"{case}.nii.gz"))
        scores = evaluate_images(result.labelmap, reference, [1, 2])
        by_label["Bright"].append(scores[1].dice)
        by_label["Other"].append(scores[2].dice)
    for label, dice in by_label.items():
        assert mirrored["per_fold"][0]["dice"][label] == pytest.approx(np.mean(dice), abs=1e-3)
        assert mirrored["mean"][label] == pytest.approx(
            np.mean([f["dice"][label] for f in mirrored["per_fold"]]), abs=1e-4
        )
    shipped = json.loads((tmp_path / "out" / "toy-model" / "model.json").read_text())
    assert shipped["training"]["cross_validation"]["mean"] == summary["mean"]
    assert shipped["training"]["cross_validation"]["mirrored"] == mirrored
    assert shipped["training"]["config"]["description"] == description
    assert shipped["inference"]["mirror_axes"] == [2], "the shipped card lists the axes training flipped"
    assert shipped["weights"]["storage"] == "float"
    Segmenter(tmp_path / "out" / "toy-model", device="cpu")
    float_size = (tmp_path / "out" / "toy-model" / "model.pt").stat().st_size

    assert crossval([str(path), "--ship", "--weights", "int8"]) == 0
    shipped = json.loads((tmp_path / "out" / "toy-model" / "model.json").read_text())
    fold = shipped["training"]["cross_validation"]["shipped_fold"]
    fold_card = json.loads((tmp_path / "out" / f"toy-model-fold{fold}" / "model.json").read_text())
    assert shipped["weights"]["storage"] == "int8"
    assert shipped["training"]["validation_float16"] == fold_card["training"]["validation"]
    rescored = shipped["training"]["validation"]
    assert rescored["cases"] == fold_card["training"]["validation"]["cases"] == 2
    for label, dice in rescored["mean"].items():
        assert dice == pytest.approx(fold_card["training"]["validation"]["mean"][label], abs=0.02)
    state = torch.load(tmp_path / "out" / "toy-model" / "model.pt", weights_only=True)
    assert any(v.dtype == torch.int8 for v in state.values()) and any(k.endswith(":scale") for k in state)
    assert (tmp_path / "out" / "toy-model" / "model.pt").stat().st_size < float_size
    Segmenter(tmp_path / "out" / "toy-model", device="cpu")


@pytest.mark.parametrize("name", ["hippocampus.json", "hippocampus-nnunet.json", "hippocampus-dynunet-cpu.json"])
def test_shipped_configs_load_and_say_how_long_they_take(name):
    from conftest import REPO

    config = load_config(REPO / "training" / "configs" / name)
    assert "CPU" in config.description and any(unit in config.description for unit in ("minutes", "hours", "days"))
    assert config.card["labels"][0]["name"] == "Anterior hippocampus"


@pytest.mark.parametrize("name", ["hippocampus.json", "hippocampus-nnunet.json", "hippocampus-dynunet-cpu.json"])
def test_shipped_configs_write_under_runs_never_into_the_bundled_models(name):
    """Training (and crossval's folds, splits and --ship, all beside ``output``) must not replace a bundled model."""
    from pathlib import Path

    from conftest import REPO

    config = load_config(REPO / "training" / "configs" / name)
    for path in (Path(config.output), config.run_path, config.splits_path):
        assert not path.is_absolute() and path.parts[0] == "runs", (name, path)


@pytest.mark.realdata
@pytest.mark.slow
def test_brats_two_channel_case_folders_train_end_to_end(tmp_path, shared_data):
    """FLAIR + T1c from ../shared/data/brats2013 (labels stored as float32) through training to a model folder."""
    card = card_dict(id="brats-toy")
    card.pop("weights")
    card["modality"] = "MR"
    card["channels"] = [{"name": "FLAIR", "modality": "MR"}, {"name": "T1c", "modality": "MR"}]
    names = json.loads((shared_data / "brats2013" / "labels.json").read_text())["labels_OTMultiClass"]
    card["labels"] = [
        {"value": int(v), "name": name, "color": [60 * int(v), 100, 200]} for v, name in names.items() if v != "0"
    ]
    card["preprocessing"]["spacing"] = [2.0, 2.0, 2.0]  # 120x120x78: a CPU-sized test
    card["inference"] = {"roi_size": [64, 64, 64], "overlap": 0.25, "blend_mode": "gaussian", "sw_batch_size": 2}
    dataset = {
        "layout": "case_folders",
        "root": str(shared_data / "brats2013"),
        "channels": ["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"],
        "label": "OTMultiClass.nii.gz",
        "labels": names,
    }
    config = load_config(
        write_config(
            tmp_path, dataset, card=card, epochs=2, steps_per_epoch=3, patch_size=[64, 64, 64], validate_every=2
        )
    )
    folder = train(config)
    written = json.loads((folder / "model.json").read_text())
    assert written["training"]["validation"]["cases"] == 2
    assert set(written["training"]["validation"]["mean"]) == set(names.values()) - {"background"}
    segmenter = Segmenter(folder, device="cpu")
    assert [c.name for c in segmenter.card.channels] == ["FLAIR", "T1c"]
    case = shared_data / "brats2013" / written["training"]["split"]["validation"][0]
    images = [sitk.ReadImage(str(case / name)) for name in dataset["channels"]]
    assert segmenter.segment(images).labelmap.GetSize() == images[0].GetSize()


def test_the_command_reports_bad_data_without_a_traceback(tmp_path, capsys):
    from training.__main__ import main

    dataset = make_dataset(tmp_path / "toy", label_values=(0, 1, 7))
    assert main([str(write_config(tmp_path, dataset))]) == 2
    error = capsys.readouterr().err
    assert "medseg-train: error:" in error and "label value(s) [7] not in dataset.json" in error
    assert "Traceback" not in error
    assert main([str(write_config(tmp_path, dataset, epocs=1))]) == 2
    assert "unknown config key(s) ['epocs']" in capsys.readouterr().err


def test_validation_metrics_are_per_label_and_in_millimetres():
    """A 'network' that returns the reference shifted by one voxel along x: known Dice, IoU and HD95."""
    import torch
    from medseg.models.card import card_from_dict

    from training.data import PreparedCase
    from training.train import validate

    label = np.zeros((20, 16, 12), np.uint8)
    label[4:14, 4:12, 3:9] = 1
    label[14:18, 4:12, 3:9] = 2

    class Shifted(torch.nn.Module):
        def forward(self, x):
            classes = torch.round(x[:, 0]).long().clamp(0, 2)
            return torch.roll(torch.nn.functional.one_hot(classes, 3).permute(0, 4, 1, 2, 3).float() * 10, 1, 2)

    draft = card_dict()
    draft["inference"] = {"roi_size": [20, 16, 12], "overlap": 0.0, "blend_mode": "constant", "sw_batch_size": 1}
    card = card_from_dict(draft)
    case = PreparedCase("c", label[None].astype(np.float32), label, spacing=(2.0, 1.0, 1.0))
    metrics = validate(Shifted(), [case], card, torch.device("cpu"))
    # label 1: 10 x-slices shifted by one -> 9 shared of 10
    assert metrics["Bright"]["dice"] == pytest.approx(0.9, abs=1e-4)
    assert metrics["Bright"]["iou"] == pytest.approx(9 / 11, abs=1e-4)
    for name in ("dice", "precision", "recall"):  # label 2: 3 of 4 slices shared, one lost, one gained
        assert metrics["Other"][name] == pytest.approx(0.75, abs=1e-4)
    assert metrics["Bright"]["hd95"] == pytest.approx(2.0, abs=1e-4), "one voxel along x is 2 mm"
    # a case without label 2, in the reference or the prediction, has no HD95 for it (not 0 mm)
    without = np.where(label == 2, 0, label).astype(np.uint8)
    other = PreparedCase("d", without[None].astype(np.float32), without, spacing=(2.0, 1.0, 1.0))
    both = validate(Shifted(), [case, other], card, torch.device("cpu"))
    assert both["Other"]["hd95"] == pytest.approx(metrics["Other"]["hd95"]) and metrics["Other"]["hd95"] > 0
    assert both["Other"]["dice"] == pytest.approx((0.75 + 1.0) / 2, abs=1e-4), "Dice still counts it, as 1"
    assert validate(Shifted(), [other], card, torch.device("cpu"))["Other"]["hd95"] is None


@pytest.mark.slow
def test_a_trained_folder_can_be_exported_afterwards(tmp_path, capsys):
    from training.export import main as export

    dataset = make_dataset(tmp_path / "toy")
    path = write_config(tmp_path, dataset, epochs=2)
    folder = train(load_config(path))
    assert export([str(path), "--kinds", "torchscript", "onnx", "--out", str(tmp_path / "exp")]) == 0
    report = json.loads((tmp_path / "exp" / "report.json").read_text())
    assert set(report) >= {"pytorch_fp32", "torchscript", "onnx"} and "int8" not in report
    assert report["cases"] == len(json.loads((folder / "model.json").read_text())["training"]["split"]["validation"])
    capsys.readouterr()
    assert export([str(path), "--model", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no fast bfloat16")
def test_bf16_mixed_precision_trains_on_a_cpu_that_has_it(tmp_path):
    dataset = make_dataset(tmp_path / "toy")
    folders = {
        amp: train(load_config(write_config(tmp_path, dataset, amp=amp, epochs=12, output=str(tmp_path / amp / "m"))))
        for amp in ("off", "bf16")
    }
    cards = {amp: json.loads((folder / "model.json").read_text()) for amp, folder in folders.items()}
    assert cards["bf16"]["training"]["config"]["amp"] == "bf16"
    assert cards["bf16"]["weights"]["sha256"] != cards["off"]["weights"]["sha256"], "it really ran in bfloat16"
    dice = {amp: card["training"]["validation"]["mean"]["Bright"] for amp, card in cards.items()}
    assert dice["off"] > 0.7 and abs(dice["bf16"] - dice["off"]) < 0.03, dice  # 0.42 after 3 epochs


def test_bf16_on_a_device_without_it_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    import medseg.inference

    # the one stand-in: this test machine has fast bfloat16, so the probe answers as a CPU without it would
    monkeypatch.setattr(medseg.inference, "low_precision_for", lambda device: None)
    config = load_config(write_config(tmp_path, tmp_path / "no-such-dataset", amp="bf16"))
    with pytest.raises(ValueError, match=r"amp bf16: cpu has no fast bfloat16 .* use amp off"):
        train(config)
    assert not list(tmp_path.glob("**/splits.json"))


@pytest.mark.slow
def test_compiled_channels_last_training_matches_eager_and_resumes_an_eager_checkpoint(tmp_path):
    """compile and channels_last change the speed, not the optimisation: same losses, a plain model folder."""
    import torch

    dataset = make_dataset(tmp_path / "toy")
    common = {"epochs": 4, "steps_per_epoch": 3, "validate_every": 2}
    eager = load_config(write_config(tmp_path, dataset, output=str(tmp_path / "eager" / "m"), **common))
    fast = {"compile": True, "channels_last": True}
    compiled = load_config(write_config(tmp_path, dataset, output=str(tmp_path / "fast" / "m"), **common, **fast))
    folders = {"eager": train(eager)}
    # the fast run starts as an eager one interrupted after 5 steps, resumed with compile and channels_last on
    interrupted = load_config(write_config(tmp_path, dataset, output=str(tmp_path / "fast" / "m"), **common))
    assert train(interrupted, stop_at_step=5) is None
    folders["fast"] = train(compiled, resume=True)
    histories = {
        name: json.loads((config.run_path / "metrics.json").read_text())["history"]
        for name, config in (("eager", eager), ("fast", compiled))
    }
    losses = {name: np.array([e["loss"] for e in history]) for name, history in histories.items()}
    assert len(losses["eager"]) == len(losses["fast"]) == 4
    assert losses["fast"][-1] < 0.8 * losses["fast"][0], "the compiled run did not learn"
    np.testing.assert_allclose(losses["fast"], losses["eager"], rtol=0.02)  # rounding only, not another recipe
    cards = {name: json.loads((folder / "model.json").read_text()) for name, folder in folders.items()}
    assert cards["fast"]["training"]["config"]["compile"] is True
    dice = {name: card["training"]["validation"]["mean"]["Bright"] for name, card in cards.items()}
    assert abs(dice["fast"] - dice["eager"]) < 0.02, dice
    best = torch.load(compiled.run_path / "checkpoint.pt", weights_only=False)["state"]["best_state"]
    assert all(v.is_contiguous() for v in best.values()), "the kept best weights hold the channels-last layout"


def test_config_values_of_the_wrong_kind_are_refused_before_training(tmp_path, monkeypatch):
    import training.train

    dataset = make_dataset(tmp_path / "toy")
    for overrides, message in (
        ({"augmentation": {"flip_axes": [0, 0]}}, r"flip_axes must be distinct axes among 0, 1, 2, not \[0, 0\]"),
        ({"augmentation": {"flip_axes": [True]}}, "flip_axes must be distinct axes"),
        ({"plan_filters": ["16", 128]}, r"plan_filters must be \[first, most\]"),
        ({"plan_filters": [64, 32]}, r"plan_filters must be \[first, most\]"),
        ({"compile": "yes"}, "compile must be true or false"),
    ):
        with pytest.raises(ValueError, match=message):
            load_config(write_config(tmp_path, dataset, **overrides))
    monkeypatch.setattr(training.train.shutil, "which", lambda name: None)  # a machine without a C++ compiler
    config = load_config(write_config(tmp_path, dataset, compile=True, output=str(tmp_path / "nocc" / "m")))
    with pytest.raises(ValueError, match="torch.compile on a CPU needs a C\\+\\+ compiler"):
        train(config)
    assert not (tmp_path / "nocc").exists()


def test_weights_that_a_network_lists_twice_are_written_once(tmp_path):
    """DynUNet registers its encoder layers twice (also as skip_layers); the model folder stores them once."""
    import torch
    from medseg.models.architectures import build_network

    from training.train import shared_duplicates

    kwargs = {
        "kernel_size": [[3, 3, 3]] * 3,
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "upsample_kernel_size": [[2, 2, 2]] * 2,
        "filters": [8, 16, 32],
        "res_block": True,
    }
    network = build_network("DynUNet", in_channels=1, out_channels=3, kwargs=kwargs)
    halves = {k: v.half() if v.is_floating_point() else v for k, v in network.state_dict().items()}  # copies each
    torch.save(halves, tmp_path / "naive.pt")
    torch.save(shared_duplicates(halves), tmp_path / "shared.pt")
    unique_bytes = sum(p.numel() * 2 for p in network.parameters())
    assert (tmp_path / "naive.pt").stat().st_size > 1.8 * unique_bytes, "DynUNet no longer lists weights twice?"
    assert (tmp_path / "shared.pt").stat().st_size < 1.2 * unique_bytes + 50_000
    loaded = torch.load(tmp_path / "shared.pt", weights_only=True)
    assert loaded.keys() == halves.keys() and all(torch.equal(loaded[k], halves[k]) for k in halves)
    from medseg.models.folder import quantized

    torch.save(quantized(shared_duplicates(halves)), tmp_path / "int8.pt")
    assert (tmp_path / "int8.pt").stat().st_size < 0.6 * (tmp_path / "shared.pt").stat().st_size + 50_000
    fresh = build_network("DynUNet", in_channels=1, out_channels=3, kwargs=kwargs)
    fresh.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in loaded.items()})
    assert all(torch.equal(a.half(), b.half()) for a, b in zip(fresh.state_dict().values(), halves.values()))


def test_a_checkpoint_from_before_an_option_existed_resumes_with_its_default(tmp_path):
    import torch

    dataset = make_dataset(tmp_path / "toy")
    config = load_config(write_config(tmp_path, dataset, epochs=2))
    train(config, stop_at_step=1)
    path = config.run_path / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["config"]["plan_filters"]
    del checkpoint["config"]["augmentation"]["gamma"]  # an augmentation option added later
    torch.save(checkpoint, path)
    assert (train(config, resume=True) / "model.json").is_file()
    checkpoint["config"]["plan_filters"] = [16, 128]  # a value that is not the default is a change
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"made with a different config \(plan_filters changed\)"):
        train(config, resume=True)


def test_a_held_out_case_missing_from_the_dataset_is_a_clear_error(tmp_path):
    from training.crossval import held_out_cases

    config = load_config(write_config(tmp_path, make_dataset(tmp_path / "toy"), folds=3))
    card = {"training": {"split": {"validation": ["case_001", "case_004"]}}}
    assert held_out_cases(card, tmp_path / "fold0", config, {"case_001": 1, "case_004": 4}) == [1, 4]
    with pytest.raises(ValueError, match=r"fold0: held-out case\(s\) case_004 are not in .*toy"):
        held_out_cases(card, tmp_path / "fold0", config, {"case_001": 1})


def _prepared_cases(n=2):
    from training.data import PreparedCase

    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        label = np.zeros((20, 24, 20), np.uint8)
        label[5:12, 6:14, 4:10] = 1
        volume = rng.normal(0, 1, (1, *label.shape)).astype(np.float32) + 2 * (label > 0)
        cases.append(PreparedCase(f"c{i}", volume, label))
    return cases


def test_a_failed_export_leaves_no_file_behind(tmp_path, monkeypatch):
    """int8 fails after the intermediate ONNX file and its own are written: neither stays; the TorchScript export
    before it passed and does."""
    from helpers import write_model_folder

    from training import export

    folder = write_model_folder(tmp_path / "model")
    out = tmp_path / "exports"
    monkeypatch.setitem(export.PARITY, "int8", -1.0)  # the one stand-in: no int8 model can pass this
    with pytest.raises(export.ExportError, match="int8 export of .*model differs from PyTorch"):
        export.export_model(folder, out, ["torchscript", "int8"], _prepared_cases(), _prepared_cases())
    assert sorted(p.name for p in out.iterdir()) == ["model.torchscript.pt"]


@pytest.mark.slow
def test_the_command_reports_a_failed_export_without_a_traceback(tmp_path, capsys, monkeypatch):
    from training import export
    from training.__main__ import main

    dataset = make_dataset(tmp_path / "toy")
    path = write_config(tmp_path, dataset, epochs=1, export=["onnx"])
    monkeypatch.setitem(export.PARITY, "onnx", -1.0)  # the one stand-in: no ONNX model can pass this
    assert main([str(path)]) == 2
    error = capsys.readouterr().err
    assert "medseg-train: error: onnx export of" in error and "Traceback" not in error
    assert list((tmp_path / "out" / "toy-model.run" / "exports").iterdir()) == [], "no file of the failed export"
