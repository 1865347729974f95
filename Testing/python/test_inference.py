"""Sliding-window inference: tiling and blending checked with voxel-wise predictors, devices, OOM fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import ThresholdNet
from medseg.errors import CancelledError
from medseg.inference import DeviceError, count_windows, select_device, sliding_window_probabilities
from medseg.models.card import InferenceSettings
from medseg.progress import RunControl


class Doubling(torch.nn.Module):
    """MONAI's test predictor ``lambda x: 2 * x`` as a module, with two output classes."""

    def forward(self, x):
        return torch.cat([2 * x, torch.zeros_like(x)], dim=1)


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.windows = 0

    def forward(self, x):
        self.calls += 1
        self.windows += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("shape", [(37, 29, 18), (10, 12, 9), (64, 16, 16)])
def test_tiling_reproduces_a_voxelwise_predictor_exactly(mode, shape):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(1, *shape)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.5, blend_mode=mode, sw_batch_size=3)
    out = sliding_window_probabilities(Doubling(), volume, settings, device=torch.device("cpu"))
    expected = torch.softmax(torch.from_numpy(np.concatenate([2 * volume, np.zeros_like(volume)])), 0).numpy()
    assert out.shape == (2, *shape)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "roi", "overlap"),
    [
        ((37, 29, 18), (16, 16, 16), 0.5),
        ((64, 16, 16), (16, 16, 16), 0.25),
        ((10, 12, 9), (16, 16, 16), 0.5),
        ((50, 50, 50), (20, 30, 40), 0.3),
    ],
)
def test_window_count_matches_monai(shape, roi, overlap):
    net = Counting(Doubling())
    settings = InferenceSettings(roi_size=roi, overlap=overlap, blend_mode="constant", sw_batch_size=1)
    sliding_window_probabilities(net, np.zeros((1, *shape), np.float32), settings, device=torch.device("cpu"))
    assert net.windows == count_windows(shape, roi, overlap)


def test_threshold_network_is_reproduced_with_overlapping_windows():
    volume = np.zeros((1, 30, 30, 30), np.float32)
    volume[0, 5:20, 8:25, 3:12] = 3.0
    settings = InferenceSettings(roi_size=(12, 12, 12), overlap=0.5, blend_mode="gaussian", sw_batch_size=4)
    out = sliding_window_probabilities(ThresholdNet(), volume, settings, device=torch.device("cpu"))
    np.testing.assert_array_equal(np.argmax(out, 0), (volume[0] > 1).astype(np.int64))
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


def test_progress_is_reported_and_reaches_one():
    seen = []
    settings = InferenceSettings(roi_size=(8, 8, 8), overlap=0.5, blend_mode="constant", sw_batch_size=2)
    control = RunControl(progress=lambda stage, f: seen.append((stage, f)))
    sliding_window_probabilities(
        Doubling(), np.zeros((1, 20, 20, 20), np.float32), settings, device=torch.device("cpu"), control=control
    )
    fractions = [f for s, f in seen if s == "inference"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) == 32


def test_cancel_stops_inference():
    control = RunControl()
    calls = []

    def cancel_after_first(stage, fraction):
        calls.append(fraction)
        control.cancel()

    control.progress = cancel_after_first
    settings = InferenceSettings(roi_size=(8, 8, 8), overlap=0.5, blend_mode="constant", sw_batch_size=1)
    with pytest.raises(CancelledError, match="cancelled"):
        sliding_window_probabilities(
            Doubling(), np.zeros((1, 20, 20, 20), np.float32), settings, device=torch.device("cpu"), control=control
        )
    assert len(calls) == 1


def test_device_selection():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="PyTorch sees no CUDA GPU"):
            select_device("cuda")


def test_out_of_memory_falls_back_to_a_smaller_batch_then_the_cpu(monkeypatch, caplog):
    """The fallback path, exercised on the CPU: a 'GPU' network that runs out of memory on batches > 1."""

    class FlakyOnGpu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fake_device = "cuda"
            self.batches = []

        def to(self, device):
            self.fake_device = torch.device(device).type
            return self

        def forward(self, x):
            self.batches.append((self.fake_device, x.shape[0]))
            if self.fake_device == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return torch.cat([2 * x, torch.zeros_like(x)], dim=1)

    real_to = torch.Tensor.to
    monkeypatch.setattr(
        torch.Tensor, "to", lambda self, *a, **k: self if a and str(a[0]).startswith("cuda") else real_to(self, *a, **k)
    )
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    net = FlakyOnGpu()
    settings = InferenceSettings(roi_size=(8, 8, 8), overlap=0.0, blend_mode="constant", sw_batch_size=4)
    volume = np.ones((1, 16, 16, 8), np.float32)
    with caplog.at_level("WARNING", logger="medseg.inference"):
        out = sliding_window_probabilities(net, volume, settings, device=torch.device("cuda"))
    assert [b for b in net.batches if b[0] == "cuda"] == [("cuda", 4), ("cuda", 1)]
    assert ("cpu", 4) in net.batches
    assert "retrying with a batch of 1" in caplog.text and "retrying on the CPU" in caplog.text
    np.testing.assert_allclose(out[0], torch.sigmoid(torch.tensor(2.0)).item(), atol=1e-5)
