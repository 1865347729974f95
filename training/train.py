"""Train a segmentation network and write a model folder the engine loads.

One command, one config: ``python -m training training/configs/hippocampus.json``. The config fixes the data,
the seeded split, the network and the card; the engine's own preprocessing and sliding-window inference are
used for training data and validation, so training and inference cannot drift.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medseg import io
from medseg.metrics import evaluate_images
from medseg.models.card import card_from_dict, write_card
from medseg.models.folder import sha256_of

from .augment import augment
from .config import (
    LOSSES,
    OPTIMIZERS,
    SCHEDULES,
    Augmentation,
    TrainConfig,
    check_config,
    load_config,
)
from .data import (
    DatasetError,
    PreparedCase,
    load_or_make_splits,
    prepare_case,
    random_patch,
    read_dataset,
    read_label,
)

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULES",
    "Augmentation",
    "TrainConfig",
    "load_config",
    "make_loss",
    "make_optimizer",
    "make_schedule",
    "train",
]

logger = logging.getLogger("training")


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


def _card_draft(config: TrainConfig) -> dict[str, Any]:
    """The config's card with a placeholder checksum, validated early so a bad card fails before training."""
    draft = copy.deepcopy(config.card)
    draft.setdefault("format_version", 1)
    # test-time mirroring may use the axes training flipped, unless the config's card says otherwise
    draft.setdefault("inference", {}).setdefault("mirror_axes", sorted(config.augmentation.flip_axes))
    draft["weights"] = {"file": "model.pt", "sha256": "0" * 64}
    card_from_dict(draft, f"{config.output} (card in the training config)")
    return draft


