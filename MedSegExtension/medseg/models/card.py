"""The model card (``model.json``): what a model is, what it needs, and how to run it.

A card is validated field by field when it is read, so a broken card is refused with a message that names the
field, rather than failing halfway through a run. The card never names code to import: the network is built
from an allow-list of architectures (``medseg.models.architectures``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelCardError
from .architectures import window_problem

CARD_FILE = "model.json"
WEIGHTS_FILE = "model.pt"
WEIGHT_STORAGES = ("float", "int8")
CARD_FORMAT_VERSION = 1
#: format versions this MedSeg reads; 2 marks int8 weights (``weights.storage``), which an older MedSeg cannot load,
#: so it refuses the card by its version instead of failing on the weights
CARD_FORMAT_VERSIONS = (1, 2)

NORMALIZATIONS = ("zscore", "range", "none")
CROPS = ("none", "foreground")
BLEND_MODES = ("constant", "gaussian")
#: Labels a card may name: the labelmap is 8-bit (uint8), and 0 is the background.
MAX_LABELS = 255


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM style): coding scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str

    def as_list(self) -> list[str]:
        return [self.scheme, self.value, self.meaning]


@dataclass(frozen=True)
class Terminology:
    """Segment terminology as Slicer and DICOM SEG store it."""

    category: Code
    type: Code
    type_modifier: Code | None = None


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    color: tuple[int, int, int]
    terminology: Terminology | None = None

    @property
    def color_float(self) -> tuple[float, float, float]:
        """The colour as RGB in 0..1, as VTK and Slicer want it."""
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]


@dataclass(frozen=True)
class Channel:
    name: str
    modality: str


@dataclass(frozen=True)
class Normalization:
    """Per-image intensity normalisation.

    ``zscore``: clip to the given percentiles of the image (or of its non-zero voxels with ``nonzero``, which
    stay 0), then subtract the mean and divide by the standard deviation of the clipped voxels. ``range``: clip to
    ``[a_min, a_max]`` (for CT in HU) and scale linearly to ``[0, 1]``. ``none``: leave as it is.
    """

    method: str = "zscore"
    clip_percentiles: tuple[float, float] | None = (0.5, 99.5)
    nonzero: bool = False
    a_min: float | None = None
    a_max: float | None = None


@dataclass(frozen=True)
class Preprocessing:
    orientation: str | None = "RAS"  #: the anatomical orientation code the network was trained in, or None
    spacing: tuple[float, float, float] | None = None  #: target spacing in mm, (x, y, z); None keeps the input's
    normalization: Normalization = field(default_factory=Normalization)
    crop: str = "none"  #: "foreground" crops to the non-background box of the first channel


@dataclass(frozen=True)
class InferenceSettings:
    roi_size: tuple[int, int, int]  #: sliding-window size in voxels, (x, y, z) like the spacing
    overlap: float = 0.5
    blend_mode: str = "gaussian"
    sw_batch_size: int = 2
    #: axes (0, 1, 2 = x, y, z) along which a mirrored input gives the mirrored answer, because training flipped
    #: them: the only axes test-time mirroring may use. () when none (e.g. left and right are different labels);
    #: None when the card does not say (cards written before the field existed), which allows none either.
    mirror_axes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Network:
    architecture: str
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class ModelCard:
    id: str
    version: str
    name: str
    description: str
    task: str
    modality: str
    licence: str
    channels: tuple[Channel, ...]
    labels: tuple[Label, ...]
    preprocessing: Preprocessing
    network: Network
    inference: InferenceSettings
    weights_sha256: str
    training: dict[str, Any] = field(default_factory=dict)
    citation: str = ""
    weights_file: str = WEIGHTS_FILE
    #: how the weights file stores its tensors: "float" (as they are; float16 keeps a repository small) or "int8"
    #: (weights as int8 with a scale per slice along their first dimension, ``<name>:scale``; see
    #: :func:`medseg.models.folder.quantized`)
    weights_storage: str = "float"

    @property
    def num_classes(self) -> int:
        """Output channels of the network: background plus one per label."""
        return len(self.labels) + 1

    def label_by_value(self, value: int) -> Label:
        for label in self.labels:
            if label.value == value:
                return label
        raise KeyError(value)

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data, in the same shape :func:`card_from_dict` reads."""
        data = asdict(self)
        data["format_version"] = 2 if self.weights_storage == "int8" else CARD_FORMAT_VERSION
        data["weights"] = {
            "file": data.pop("weights_file"),
            "sha256": data.pop("weights_sha256"),
            "storage": data.pop("weights_storage"),
        }
        for label in data["labels"]:
            term = label.get("terminology")
            if term:
                label["terminology"] = {k: list(v.values()) for k, v in term.items() if v is not None}
        return data


