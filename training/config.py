"""The training config: every option with its default, read from JSON or YAML and checked before any data is read.

A typo must never be silently ignored, so unknown keys (at the top level and inside ``augmentation`` and
``dataset``) are refused with the list of known ones. The full config, defaults filled in, is written beside the
run and into the card's training provenance.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOSSES = ("ce", "dice", "dice_ce", "dice_focal")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("poly", "cosine")
AMP_MODES = ("auto", "off", "bf16")
LAYOUTS = ("msd", "folders", "case_folders")
#: per dataset layout: (required keys, optional keys) besides "layout"
DATASET_KEYS = {
    "msd": (("root",), ()),
    "folders": (("images", "labels_dir", "labels"), ("channels",)),
    "case_folders": (("root", "channels", "label", "labels"), ()),
}


@dataclass
class Augmentation:
    """On-the-fly augmentation of each training patch; a probability of 0 turns a transform off.

    Spatial transforms move image and label together (label by nearest neighbour). Every random draw comes from
    a generator seeded by (seed, epoch, batch, position in batch), so a run is reproducible, a resumed run
    continues exactly, and several processes see the same samples as one.
    """

    flip_axes: tuple[int, ...] = ()  #: spatial axes (0=x, 1=y, 2=z) flipped with probability 1/2; never flip L-R labels
    rotation_degrees: float = 0.0  #: largest rotation about each axis
    rotation_probability: float = 0.2
    scale: float = 0.0  #: zoom drawn from [1 - scale, 1 + scale]
    scale_probability: float = 0.2
    elastic_probability: float = 0.0  #: elastic deformation (MONAI Rand3DElastic)
    elastic_sigma: tuple[float, float] = (5.0, 8.0)  #: smoothing of the displacement field, voxels
    elastic_magnitude: tuple[float, float] = (50.0, 150.0)  #: displacement magnitude before smoothing
    intensity_scale: float = 0.1  #: contrast: intensities times 1 + U(-s, s)
    intensity_shift: float = 0.1  #: brightness: plus U(-s, s) (intensities are normalised)
    noise_std: float = 0.05  #: Gaussian noise standard deviation (normalised units)
    noise_probability: float = 1.0
    bias_field_probability: float = 0.0  #: smooth multiplicative bias field (MONAI RandBiasField)
    #: the largest Legendre coefficient of the field's log (MONAI's default 0.1): at 0.5 its 20 degree-3
    #: coefficients made fields of 0.2x to over 100x across a patch
    bias_field_coefficients: float = 0.1
    gamma: tuple[float, float] = (0.7, 1.5)  #: gamma drawn from this range (MONAI RandAdjustContrast)
    gamma_probability: float = 0.0


@dataclass
class TrainConfig:
    dataset: Any  #: an MSD folder, or a dict: {"layout": "msd"|"folders"|"case_folders", ...} (see data.py)
    output: str  #: the model folder to write
    card: dict[str, Any]
    description: str = ""  #: free text recorded with the run, e.g. what the config is for and how long it takes
    seed: int = 0
    validation_fraction: float = 0.2  #: used when ``folds`` is 0
    folds: int = 0  #: k for k-fold cross-validation; 0 = one split with ``validation_fraction``
    fold: int = 0  #: which fold validates (0 .. folds - 1)
    splits_file: str | None = None  #: read if it exists, else written; default: <run_dir>/splits.json
    run_dir: str | None = None  #: checkpoints, metrics, plots, exports; default: <output>.run
    epochs: int = 100
    steps_per_epoch: int = 0  #: 0 = one pass over the training cases
    batch_size: int = 8  #: the global batch, split across processes under torchrun
    patch_size: tuple[int, int, int] = (48, 64, 48)
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    dropout: float | None = None  #: passed to the network when it takes ``dropout``
    validate_every: int = 10  #: epochs
    checkpoint_every: int = 100  #: steps; a checkpoint is also written at each validation
    early_stopping: int = 0  #: stop after this many validations without a better mean Dice; 0 = never
    gradient_clip: float = 12.0  #: largest gradient norm (nnU-Net's 12); 0 = no clipping
    #: auto: mixed precision on a GPU (bf16 where supported, else fp16 with loss scaling), off on a CPU; bf16: bfloat16
    #: autocast on a GPU or on a CPU with AMX or AVX-512-BF16 (about 2.6x faster for the planned DynUNet there); off
    amp: str = "auto"
    threads: int = 0  #: torch CPU threads; 0 keeps PyTorch's default
    #: torch.compile the training network. With channels_last, a step of the planned DynUNet (bf16, batch 8) took
    #: 1.34 s instead of 2.53 s on 2 Xeon cores with AMX; the first step compiles (about 40 s; a C++ compiler on a CPU)
    compile: bool = False
    channels_last: bool = False  #: weights and batches in channels-last (NDHWC) layout, which 3D convolutions prefer
    device: str = "auto"
    progress: bool = True  #: a progress bar with loss and speed (on a terminal)
    augmentation: Augmentation = field(default_factory=Augmentation)
    loss: str = "dice_ce"  #: one of LOSSES
    optimizer: str = "adamw"  #: one of OPTIMIZERS
    momentum: float = 0.99  #: SGD's (Nesterov) momentum, nnU-Net's value
    schedule: str = "poly"  #: one of SCHEDULES: polynomial decay (power 0.9, as nnU-Net) or cosine
    adversarial_weight: float = 0.0  #: > 0 adds a patch discriminator on (image, segmentation) pairs
    adversarial_learning_rate: float = 2e-4  #: the discriminator's Adam learning rate (betas 0.5, 0.999)
    export: list[str] = field(default_factory=list)  #: any of "torchscript", "onnx", "fp16", "int8"
    plan: str | None = None  #: "dynunet": network, spacing and patch planned from the data (prod(patch_size) = budget)
    plan_filters: tuple[int, int] = (32, 320)  #: the plan's filters: first level's, doubled per level up to the second
    #: extra outputs at coarser decoder levels trained with the full-resolution one (nnU-Net's deep supervision),
    #: weighted 1/2, 1/4, ... of it; the planned DynUNet only. Inference uses the full-resolution output alone.
    deep_supervision: int = 0

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(str(self.output) + ".run")

    @property
    def splits_path(self) -> Path:
        return Path(self.splits_file) if self.splits_file else self.run_path / "splits.json"

    def as_dict(self) -> dict[str, Any]:
        """Every option, defaults included, as recorded in the run and the card."""
        data = dataclasses.asdict(self)
        data.pop("card")
        return json.loads(json.dumps(data, default=list))


KNOWN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
AUGMENTATION_KEYS = {f.name for f in dataclasses.fields(Augmentation)}
EXPORTS = ("torchscript", "onnx", "fp16", "int8")


def _refuse_unknown(keys, known, where: str) -> None:
    unknown = set(keys) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown config key(s) {sorted(unknown)}; known: {sorted(known)}")


def check_config(config: TrainConfig, source: str) -> None:
    """Refuse an unknown choice or an impossible value before any data is read."""
    for key, choices in (("loss", LOSSES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("amp", AMP_MODES)):
        value = getattr(config, key)
        if value not in choices:
            raise ValueError(f"{source}: unknown {key} {value!r}; choose one of {', '.join(choices)}")
    if config.plan not in (None, "dynunet"):
        raise ValueError(f"{source}: unknown plan {config.plan!r}; the one plan is 'dynunet'")
    for name in config.export:
        if name not in EXPORTS:
            raise ValueError(f"{source}: unknown export {name!r}; choose from {', '.join(EXPORTS)}")
    if config.folds and not 0 <= config.fold < config.folds:
        raise ValueError(f"{source}: fold {config.fold} is outside 0..{config.folds - 1}")
    if config.folds == 1 or config.folds < 0:
        raise ValueError(f"{source}: folds must be 0 (one split) or at least 2, not {config.folds}")
    if not config.folds and not 0 < config.validation_fraction < 1:
        raise ValueError(f"{source}: validation_fraction must be between 0 and 1, not {config.validation_fraction}")
    for key in ("epochs", "batch_size", "validate_every", "checkpoint_every"):
        if getattr(config, key) < 1:
            raise ValueError(f"{source}: {key} must be at least 1, not {getattr(config, key)}")
    if len(config.patch_size) != 3 or min(config.patch_size) < 1:
        raise ValueError(f"{source}: patch_size must be three positive sizes, not {list(config.patch_size)}")
    smallest = 8**3  # training.plan's smallest patch: 8 voxels along each axis
    if config.plan == "dynunet" and math.prod(config.patch_size) < smallest:
        raise ValueError(
            f"{source}: plan dynunet takes the product of patch_size as its voxel budget, and "
            f"{math.prod(config.patch_size)} is below its smallest patch, 8^3 = {smallest} voxels"
        )
    if isinstance(config.dataset, dict):
        layout = config.dataset.get("layout", "msd")
        if layout not in LAYOUTS:
            raise ValueError(f"{source}: unknown dataset layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        required, optional = DATASET_KEYS[layout]
        _refuse_unknown(config.dataset, {"layout", *required, *optional}, f"{source} (dataset, layout {layout})")
        missing = sorted(set(required) - set(config.dataset))
        if missing:
            raise ValueError(f"{source}: the {layout} dataset layout needs {', '.join(missing)}")
    filters = config.plan_filters
    if len(filters) != 2 or any(type(f) is not int for f in filters) or not 1 <= filters[0] <= filters[1]:
        raise ValueError(f"{source}: plan_filters must be [first, most], 1 <= first <= most, not {config.plan_filters}")
    if type(config.deep_supervision) is not int or config.deep_supervision < 0:
        raise ValueError(f"{source}: deep_supervision must be a whole number >= 0, not {config.deep_supervision!r}")
    if config.deep_supervision and config.plan != "dynunet":
        raise ValueError(
            f"{source}: deep_supervision needs plan dynunet (for a DynUNet of your own, set deep_supervision and "
            "deep_supr_num in the card's network kwargs)"
        )
    for key in ("compile", "channels_last", "progress"):
        if not isinstance(getattr(config, key), bool):
            raise ValueError(f"{source}: {key} must be true or false, not {getattr(config, key)!r}")
    flips = config.augmentation.flip_axes
    if any(type(axis) is not int or axis not in (0, 1, 2) for axis in flips) or len(set(flips)) != len(flips):
        raise ValueError(f"{source}: augmentation flip_axes must be distinct axes among 0, 1, 2, not {list(flips)}")


def config_from_dict(data: dict[str, Any], source: str = "the training config", base: Path | None = None):
    """A checked :class:`TrainConfig` from a parsed config; relative paths resolve against ``base``."""
    data = dict(data)
    _refuse_unknown(data, KNOWN_KEYS, source)
    augmentation = data.pop("augmentation", {}) or {}
    _refuse_unknown(augmentation, AUGMENTATION_KEYS, f"{source} (augmentation)")
    augmentation = {k: tuple(v) if isinstance(v, list) else v for k, v in augmentation.items()}
    for key in ("dataset", "output", "card"):
        if key not in data:
            raise ValueError(f"{source}: the key {key!r} is required")
    config = TrainConfig(**data, augmentation=Augmentation(**augmentation))
    config.patch_size = tuple(config.patch_size)
    config.plan_filters = tuple(config.plan_filters)
    config.export = list(config.export)
    check_config(config, source)
    if base is not None:
        config.output = _resolve(config.output, base)
        for key in ("run_dir", "splits_file"):
            if getattr(config, key):
                setattr(config, key, _resolve(getattr(config, key), base))
        if isinstance(config.dataset, dict):
            config.dataset = {
                k: _resolve(v, base) if k in ("root", "images", "labels_dir") else v for k, v in config.dataset.items()
            }
        else:
            config.dataset = _resolve(config.dataset, base)
    return config


def _resolve(value: str, base: Path) -> str:
    """A relative path as given when it exists from the working directory, else relative to the config."""
    path = Path(value)
    if path.is_absolute() or path.exists() or not (base / path).exists() and not (base / path).parent.exists():
        return str(path)
    return str(base / path)


def load_config(path: str | Path) -> TrainConfig:
    """Read a JSON or YAML config; unknown keys and choices are refused before any data is read."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a training config is a mapping of keys to values")
    return config_from_dict(data, str(path), base=path.parent)