def steps_per_epoch(config: TrainConfig, n_cases: int) -> int:
    return config.steps_per_epoch or max(1, n_cases // config.batch_size)


def epoch_order(config: TrainConfig, n_cases: int, epoch: int) -> np.ndarray:
    """The case index of every sample of one epoch, in order: seeded permutations, repeated as needed."""
    rng = np.random.default_rng([config.seed, epoch])
    needed = steps_per_epoch(config, n_cases) * config.batch_size
    return np.concatenate([rng.permutation(n_cases) for _ in range(-(-needed // n_cases))])[:needed]


def make_batch(cases: list[PreparedCase], config: TrainConfig, step: int, order: np.ndarray, positions: range):
    """The samples at ``positions`` of global batch ``step``, each drawn and augmented from its own seed."""
    per_epoch = len(order) // config.batch_size
    epoch, batch = divmod(step, per_epoch)
    volumes, labels = [], []
    for j in positions:
        rng = np.random.default_rng([config.seed, epoch, batch, j])
        case = cases[order[batch * config.batch_size + j]]
        volume, label = augment(*random_patch(case, config.patch_size, rng), config.augmentation, rng)
        volumes.append(volume)
        labels.append(label)
    return torch.from_numpy(np.stack(volumes)), torch.from_numpy(np.stack(labels)[:, None].astype(np.int64))


def _finite_mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return round(float(np.mean(finite)), 4) if finite else None


def validate(network, cases: list[PreparedCase], card, device) -> dict[str, dict[str, float | None]]:
    """Per label: mean Dice, IoU, precision, recall and HD95 (mm, over the cases where both masks hold the label)."""
    from medseg.inference import InferenceOptions, sliding_window_probabilities
    from medseg.metrics import evaluate

    was_training = network.training
    network.eval()
    # float32 in PyTorch: scores must not depend on a precision trial, and weights that change at every
    # validation would each be converted (and cached) for OpenVINO
    exact = InferenceOptions(precision="fp32", backend="torch")
    per_label: dict[int, list] = {label.value: [] for label in card.labels}
    hd95: dict[int, list[float]] = {value: [] for value in per_label}
    for case in cases:
        probabilities = sliding_window_probabilities(network, case.volume, card.inference, device=device, options=exact)
        prediction = np.argmax(probabilities, 0)
        scores = evaluate(prediction, case.label, list(per_label), case.spacing)
        for value, metrics in scores.items():
            per_label[value].append(metrics)
            # a label absent from both masks has HD95 0 and one absent from either inf: neither is a distance
            if (prediction == value).any() and (case.label == value).any():
                hd95[value].append(metrics.hd95)
    network.train(was_training)
    names = {label.value: label.name for label in card.labels}
    return {
        names[v]: {
            "dice": round(float(np.mean([m.dice for m in ms])), 4),
            "iou": round(float(np.mean([m.iou for m in ms])), 4),
            "precision": round(float(np.mean([m.precision for m in ms])), 4),
            "recall": round(float(np.mean([m.recall for m in ms])), 4),
            "hd95": _finite_mean(hd95[v]),
        }
        for v, ms in per_label.items()
    }


def _dropout_kwargs(architecture: str, dropout: float | None) -> dict[str, float]:
    """The architecture's own name for its dropout rate, set to ``dropout``."""
    if dropout is None:
        return {}
    import inspect

    from medseg.models import networks
    from monai.networks import nets

    cls = getattr(networks, architecture, None) or getattr(nets, architecture)
    for base in cls.__mro__:  # a subclass taking **kwargs (SEUNet) passes its parent's dropout on
        accepted = inspect.signature(base.__init__).parameters
        for name in ("dropout", "dropout_prob", "dropout_rate", "drop_rate"):
            if name in accepted:
                return {name: dropout}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            break
    raise ValueError(f"the training config sets dropout, but {architecture} takes no dropout rate")


@dataclass
class Distributed:
    """This process's place under ``torchrun``; world 1 without it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_kind: str) -> Distributed:
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def broadcast(self, value):
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


RESUME_IGNORED = {
    "description",
    "epochs",
    "early_stopping",
    "progress",
    "threads",
    "export",
    "device",
    "validate_every",
    "checkpoint_every",
    "compile",  # speed only: the same optimisation to rounding
    "channels_last",
}


def _resume_card(card) -> dict[str, Any]:
    """The parts of the card the weights are trained for (channels, label values and names, preprocessing, network
    as planned, dropout set), defaults filled in; a checkpoint made with others is refused. Label colours and
    terminology, the inference settings and the descriptive fields may change."""
    import dataclasses

    parts = {
        "channels": [dataclasses.asdict(channel) for channel in card.channels],
        "labels": [{"value": label.value, "name": label.name} for label in card.labels],
        "preprocessing": dataclasses.asdict(card.preprocessing),
        "network": dataclasses.asdict(card.network),
    }
    return json.loads(json.dumps(parts, default=list))


def _differences(saved: Any, now: Any, prefix: str) -> list[str]:
    """The dotted keys at which two parsed JSON documents differ (lists compare whole)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = sorted(set(saved) | set(now))
        return [d for k in keys for d in _differences(saved.get(k), now.get(k), f"{prefix}.{k}")]
    return [] if saved == now else [prefix]


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded config, with each option added since then (augmentation's too) at its default."""
    import dataclasses

    def defaults(cls) -> dict[str, Any]:
        plain = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        return json.loads(json.dumps(plain, default=list))

    merged = {**defaults(TrainConfig), **saved}
    if isinstance(saved.get("augmentation"), dict):
        merged["augmentation"] = {**defaults(Augmentation), **saved["augmentation"]}
    return merged


def _rng_state(device: torch.device) -> dict[str, Any]:
    """PyTorch's global random state (CPU, and the training GPU's): dropout draws from it. Sampling and
    augmentation draw from their own seeded generators, and nothing draws from numpy's or Python's global one."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _restore_rng(state: dict[str, Any] | None, device: torch.device) -> None:
    """Continue PyTorch's random stream where a checkpoint left it (a checkpoint without one: as seeded)."""
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_atomically(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _amp(config: TrainConfig, device: torch.device):
    """(autocast dtype or None, GradScaler or None) for this device."""
    if config.amp == "bf16":
        from medseg.inference import low_precision_for

        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else low_precision_for(device) is not None
        if not fast:
            raise ValueError(f"amp bf16: {device} has no fast bfloat16 (on a CPU: AMX or AVX-512-BF16); use amp off")
        return torch.bfloat16, None
    if config.amp == "off" or device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


class _Optimisation:
    """The network's optimiser, schedule, loss scaler and (optionally) adversary, and one training step."""

    def __init__(self, config: TrainConfig, model, network, total_steps: int, card, device, world: int):
        self.config, self.model, self.network = config, model, network
        self.optimizer = make_optimizer(config, network.parameters())
        self.schedule = make_schedule(config, self.optimizer, total_steps)
        self.loss = make_loss(config.loss)
        self.device = device
        self.amp_dtype, self.scaler = _amp(config, device)
        self.adversary = None
        if config.adversarial_weight > 0:
            from .adversarial import Adversary

            self.adversary = Adversary(
                weight=config.adversarial_weight,
                learning_rate=config.adversarial_learning_rate,
                image_channels=len(card.channels),
                num_classes=card.num_classes,
                patch=config.patch_size,
                device=device,
                world=world,
            )

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, tuple[float, float, float] | None]:
        """One optimisation step; returns the loss and, with an adversary, (segmentation, fooling, discriminator)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
            if logits.dim() == y.dim() + 1:  # deep supervision: (batch, heads, classes, ...), each at full size
                weights = [0.5**head for head in range(logits.shape[1])]
                loss = sum(w * self.loss(logits[:, h], y) for h, w in enumerate(weights)) / sum(weights)
                logits = logits[:, 0]
            else:
                loss = self.loss(logits, y)
            segmentation = loss
            if self.adversary is not None:
                fooling, fake = self.adversary.generator_loss(x, logits)
                loss = segmentation + self.adversary.weight * fooling
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.config.gradient_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.config.gradient_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.schedule.step()
        if self.adversary is None:
            return float(loss.detach()), None
        discriminator = self.adversary.discriminator_step(x, y, fake)
        return float(loss.detach()), (float(segmentation.detach()), float(fooling.detach()), discriminator)

    def state_dict(self) -> dict[str, Any]:
        return {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "adversary": self.adversary.state_dict() if self.adversary is not None else None,
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.network.load_state_dict(checkpoint["network"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.adversary is not None:
            self.adversary.load_state_dict(checkpoint["adversary"])


def train(
    config: TrainConfig,
    *,
    command: str = "python -m training CONFIG",
    resume: bool = False,
    stop_at_step: int | None = None,
) -> Path | None:
    """Train, keep the best epoch by validation Dice, write the model folder, and evaluate it from files.

    Args:
        config: the training config.
        command: how this run was started, recorded in the card's provenance.
        resume: continue from ``<run_dir>/checkpoint.pt`` when it exists (the config must be the same, but for
            the epoch count and the options in ``RESUME_IGNORED``).
        stop_at_step: write a checkpoint after this many steps and return None (a time-sliced or preemptible
            run resumes from there with ``resume=True``).

    Returns:
        The model folder, or None when stopped by ``stop_at_step`` (and on every process but the first under
        torchrun).
    """
    from medseg.inference import select_device
    from medseg.models.architectures import build_network

    check_config(config, "the training config")
    started = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    draft = _card_draft(config)
    draft["network"]["kwargs"].update(_dropout_kwargs(draft["network"]["architecture"], config.dropout))
    card = card_from_dict(draft)
    device = select_device(config.device)
    dist = Distributed.from_environment(device.type)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if config.batch_size % dist.world:
        raise ValueError(f"batch_size {config.batch_size} does not split evenly over {dist.world} processes")
    _amp(config, device)  # an impossible amp fails here, before anything is read or written
    if (
        config.compile
        and device.type == "cpu"
        and not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c)
    ):
        raise ValueError(
            "compile: torch.compile on a CPU needs a C++ compiler (g++ or clang++, or $CXX), and none was found; "
            "install one or set compile to false"
        )
    cases, dataset_labels = read_dataset(config.dataset)
    valid_values = set(dataset_labels)
    if valid_values != {0, *(label.value for label in card.labels)}:
        raise DatasetError(
            f"the card's labels {[lb.value for lb in card.labels]} do not match the dataset's {sorted(valid_values)}"
        )
    plan = None
    if config.plan == "dynunet":
        config, draft, card, plan = _apply_plan(config, draft, cases)
    resume_card = _resume_card(card)
    run_dir = config.run_path
    checkpoint_path = run_dir / "checkpoint.pt"
    checkpoint = None
    if resume and checkpoint_path.is_file():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        # an option added since the checkpoint was made counts as its default
        saved, now = _with_defaults(checkpoint["config"]), config.as_dict()
        changed = sorted(k for k in set(saved) | set(now) if k not in RESUME_IGNORED and saved.get(k) != now.get(k))
        if "card" in checkpoint:  # a checkpoint from before cards were recorded is compared by its config alone
            changed += _differences(checkpoint["card"], resume_card, "card")
        if changed:
            raise ValueError(
                f"{checkpoint_path}: made with a different config ({', '.join(changed)} changed); "
                "resume with the config it was made with, or start afresh without --resume"
            )

    for case in cases:
        if len(case.images) != len(card.channels):
            raise DatasetError(
                f"{case.images[0]}: case {case.case_id} has {len(case.images)} channel(s); the card names "
                f"{len(card.channels)} ({', '.join(c.name for c in card.channels)})"
            )
    by_id = {c.case_id: c for c in cases}
    # Every case is read and checked (labels, grids) before anything is written or trained.
    prepared = {case.case_id: prepare_case(case, card.preprocessing, valid_values) for case in cases}
    if dist.main:
        splits = load_or_make_splits(
            config.splits_path,
            [c.case_id for c in cases],
            folds=config.folds,
            validation_fraction=config.validation_fraction,
            seed=config.seed,
        )
    dist.barrier()
    if not dist.main:
        splits = json.loads(config.splits_path.read_text(encoding="utf-8"))
    train_ids, val_ids = splits[config.fold]["train"], splits[config.fold]["val"]
    logger.info("dataset: %d training, %d validation cases (fold %d)", len(train_ids), len(val_ids), config.fold)
    train_cases = [prepared[c] for c in train_ids]
    val_cases = [prepared[c] for c in val_ids]

    torch.manual_seed(config.seed)
    network = build_network(
        card.network.architecture,
        in_channels=len(card.channels),
        out_channels=card.num_classes,
        kwargs=card.network.kwargs,
    ).to(device)
    if config.channels_last:
        network.to(memory_format=torch.channels_last_3d)
    model = network
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        model = torch.compile(model)  # compiles at the first step; validation and the outputs use ``network``
    per_epoch = steps_per_epoch(config, len(train_cases))
    total_steps = config.epochs * per_epoch
    optimisation = _Optimisation(config, model, network, total_steps, card, device, dist.world)
    state = {
        "step": 0,
        "history": [],
        "epoch_losses": [],
        "epoch_adversarial": [],
        "best": (-1.0, 0),
        "stale": 0,
        "best_state": None,
        "seconds": 0.0,
    }
    if checkpoint is not None:
        if checkpoint["state"]["step"] > total_steps:
            done = checkpoint["state"]["step"]
            raise ValueError(
                f"{checkpoint_path}: the run has done {done} steps ({done / per_epoch:g} epochs), more than the "
                f"{total_steps} of epochs {config.epochs}; resume with epochs of at least {-(-done // per_epoch)}, "
                "or start afresh without --resume"
            )
        optimisation.load_state_dict(checkpoint)
        _restore_rng(checkpoint.get("rng"), device)
        state = checkpoint["state"]
        logger.info("resumed from %s at step %d", checkpoint_path, state["step"])
    earlier_seconds = state["seconds"]

    def save_checkpoint() -> None:
        if not dist.main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        state["seconds"] = earlier_seconds + time.time() - started
        _save_atomically(
            {
                "config": config.as_dict(),
                "card": resume_card,
                **optimisation.state_dict(),
                "state": state,
                "rng": _rng_state(device),
            },
            checkpoint_path,
        )

    def validate_epoch(entry: dict[str, Any]) -> bool:
        """Validate (first process), record into the epoch's history ``entry``, keep the best weights; returns
        whether early stopping ends the run (on every process)."""
        if dist.main:
            metrics = validate(network, val_cases, card, device)
            entry["validation"] = metrics
            mean = float(np.mean([m["dice"] for m in metrics.values()]))
            entry["validation_mean_dice"] = round(mean, 4)
            if mean > state["best"][0]:
                state["best"] = (mean, entry["epoch"])
                state["best_state"] = {
                    k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                    for k, v in network.state_dict().items()
                }
                state["stale"] = 0
            else:
                state["stale"] += 1
            logger.info(
                "epoch %d: loss %.4f, validation Dice %s",
                entry["epoch"],
                entry["loss"],
                {k: m["dice"] for k, m in metrics.items()},
            )
        return dist.broadcast(bool(config.early_stopping) and state["stale"] >= config.early_stopping)

    share = config.batch_size // dist.world
    positions = range(dist.rank * share, (dist.rank + 1) * share)
    progress = None
    stopped_early = False
    while state["step"] < total_steps:
        step = state["step"]
        epoch = step // per_epoch
        if step % per_epoch == 0 or progress is None:
            order = epoch_order(config, len(train_cases), epoch)
            if progress is not None:
                progress.close()
            progress = _progress_bar(config, dist, per_epoch, step % per_epoch, epoch)
        t0 = time.perf_counter()
        x, y = make_batch(train_cases, config, step, order, positions)
        x = x.to(device, memory_format=torch.channels_last_3d if config.channels_last else torch.preserve_format)
        value, adversarial = optimisation.step(x, y.to(device))
        if adversarial is not None:
            state["epoch_adversarial"].append(adversarial)
        if dist.world > 1:
            import torch.distributed as tdist

            summed = torch.tensor([value], dtype=torch.float64)
            tdist.all_reduce(summed)
            value = float(summed) / dist.world
        if not math.isfinite(value):
            raise FloatingPointError(f"the training loss became {value} at step {step + 1}; lower learning_rate")
        state["epoch_losses"].append(value)
        state["step"] = step + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{value:.4f}", s_per_step=f"{time.perf_counter() - t0:.2f}")
        if state["step"] % per_epoch == 0:
            entry = {
                "epoch": epoch + 1,
                "step": state["step"],
                "loss": float(np.mean(state["epoch_losses"])),
                "learning_rate": optimisation.schedule.get_last_lr()[0],
            }
            state["epoch_losses"] = []
            if state["epoch_adversarial"]:
                parts = np.mean(state["epoch_adversarial"], axis=0)
                entry.update(
                    segmentation_loss=float(parts[0]),
                    adversarial_loss=float(parts[1]),
                    discriminator_loss=float(parts[2]),
                )
                state["epoch_adversarial"] = []
            if (epoch + 1) % config.validate_every == 0 or state["step"] == total_steps:
                stopped_early = validate_epoch(entry)
            state["history"].append(entry)
            if dist.main:
                write_metrics(run_dir, state, config)
        if state["step"] % config.checkpoint_every == 0 or state["step"] % per_epoch == 0:
            save_checkpoint()
        if stopped_early:
            logger.info(
                "early stopping after epoch %d: no better validation Dice in %d validations",
                epoch + 1,
                config.early_stopping,
            )
            break
        if stop_at_step is not None and state["step"] >= stop_at_step:
            save_checkpoint()
            if progress is not None:
                progress.close()
            dist.barrier()
            return None
    if progress is not None:
        progress.close()
    last = state["history"][-1] if state["history"] else None
    if not stopped_early and dist.broadcast(last is not None and "validation" not in last):
        # resumed at its last step from a checkpoint of a longer run, whose last epoch was not validated
        validate_epoch(last)
        if dist.main:
            write_metrics(run_dir, state, config)
    save_checkpoint()
    dist.barrier()
    if not dist.main:
        return None
    training_seconds = earlier_seconds + time.time() - started
    run = TrainingRun(
        best_state=state["best_state"],
        best_epoch=state["best"][1],
        history=state["history"],
        train_ids=train_ids,
        validation_cases=[by_id[c] for c in val_ids],
        provenance={
            "command": command,
            "training_seconds": round(training_seconds, 1),
            "device": f"{device}" + (f" x {dist.world} processes" if dist.world > 1 else ""),
            "stopped_early": stopped_early,
            "plan": plan,
        },
    )
    folder = _write_model_folder(config, draft, run)
    if config.export:
        from .export import export_all

        export_all(folder, config, val_cases, train_cases)
    return folder


def _apply_plan(config: TrainConfig, draft: dict[str, Any], cases):
    """DynUNet, spacing and patch planned from the dataset's headers (see :mod:`training.plan`)."""
    import dataclasses

    from .plan import plan_dynunet

    plan = plan_dynunet(
        [case.images[0] for case in cases],
        spacing=draft["preprocessing"].get("spacing"),
        max_patch_voxels=int(np.prod(config.patch_size)),
        base_filters=config.plan_filters[0],
        max_filters=config.plan_filters[1],
    )
    logger.info(
        "planned DynUNet: spacing %s, patch %s, strides %s, filters %s",
        plan["spacing"],
        plan["patch_size"],
        plan["kwargs"]["strides"],
        plan["kwargs"]["filters"],
    )
    draft = copy.deepcopy(draft)
    kwargs = {**plan["kwargs"], **_dropout_kwargs("DynUNet", config.dropout)}
    if config.deep_supervision:
        upsamplings = len(kwargs["strides"]) - 1
        if not 0 < config.deep_supervision < upsamplings:
            raise ValueError(
                f"deep_supervision {config.deep_supervision}: the planned DynUNet has {upsamplings} upsamplings, so "
                f"at most {upsamplings - 1} extra outputs"
            )
        kwargs.update(deep_supervision=True, deep_supr_num=config.deep_supervision)
    draft["network"] = {"architecture": "DynUNet", "kwargs": kwargs}
    draft["preprocessing"]["spacing"] = plan["spacing"]
    draft["inference"]["roi_size"] = plan["patch_size"]
    config = dataclasses.replace(config, patch_size=tuple(plan["patch_size"]))
    return config, draft, card_from_dict(draft), plan


def _progress_bar(config: TrainConfig, dist: Distributed, total: int, done: int, epoch: int):
    if not config.progress or not dist.main:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=done, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", leave=False, disable=None
    )


def write_metrics(run_dir: Path, state: dict, config: TrainConfig) -> None:
    """``metrics.json`` (the config, every epoch's loss and validation metrics, the best epoch) and PNG plots."""
    run_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "config": config.as_dict(),
        "best_epoch": state["best"][1],
        "best_mean_dice": round(state["best"][0], 4) if state["best"][0] >= 0 else None,
        "history": state["history"],
    }
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    tmp.replace(run_dir / "metrics.json")
    plot_history(state["history"], run_dir)


def plot_history(history: list[dict], run_dir: Path) -> None:
    """``loss.png`` (training loss per epoch) and ``validation.png`` (validation Dice per label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [entry["epoch"] for entry in history]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(epochs, [entry["loss"] for entry in history], color="#0072B2")
    axes.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(run_dir / "loss.png", dpi=100)
    plt.close(figure)
    validated = [entry for entry in history if "validation" in entry]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name in validated[0]["validation"] if validated else []:
        axes.plot(
            [e["epoch"] for e in validated], [e["validation"][name]["dice"] for e in validated], marker="o", label=name
        )
    axes.set(xlabel="epoch", ylabel="Dice", title="Validation Dice per label", ylim=(0, 1))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if validated:
        axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(run_dir / "validation.png", dpi=100)
    plt.close(figure)


@contextlib.contextmanager
def staged_folder(target: Path):
    """A temporary folder beside ``target`` that replaces it when the block succeeds and vanishes when it fails,
    so a model folder is never seen half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def shared_duplicates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with tensors of equal dtype, shape and values stored once.

    MONAI's DynUNet registers every encoder layer twice (also under ``skip_layers``), so a copied state_dict holds
    each of those weights twice: 22.5 MB instead of 11.3 MB in float16 for the planned hippocampus DynUNet.
    ``torch.save`` writes a shared tensor once; loading copies the values into each name as before.
    """
    seen: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        data = tensor.detach().cpu().contiguous()
        digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        key = (data.dtype, tuple(data.shape), digest)
        out[name] = seen.setdefault(key, data)
    return out


def _write_model_folder(config: TrainConfig, draft: dict[str, Any], run: TrainingRun) -> Path:
    """Write weights (float16) and card to a temporary folder, evaluate it from files, then move it in place."""
    output = Path(config.output)
    with staged_folder(output) as tmp:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in run.best_state.items()}
        torch.save(shared_duplicates(state), tmp / "model.pt")
        draft["weights"] = {"file": "model.pt", "sha256": sha256_of(tmp / "model.pt")}
        draft["training"] = {
            "command": run.provenance["command"],
            "dataset": str(config.dataset),
            "seed": config.seed,
            "split": {
                "validation_fraction": None if config.folds else config.validation_fraction,
                "folds": config.folds,
                "fold": config.fold,
                "splits_file": str(config.splits_path),
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
            "stopped_early": run.provenance["stopped_early"],
            **({"plan": run.provenance["plan"]} if run.provenance["plan"] else {}),
            "config": config.as_dict(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {run.provenance['device']}",
            "torch": torch.__version__,
        }
        write_card(card_from_dict(draft), tmp)
        validation = evaluate_model_folder(tmp, run.validation_cases)
        draft["training"]["validation"] = validation
        write_card(card_from_dict(draft), tmp)
        (tmp / "history.json").write_text(json.dumps(run.history, indent=1) + "\n", encoding="utf-8")
    logger.info("wrote %s: validation %s", output, validation["mean"])
    return output


def evaluate_model_folder(folder: Path, cases, *, mirror_axes=()) -> dict[str, Any]:
    """Segment each case from its files with the engine (CPU) and score it on the original grid; ``mirror_axes``
    as the engine's test-time mirroring (``--tta``: ``"model"`` for the axes the card lists)."""
    from medseg.inference import InferenceOptions
    from medseg.segmenter import Segmenter

    segmenter = Segmenter(folder, device="cpu", inference=InferenceOptions(mirror_axes=mirror_axes))
    card = segmenter.card
    values = [label.value for label in card.labels]
    per_case = {}
    seconds = []
    for case in cases:
        images = io.read_channels(case.images)
        t0 = time.perf_counter()
        result = segmenter.segment(images)
        seconds.append(time.perf_counter() - t0)
        reference = read_label(case.label, {0, *values})
        metrics = evaluate_images(result.labelmap, reference, values)
        per_case[case.case_id] = {str(v): round(m.dice, 4) for v, m in metrics.items()}
    names = {label.value: label.name for label in card.labels}
    summary = {
        "metric": "Dice",
        "cases": len(per_case),
        "mean": {names[v]: round(float(np.mean([c[str(v)] for c in per_case.values()])), 4) for v in values},
        "worst": {names[v]: round(float(np.min([c[str(v)] for c in per_case.values()])), 4) for v in values},
        "seconds_per_case": round(float(np.mean(seconds)), 3),  #: the engine on the CPU, files already read
        "per_case": per_case,
    }
    return summary