class _Fields:
    """Reads typed fields out of a JSON object, naming the full field path in every error."""

    def __init__(self, data: Any, path: str | Path, prefix: str = "") -> None:
        self.path = path
        self.prefix = prefix
        if not isinstance(data, dict):
            raise ModelCardError(
                path, f"field '{prefix or '(top level)'}' must be an object, got {type(data).__name__}"
            )
        self.data = data

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise ModelCardError(self.path, f"missing field '{self.name(key)}'")
            return default
        value = self.data[key]
        if value is None and default is None:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            wanted = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ModelCardError(self.path, f"field '{self.name(key)}' must be {wanted}, got {value!r}")
        return value

    def sub(self, key: str, default: Any = ...) -> _Fields:
        return _Fields(self.get(key, dict, {} if default is not ... else ...), self.path, self.name(key))

    def numbers(self, key: str, length: int, kind: type = float, default: Any = ...) -> tuple | None:
        value = self.get(key, (list, type(None)), default)
        if value is None:
            return None
        if len(value) != length or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ModelCardError(
                self.path, f"field '{self.name(key)}' must be a list of {length} numbers, got {value!r}"
            )
        if kind is int and not all(float(v).is_integer() for v in value):
            raise ModelCardError(self.path, f"field '{self.name(key)}' must hold whole numbers, got {value!r}")
        return tuple(kind(v) for v in value)

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise ModelCardError(
                self.path, f"field '{self.name(key)}' is {value!r}; expected one of {', '.join(choices)}"
            )
        return value


def _code(value: Any, path: str | Path, name: str) -> Code:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
        raise ModelCardError(
            path, f"field '{name}' must be a [scheme, value, meaning] triple of strings, got {value!r}"
        )
    return Code(*value)


def _label(item: Any, index: int, path: str | Path) -> Label:
    f = _Fields(item, path, f"labels[{index}]")
    value = f.get("value", int)
    if value < 1:
        raise ModelCardError(path, f"field '{f.name('value')}' must be 1 or more (0 is background), got {value}")
    color = f.numbers("color", 3, int)
    if not all(0 <= c <= 255 for c in color):
        raise ModelCardError(path, f"field '{f.name('color')}' must be RGB in 0..255, got {list(color)}")
    terminology = None
    if f.data.get("terminology") is not None:
        t = f.sub("terminology")
        modifier = t.data.get("type_modifier")
        terminology = Terminology(
            category=_code(t.get("category", list), path, t.name("category")),
            type=_code(t.get("type", list), path, t.name("type")),
            type_modifier=None if modifier is None else _code(modifier, path, t.name("type_modifier")),
        )
    return Label(value=value, name=f.get("name", str), color=color, terminology=terminology)


def _preprocessing(f: _Fields) -> Preprocessing:
    n = f.sub("normalization")
    method = n.choice("method", NORMALIZATIONS)
    normalization = Normalization(
        method=method,
        clip_percentiles=n.numbers("clip_percentiles", 2, float, None),
        nonzero=n.get("nonzero", bool, False),
        a_min=n.get("a_min", float, None),
        a_max=n.get("a_max", float, None),
    )
    if method == "range" and (normalization.a_min is None or normalization.a_max is None):
        raise ModelCardError(
            f.path, f"field '{n.name('method')}' is 'range' but 'a_min' and 'a_max' are not both given"
        )
    if method == "range" and not normalization.a_max > normalization.a_min:  # NaN too
        raise ModelCardError(
            f.path,
            f"field '{n.name('a_max')}' must be greater than 'a_min' ({normalization.a_min:g}), "
            f"got {normalization.a_max:g}",
        )
    percentiles = normalization.clip_percentiles
    if percentiles is not None and not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise ModelCardError(
            f.path,
            f"field '{n.name('clip_percentiles')}' must be [low, high] with 0 <= low < high <= 100, "
            f"got {list(percentiles)}",
        )
    spacing = f.numbers("spacing", 3, float, None)
    if spacing is not None and min(spacing) <= 0:
        raise ModelCardError(f.path, f"field '{f.name('spacing')}' must be positive, got {list(spacing)}")
    orientation = f.get("orientation", (str, type(None)), "RAS")
    if orientation is not None and not valid_orientation(orientation):
        raise ModelCardError(
            f.path,
            f"field '{f.name('orientation')}' must be a code like RAS or LPS (one of R/L, one of A/P and one of "
            f"S/I), got {orientation!r}",
        )
    return Preprocessing(
        orientation=orientation.upper() if orientation else None,
        spacing=spacing,
        normalization=normalization,
        crop=f.choice("crop", CROPS, "none"),
    )


