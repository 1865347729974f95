"""Train a segmentation network and write a model folder the engine loads.

One command, one config: ``python -m training training/configs/hippocampus.json``. The config fixes the data,
the seeded split, the network and the card; the engine's own preprocessing and sliding-window inference are
used for training data and validation, so training and inference cannot drift.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medseg import io
from medseg.metrics import dice_per_label, evaluate_images
from medseg.models.card import card_from_dict, write_card
from medseg.models.folder import sha256_of

from .data import DatasetError, PreparedCase, prepare_case, read_label, read_msd_dataset, split_cases

logger = logging.getLogger("training")


@dataclass
class Augmentation:
    flip_axes: tuple[int, ...] = ()  #: spatial axes (0=x, 1=y, 2=z) flipped at random; never flip A-P labels
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise_std: float = 0.05


@dataclass
class TrainConfig:
    dataset: str
    output: str
    card: dict[str, Any]
    seed: int = 0
    validation_fraction: float = 0.2
    epochs: int = 100
    batch_size: int = 8
    patch_size: tuple[int, int, int] = (48, 64, 48)
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    validate_every: int = 10
    threads: int = 0  #: torch CPU threads; 0 keeps PyTorch's default
    device: str = "auto"
    augmentation: Augmentation = field(default_factory=Augmentation)
    loss: str = "dice_ce"  #: one of LOSSES
    optimizer: str = "adamw"  #: one of OPTIMIZERS
    momentum: float = 0.99  #: SGD's (Nesterov) momentum, nnU-Net's value
    schedule: str = "poly"  #: one of SCHEDULES: polynomial decay (power 0.9, as nnU-Net) or cosine


KNOWN_KEYS = set(TrainConfig.__dataclass_fields__)
LOSSES = ("ce", "dice", "dice_ce", "dice_focal")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("poly", "cosine")


def check_choices(config: TrainConfig, source: str) -> None:
    """Refuse an unknown loss, optimiser or schedule before any data is read."""
    for key, choices in (("loss", LOSSES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        value = getattr(config, key)
        if value not in choices:
            raise ValueError(f"{source}: unknown {key} {value!r}; choose one of {', '.join(choices)}")


def make_loss(name: str):
    """The loss on (B, K, ...) logits and (B, 1, ...) integer labels."""
    from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss

    if name == "ce":
        cross_entropy = torch.nn.CrossEntropyLoss()
        return lambda logits, labels: cross_entropy(logits, labels[:, 0])
    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True)
    if name == "dice_focal":
        return DiceFocalLoss(to_onehot_y=True, softmax=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)


def make_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=config.learning_rate,
            momentum=config.momentum,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
    kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return kind(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    total = max(total_steps, 1)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(1 - step / total, 0.0) ** 0.9)


@dataclass
class TrainingRun:
    """What a finished run hands to the model-folder writer."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, Any]]
    train_ids: list[str]
    validation_cases: list  #: the validation ``Case`` objects, scored from their files once the folder exists
    provenance: dict[str, Any]


def load_config(path: str | Path) -> TrainConfig:
    """Read a JSON or YAML config; unknown keys are refused (a typo must not be silently ignored)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown config key(s) {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}")
    augmentation = Augmentation(**data.pop("augmentation", {}))
    config = TrainConfig(**data, augmentation=augmentation)
    config.patch_size = tuple(config.patch_size)
    check_choices(config, str(path))
    base = path.parent
    for key in ("dataset", "output"):
        value = Path(getattr(config, key))
        if not value.is_absolute() and not value.exists() and (base / value).exists():
            setattr(config, key, str(base / value))
    return config


def _random_patch(
    case: PreparedCase, patch: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A patch of ``patch`` size at a random place, zero-padded where the volume is smaller (as MONAI pads)."""
    volume, label = case.volume, case.label
    out_v = np.zeros((volume.shape[0], *patch), np.float32)
    out_l = np.zeros(patch, np.uint8)
    src, dst = [], []
    for size, p in zip(label.shape, patch):
        if size >= p:
            s = int(rng.integers(0, size - p + 1))
            src.append(slice(s, s + p))
            dst.append(slice(0, p))
        else:
            d = int(rng.integers(0, p - size + 1))
            src.append(slice(0, size))
            dst.append(slice(d, d + size))
    out_v[(slice(None), *dst)] = volume[(slice(None), *src)]
    out_l[tuple(dst)] = label[tuple(src)]
    return out_v, out_l


