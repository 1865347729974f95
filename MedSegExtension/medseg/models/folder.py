"""Loading a model folder: card, checksum, network, weights."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelCardError
from .architectures import ArchitectureError, build_network
from .card import ModelCard, read_card

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A validated card and its network with weights loaded, in eval mode, on the CPU."""

    card: ModelCard
    folder: Path
    network: torch.nn.Module


def sha256_of(path: str | Path, *, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def load_model_folder(folder: str | Path) -> LoadedModel:
    """Load a model folder, refusing it with a precise message when anything does not fit.

    Checks, in order: the card's fields, the weights file exists and matches the card's SHA-256, the
    architecture is allow-listed and accepts the card's arguments, and the weights' tensor names and shapes
    match the network the card describes. Weights are read with ``weights_only=True``: no pickled code runs.

    Raises:
        ModelCardError: naming the file and the field or tensor that is wrong.
    """
    folder = Path(folder)
    card = read_card(folder)
    weights_path = folder / card.weights_file
    if not weights_path.is_file():
        raise ModelCardError(weights_path, "the weights file named by the card is missing")
    actual = sha256_of(weights_path)
    if actual != card.weights_sha256:
        raise ModelCardError(
            weights_path,
            f"SHA-256 is {actual[:12]}..., the card expects {card.weights_sha256[:12]}...; "
            "the weights were changed or damaged (field 'weights.sha256')",
        )
    try:
        network = build_network(
            card.network.architecture,
            in_channels=len(card.channels),
            out_channels=card.num_classes,
            kwargs=card.network.kwargs,
        )
    except ArchitectureError as exc:
        raise ModelCardError(folder / "model.json", f"field 'network': {exc}") from None
    state = _read_state_dict(weights_path)
    if card.weights_storage == "int8":
        state = dequantized(state, weights_path)
    _load_matching(network, state, weights_path)
    network.eval()
    logger.debug("loaded %s %s from %s", card.id, card.version, folder)
    return LoadedModel(card=card, folder=folder, network=network)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or non-weights file
        raise ModelCardError(path, f"cannot be read as PyTorch weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelCardError(path, "is not a plain state_dict (a mapping of tensor names to tensors)")
    return state


SCALE_SUFFIX = ":scale"


def quantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state for ``weights.storage`` "int8".

    Each floating tensor of two or more dimensions whose first dimension is longer than 1 (convolution and linear
    weights) becomes int8 with a float32 scale per slice along that first dimension: symmetric, the slice's largest
    magnitude to 127. That slice is a convolution's output channel, and a transposed convolution's input channel.
    The rest (biases, norms, embeddings of one row) is stored in float16. The file is half the size of float16
    weights, and tensors that share memory stay shared.
    """
    out: dict[str, torch.Tensor] = {}
    done: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if key not in done:
            if tensor.dim() >= 2 and tensor.shape[0] > 1:
                weights = tensor.detach().float().cpu()
                axes = tuple(range(1, weights.dim()))
                scale = weights.abs().amax(dim=axes, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
                done[key] = ((weights / scale).round().clamp(-127, 127).to(torch.int8), scale)
            else:
                done[key] = (tensor.detach().cpu().half(), None)
        value, scale = done[key]
        out[name] = value
        if scale is not None:
            out[name + SCALE_SUFFIX] = scale
    return out


def dequantized(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Float32 tensors from an "int8" state (see :func:`quantized`)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in state:
                raise ModelCardError(path, f"scale {name} has no int8 tensor {name[: -len(SCALE_SUFFIX)]}")
            continue
        if tensor.dtype == torch.int8:
            scale = state.get(name + SCALE_SUFFIX)
            if scale is None or scale.dim() != tensor.dim() or scale.shape[0] != tensor.shape[0]:
                raise ModelCardError(
                    path,
                    f"int8 tensor {name} needs a scale per slice along its first dimension, {name}{SCALE_SUFFIX} "
                    "(field 'weights.storage' is int8)",
                )
            out[name] = tensor.float() * scale.float()
        else:
            out[name] = tensor
    return out


def _load_matching(network: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if any(k.endswith(SCALE_SUFFIX) for k in unexpected):
        raise ModelCardError(
            path, "holds int8 weights with their scales, but the card's field 'weights.storage' is not int8"
        )
    if missing or unexpected or wrong_shape:
        details = []
        if wrong_shape:
            details.append(f"{len(wrong_shape)} tensor(s) of the wrong shape, e.g. {wrong_shape[0]}")
        if missing:
            details.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
        raise ModelCardError(
            path,
            "the weights do not match the network the card describes (fields 'network', 'channels', 'labels'): "
            + "; ".join(details),
        )
    # Weights may be stored in half precision to keep the repository small; compute in float32.
    network.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