def _inference(f: _Fields) -> InferenceSettings:
    roi = f.numbers("roi_size", 3, int)
    overlap = f.get("overlap", float, 0.5)
    if not 0 <= overlap < 1:
        raise ModelCardError(f.path, f"field '{f.name('overlap')}' must be in [0, 1), got {overlap}")
    if min(roi) < 1:
        raise ModelCardError(f.path, f"field '{f.name('roi_size')}' must be positive, got {list(roi)}")
    mirror_axes = f.get("mirror_axes", list, None)
    if mirror_axes is not None and not valid_axes(mirror_axes):
        raise ModelCardError(
            f.path, f"field '{f.name('mirror_axes')}' must list distinct axes among 0, 1, 2, got {mirror_axes!r}"
        )
    return InferenceSettings(
        roi_size=roi,
        overlap=overlap,
        blend_mode=f.choice("blend_mode", BLEND_MODES, "gaussian"),
        sw_batch_size=max(1, f.get("sw_batch_size", int, 2)),
        mirror_axes=None if mirror_axes is None else tuple(sorted(mirror_axes)),
    )


def valid_orientation(code: str) -> bool:
    """Whether ``code`` names each anatomical axis once: one letter of R/L, one of A/P and one of S/I."""
    return len(code) == 3 and all(sum(letter in pair for letter in code.upper()) == 1 for pair in ("RL", "AP", "SI"))


def valid_axes(axes) -> bool:
    """Distinct spatial axes among 0, 1, 2, as whole numbers (not floats or booleans)."""
    return all(type(a) is int and a in (0, 1, 2) for a in axes) and len(set(axes)) == len(axes)


def card_from_dict(data: Any, path: str | Path = CARD_FILE) -> ModelCard:
    """Validate card data and build a :class:`ModelCard`.

    Raises:
        ModelCardError: naming the first missing or invalid field.
    """
    f = _Fields(data, path)
    version = f.get("format_version", int)
    if version not in CARD_FORMAT_VERSIONS:
        raise ModelCardError(
            path,
            f"field 'format_version' is {version}; this MedSeg reads versions "
            f"{', '.join(map(str, CARD_FORMAT_VERSIONS))} (a newer MedSeg may read it)",
        )
    channels = tuple(
        Channel(name=c.get("name", str), modality=c.get("modality", str))
        for c in (_Fields(item, path, f"channels[{i}]") for i, item in enumerate(f.get("channels", list)))
    )
    if not channels:
        raise ModelCardError(path, "field 'channels' must name at least one input channel")
    labels = tuple(_label(item, i, path) for i, item in enumerate(f.get("labels", list)))
    values = [label.value for label in labels]
    if not labels or values != sorted(set(values)) or values != list(range(1, len(values) + 1)):
        raise ModelCardError(path, f"field 'labels' must have values 1..N in order without gaps, got {values}")
    if len(labels) > MAX_LABELS:
        raise ModelCardError(
            path, f"field 'labels' has {len(labels)} labels; a labelmap holds at most {MAX_LABELS} (8 bits)"
        )
    network = f.sub("network")
    weights = f.sub("weights")
    sha = weights.get("sha256", str)
    if len(sha) != 64 or set(sha.lower()) - set("0123456789abcdef"):
        raise ModelCardError(path, f"field 'weights.sha256' must be 64 hexadecimal digits, got {sha!r}")
    weights_file = weights.get("file", str, WEIGHTS_FILE)
    if Path(weights_file).name != weights_file:
        raise ModelCardError(
            path, f"field 'weights.file' must be a file name inside the model folder, got {weights_file!r}"
        )
    card = ModelCard(
        id=f.get("id", str),
        version=f.get("version", str),
        name=f.get("name", str),
        description=f.get("description", str),
        task=f.get("task", str),
        modality=f.get("modality", str),
        licence=f.get("licence", str),
        citation=f.get("citation", str, ""),
        channels=channels,
        labels=labels,
        preprocessing=_preprocessing(f.sub("preprocessing")),
        network=Network(architecture=network.get("architecture", str), kwargs=dict(network.get("kwargs", dict))),
        inference=_inference(f.sub("inference")),
        training=dict(f.get("training", dict, {})),
        weights_sha256=sha.lower(),
        weights_file=weights_file,
        weights_storage=weights.choice("storage", WEIGHT_STORAGES, "float"),
    )
    problem = window_problem(card.network.architecture, card.network.kwargs, card.inference.roi_size)
    if problem:
        raise ModelCardError(path, f"field 'inference.roi_size' is {list(card.inference.roi_size)}: {problem}")
    return card


def read_card(folder: str | Path) -> ModelCard:
    """Read and validate ``folder/model.json``."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise ModelCardError(path, "no model card here; a model folder holds model.json and model.pt")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelCardError(path, f"not valid JSON ({exc})") from None
    except OSError as exc:  # unreadable (permissions, a damaged disk): this folder's problem, not every lookup's
        raise ModelCardError(path, f"cannot be read ({exc.strerror or exc})") from None
    return card_from_dict(data, path)


def write_card(card: ModelCard, folder: str | Path) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path