def _augment(volume: np.ndarray, label: np.ndarray, aug: Augmentation, rng: np.random.Generator):
    for axis in aug.flip_axes:
        if rng.random() < 0.5:
            volume = np.flip(volume, axis=axis + 1)
            label = np.flip(label, axis=axis)
    scale = 1 + rng.uniform(-aug.intensity_scale, aug.intensity_scale)
    shift = rng.uniform(-aug.intensity_shift, aug.intensity_shift)
    volume = volume * scale + shift
    if aug.noise_std > 0:
        volume = volume + rng.normal(0, aug.noise_std, volume.shape).astype(np.float32)
    return np.ascontiguousarray(volume, dtype=np.float32), np.ascontiguousarray(label)


def _batches(cases: list[PreparedCase], config: TrainConfig, rng: np.random.Generator):
    order = rng.permutation(len(cases))
    for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
        pairs = [
            _augment(*_random_patch(cases[i], config.patch_size, rng), config.augmentation, rng)
            for i in order[start : start + config.batch_size]
        ]
        yield (
            torch.from_numpy(np.stack([p[0] for p in pairs])),
            torch.from_numpy(np.stack([p[1] for p in pairs])[:, None].astype(np.int64)),
        )


def _validate(network, cases, card, device) -> dict[int, float]:
    from medseg.inference import InferenceOptions, sliding_window_probabilities

    network.eval()
    exact = InferenceOptions(precision="fp32")  # validation scores must not depend on a precision trial
    values = [label.value for label in card.labels]
    scores = {v: [] for v in values}
    for case in cases:
        probabilities = sliding_window_probabilities(network, case.volume, card.inference, device=device, options=exact)
        for v, d in dice_per_label(np.argmax(probabilities, 0), case.label, values).items():
            scores[v].append(d)
    network.train()
    return {v: float(np.mean(s)) for v, s in scores.items()}


def _card_draft(config: TrainConfig) -> dict[str, Any]:
    """The config's card with a placeholder checksum, validated early so a bad card fails before training."""
    draft = copy.deepcopy(config.card)
    draft.setdefault("format_version", 1)
    draft["weights"] = {"file": "model.pt", "sha256": "0" * 64}
    card_from_dict(draft, f"{config.output} (card in the training config)")
    return draft


