"""Sliding-window inference with MONAI on the chosen device.

The input is the preprocessed (C, X, Y, Z) float32 array; the output is (K, X, Y, Z) float32 class
probabilities (softmax of each window, blended across windows), K = labels + background.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from .errors import MedSegError
from .models.card import InferenceSettings
from .progress import RunControl

logger = logging.getLogger(__name__)


class DeviceError(MedSegError):
    """The requested compute device does not exist here."""


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA GPU when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as named."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} was asked for, but PyTorch sees no CUDA GPU here; use --device cpu or auto"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
        return device
    raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")


def count_windows(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Number of sliding windows MONAI's ``dense_patch_slices`` makes for ``shape`` (spatial dims only)."""
    total = 1
    for size, roi in zip(shape, roi_size):
        if size <= roi:
            continue
        interval = max(int(roi * (1 - overlap)), 1)
        total *= math.ceil((size - roi) / interval) + 1
    return total


def sliding_window_probabilities(
    network: torch.nn.Module,
    volume: np.ndarray,
    settings: InferenceSettings,
    *,
    device: torch.device,
    control: RunControl | None = None,
    sw_batch_size: int | None = None,
) -> np.ndarray:
    """Run ``network`` over ``volume`` (C, X, Y, Z) window by window and blend softmax probabilities.

    Windows larger than the volume are padded by MONAI; the result has the volume's spatial shape. When the
    GPU runs out of memory, retries with a window batch of 1, then on the CPU, and logs that it did.
    """
    from monai.inferers import sliding_window_inference

    control = control or RunControl()
    batch = sw_batch_size or settings.sw_batch_size
    total = max(1, math.ceil(count_windows(volume.shape[1:], settings.roi_size, settings.overlap) / batch))
    done = 0

    def predictor(window: torch.Tensor) -> torch.Tensor:
        nonlocal done
        control.check()
        probabilities = torch.softmax(network(window), dim=1)
        done += 1
        control.report("inference", done / total)
        return probabilities

    attempts = [(device, batch)]
    if device.type == "cuda":
        attempts += [(device, 1), (torch.device("cpu"), batch)]
    for attempt, (dev, batch_size) in enumerate(attempts):
        try:
            network.to(dev)
            x = torch.from_numpy(np.ascontiguousarray(volume))[None].to(dev)
            with torch.inference_mode():
                out = sliding_window_inference(
                    x, settings.roi_size, batch_size, predictor, overlap=settings.overlap, mode=settings.blend_mode
                )
            return out[0].float().cpu().numpy()
        except torch.cuda.OutOfMemoryError:
            if attempt + 1 == len(attempts):
                raise
            torch.cuda.empty_cache()
            nxt = attempts[attempt + 1]
            logger.warning(
                "GPU out of memory with a window batch of %d; retrying %s",
                batch_size,
                "with a batch of 1" if nxt[0].type == "cuda" else "on the CPU",
            )
            done = 0
    raise RuntimeError("unreachable")  # pragma: no cover