def train(config: TrainConfig, *, command: str = "python -m training CONFIG") -> Path:
    """Train, pick the best epoch by validation Dice, write the model folder, and evaluate it from files.

    Args:
        config: the training config.
        command: how this run was started, recorded in the card's provenance.
    """
    from medseg.inference import select_device
    from medseg.models.architectures import build_network

    check_choices(config, "the training config")
    started = time.time()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    draft = _card_draft(config)
    card = card_from_dict(draft)
    device = select_device(config.device)

    cases, dataset_labels = read_msd_dataset(config.dataset)
    valid_values = set(dataset_labels)
    if valid_values != {0, *(label.value for label in card.labels)}:
        raise DatasetError(
            f"the card's labels {[lb.value for lb in card.labels]} do not match dataset.json {sorted(valid_values)}"
        )
    train_ids, val_ids = split_cases(
        [c.case_id for c in cases], validation_fraction=config.validation_fraction, seed=config.seed
    )
    by_id = {c.case_id: c for c in cases}
    logger.info("dataset %s: %d training, %d validation cases", config.dataset, len(train_ids), len(val_ids))
    prepared = {cid: prepare_case(by_id[cid], card.preprocessing, valid_values) for cid in train_ids + val_ids}
    train_cases = [prepared[c] for c in train_ids]
    val_cases = [prepared[c] for c in val_ids]

    network = build_network(
        card.network.architecture,
        in_channels=len(card.channels),
        out_channels=card.num_classes,
        kwargs=card.network.kwargs,
    ).to(device)
    optimizer = make_optimizer(config, network.parameters())
    steps_per_epoch = len(train_cases) // config.batch_size
    schedule = make_schedule(config, optimizer, config.epochs * steps_per_epoch)
    loss_fn = make_loss(config.loss)
    best = (-1.0, 0, None)
    history = []
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        losses = []
        network.train()
        for x, y in _batches(train_cases, config, rng):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(network(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        entry = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - t0}
        if epoch % config.validate_every == 0 or epoch == config.epochs:
            dice = _validate(network, val_cases, card, device)
            entry["validation_dice"] = dice
            mean = float(np.mean(list(dice.values())))
            if mean > best[0]:
                best = (mean, epoch, {k: v.detach().cpu().clone() for k, v in network.state_dict().items()})
        history.append(entry)
        logger.info(
            "epoch %d/%d loss %.4f %.1fs %s",
            epoch,
            config.epochs,
            entry["loss"],
            entry["seconds"],
            entry.get("validation_dice", ""),
        )
    training_seconds = time.time() - started
    run = TrainingRun(
        best_state=best[2],
        best_epoch=best[1],
        history=history,
        train_ids=train_ids,
        validation_cases=[by_id[c] for c in val_ids],
        provenance={"command": command, "training_seconds": round(training_seconds, 1), "device": str(device)},
    )
    return _write_model_folder(config, draft, run)


def _write_model_folder(config: TrainConfig, draft: dict[str, Any], run: TrainingRun) -> Path:
    """Write weights (float16) and card to a temporary folder, evaluate it from files, then move it in place."""
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    tmp.chmod(0o755)
    try:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in run.best_state.items()}
        torch.save(state, tmp / "model.pt")
        draft["weights"] = {"file": "model.pt", "sha256": sha256_of(tmp / "model.pt")}
        draft["training"] = {
            "command": run.provenance["command"],
            "dataset": str(config.dataset),
            "seed": config.seed,
            "split": {
                "validation_fraction": config.validation_fraction,
                "train": run.train_ids,
                "validation": [case.case_id for case in run.validation_cases],
            },
            "epochs": config.epochs,
            "best_epoch": run.best_epoch,
            "batch_size": config.batch_size,
            "patch_size": list(config.patch_size),
            "learning_rate": config.learning_rate,
            "loss": config.loss,
            "optimizer": config.optimizer,
            "schedule": config.schedule,
            "weight_decay": config.weight_decay,
            "augmentation": config.augmentation.__dict__,
            "training_seconds": run.provenance["training_seconds"],
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {run.provenance['device']}",
            "torch": torch.__version__,
        }
        write_card(card_from_dict(draft), tmp)
        validation = evaluate_model_folder(tmp, run.validation_cases)
        draft["training"]["validation"] = validation
        write_card(card_from_dict(draft), tmp)
        (tmp / "history.json").write_text(json.dumps(run.history, indent=1) + "\n")
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s: validation %s", output, validation["mean"])
    return output


def evaluate_model_folder(folder: Path, cases) -> dict[str, Any]:
    """Segment each case from its files with the engine (CPU) and score it on the original grid."""
    from medseg.segmenter import Segmenter

    segmenter = Segmenter(folder, device="cpu")
    card = segmenter.card
    values = [label.value for label in card.labels]
    per_case = {}
    for case in cases:
        result = segmenter.segment(io.read_channels(case.images))
        reference = read_label(case.label, {0, *values})
        metrics = evaluate_images(result.labelmap, reference, values)
        per_case[case.case_id] = {str(v): round(m.dice, 4) for v, m in metrics.items()}
    names = {label.value: label.name for label in card.labels}
    summary = {
        "metric": "Dice",
        "cases": len(per_case),
        "mean": {names[v]: round(float(np.mean([c[str(v)] for c in per_case.values()])), 4) for v in values},
        "worst": {names[v]: round(float(np.min([c[str(v)] for c in per_case.values()])), 4) for v in values},
        "per_case": per_case,
    }
    return summary
