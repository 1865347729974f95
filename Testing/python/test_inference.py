"""Sliding-window inference: MONAI's windows and blending, exactly; precision, mirroring, slabs, devices, OOM."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import Confident, ThresholdNet, cpu_has_fast_bf16, unsure_but_for_a_confident_middle
from medseg import inference
from medseg.errors import CancelledError
from medseg.inference import (
    DeviceError,
    InferenceOptions,
    InferenceReport,
    count_windows,
    select_device,
    sliding_window_probabilities,
    window_batch_for,
    window_starts,
)
from medseg.models.card import InferenceSettings
from medseg.progress import RunControl
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.networks.nets import UNETR, DynUNet, SegResNet, UNet

CPU = torch.device("cpu")
#: the float32 loop in PyTorch: these tests are about the windows and blending (test_backends.py covers OpenVINO)
FP32 = InferenceOptions(precision="fp32", backend="torch")


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


def small_unet(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(1)
    return UNet(3, 1, classes, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()


def monai_probabilities(net, volume, roi, overlap, mode, batch=1) -> np.ndarray:
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(volume[None]), roi, batch, net, overlap=overlap, mode=mode)
    return torch.softmax(logits[0], 0).numpy()


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("shape", [(37, 29, 18), (10, 12, 9), (64, 16, 16)])
def test_tiling_reproduces_a_voxelwise_predictor_exactly(mode, shape):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(1, *shape)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.5, blend_mode=mode, sw_batch_size=3)
    out = sliding_window_probabilities(Doubling(), volume, settings, device=CPU, options=FP32)
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
def test_windows_are_monais(shape, roi, overlap):
    net = Counting(Doubling())
    settings = InferenceSettings(roi_size=roi, overlap=overlap, blend_mode="constant", sw_batch_size=1)
    sliding_window_probabilities(net, np.zeros((1, *shape), np.float32), settings, device=CPU, options=FP32)
    assert net.windows == count_windows(shape, roi, overlap)
    padded = [max(s, r) for s, r in zip(shape, roi)]
    theirs = dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, 3, (overlap,) * 3))
    assert sorted(window_starts(padded, roi, overlap)) == sorted(tuple(s.start for s in w) for w in theirs)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize(
    ("shape", "roi", "overlap", "batch"),
    [
        ((40, 29, 70), (16, 16, 16), 0.25, 1),  # streamed along z in many slabs
        ((37, 45, 18), (16, 24, 16), 0.5, 3),  # batches that span two slab starts
        ((10, 12, 9), (16, 16, 16), 0.5, 2),  # padded on every axis, one window
        ((33, 16, 20), (16, 16, 16), 0.0, 2),
    ],
)
def test_float32_result_is_plain_monai_sliding_window(mode, shape, roi, overlap, batch):
    """A real network: MedSeg's own loop gives plain MONAI's blended logits (then softmax) to rounding."""
    net = small_unet()
    volume = np.random.default_rng(2).normal(size=(1, *shape)).astype(np.float32)
    settings = InferenceSettings(roi_size=roi, overlap=overlap, blend_mode=mode)
    options = InferenceOptions(precision="fp32", window_batch=batch, backend="torch")
    out = sliding_window_probabilities(net, volume, settings, device=CPU, options=options)
    expected = monai_probabilities(net, volume, roi, overlap, mode)
    assert out.shape == expected.shape == (3, *shape)
    np.testing.assert_allclose(out, expected, atol=2e-5)
    assert np.mean(out.argmax(0) == expected.argmax(0)) > 0.9999


def test_slabs_keep_the_accumulator_to_a_window_depth(monkeypatch):
    """Along a long axis the device holds a slab about one window deep, not the whole volume."""
    sizes = []
    real_zeros = torch.zeros

    def recording_zeros(*args, **kwargs):
        tensor = real_zeros(*args, **kwargs)
        sizes.append(tuple(tensor.shape))
        return tensor

    monkeypatch.setattr(inference.torch, "zeros", recording_zeros)
    volume = np.random.default_rng(0).normal(size=(1, 20, 20, 200)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="gaussian")
    out = sliding_window_probabilities(small_unet(2), volume, settings, device=CPU, options=FP32)
    accumulator = max(sizes, key=np.prod)
    assert accumulator[-1] <= 2 * 16 < 200
    expected = monai_probabilities(small_unet(2), volume, (16, 16, 16), 0.25, "gaussian")
    np.testing.assert_allclose(out, expected, atol=2e-5)


def test_threshold_network_is_reproduced_with_overlapping_windows():
    volume = np.zeros((1, 30, 30, 30), np.float32)
    volume[0, 5:20, 8:25, 3:12] = 3.0
    settings = InferenceSettings(roi_size=(12, 12, 12), overlap=0.5, blend_mode="gaussian", sw_batch_size=4)
    out = sliding_window_probabilities(ThresholdNet(), volume, settings, device=CPU)
    np.testing.assert_array_equal(np.argmax(out, 0), (volume[0] > 1).astype(np.int64))
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


def test_progress_is_reported_and_reaches_one():
    seen = []
    settings = InferenceSettings(roi_size=(8, 8, 8), overlap=0.5, blend_mode="constant", sw_batch_size=2)
    control = RunControl(progress=lambda stage, f: seen.append((stage, f)))
    sliding_window_probabilities(
        Doubling(), np.zeros((1, 20, 20, 20), np.float32), settings, device=CPU, control=control, sw_batch_size=2
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
            Doubling(), np.zeros((1, 20, 20, 20), np.float32), settings, device=CPU, control=control
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


class FlakyOnGpu(torch.nn.Module):
    """A 'GPU' network on the CPU that runs out of memory on every batch while it is on the 'GPU', and records
    (device, batch) of each call."""

    def __init__(self):
        super().__init__()
        self.fake_device = "cuda"
        self.batches = []

    def to(self, device, **kwargs):
        self.fake_device = torch.device(device).type
        return self

    def forward(self, x):
        self.batches.append((self.fake_device, x.shape[0]))
        if self.fake_device == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.cat([2 * x, torch.zeros_like(x)], dim=1)


def test_out_of_memory_halves_the_batch_then_moves_to_the_cpu(monkeypatch, caplog):
    """The fallback path, exercised on the CPU: a 'GPU' network that runs out of memory on every GPU batch."""

    real_to = torch.Tensor.to
    monkeypatch.setattr(
        torch.Tensor, "to", lambda self, *a, **k: self if a and str(a[0]).startswith("cuda") else real_to(self, *a, **k)
    )
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    net = FlakyOnGpu()
    settings = InferenceSettings(roi_size=(8, 8, 8), overlap=0.0, blend_mode="constant")
    volume = np.ones((1, 16, 16, 8), np.float32)
    report = InferenceReport()
    options = InferenceOptions(precision="fp32", window_batch=4, backend="torch")
    with caplog.at_level("WARNING", logger="medseg.inference"):
        out = sliding_window_probabilities(
            net, volume, settings, device=torch.device("cuda"), options=options, report=report
        )
    assert [b for b in net.batches if b[0] == "cuda"] == [("cuda", 4), ("cuda", 2), ("cuda", 1)]
    assert ("cpu", 2) in net.batches and report.device == "cpu"
    for text in (
        "with a window batch of 4; retrying with a window batch of 2",
        "with a window batch of 2; retrying with a window batch of 1",
        "with a window batch of 1; retrying on the CPU",
    ):
        assert text in caplog.text
    assert len(report.notes) == 3
    np.testing.assert_allclose(out[0], torch.sigmoid(torch.tensor(2.0)).item(), atol=1e-5)


def test_out_of_memory_before_the_windows_still_asks_for_less_each_time(monkeypatch):
    """The input's upload runs out of memory on a retry (another process took the card): each retry still asks
    for half the batch before it, then the CPU, instead of repeating the same attempt for ever."""

    uploads = []
    real_to = torch.Tensor.to

    def to(self, *a, **k):
        if a and str(a[0]).startswith("cuda"):
            if self.dim() == 4:  # the volume, not the blending weights
                uploads.append(len(uploads))
                assert len(uploads) < 10, "the retries never end"
                if len(uploads) > 1:  # the first attempt's upload works, every later one runs out of memory
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated upload)")
            return self
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    net, report = FlakyOnGpu(), InferenceReport()
    settings = InferenceSettings(roi_size=(8, 8, 8), overlap=0.0, blend_mode="constant")
    options = InferenceOptions(precision="fp32", window_batch=8, backend="torch")
    out = sliding_window_probabilities(
        net, np.ones((1, 16, 16, 8), np.float32), settings, device=torch.device("cuda"), options=options, report=report
    )
    assert [b for b in net.batches if b[0] == "cuda"] == [("cuda", 4)]  # 4 windows: a batch of 8 runs 4
    assert len(uploads) == 3  # on the GPU at 4, then 2, then 1; then the CPU, which uploads nothing
    assert report.notes == [
        "GPU out of memory with a window batch of 4; retrying with a window batch of 2",
        "GPU out of memory moving the network and the input to cuda; retrying with a window batch of 1",
        "GPU out of memory moving the network and the input to cuda; retrying on the CPU",
    ]
    assert report.device == "cpu" and report.window_batch == 2
    np.testing.assert_allclose(out[0], torch.sigmoid(torch.tensor(2.0)).item(), atol=1e-5)


def test_window_batch_fits_the_windows_and_the_slab_in_the_memory():
    def no_slab(batch):
        return 0

    assert window_batch_for(8 * 2**30, 2**30, no_slab, windows=100) == 8  # 8 GiB / 1 GiB a window
    assert window_batch_for(8 * 2**30, 2**30, no_slab, windows=3) == 3  # never more than there are windows
    assert window_batch_for(2**29, 2**30, no_slab, windows=50) == 1  # at least one
    assert window_batch_for(2**40, 2**20, no_slab, windows=1000) == inference.MAX_GPU_WINDOW_BATCH
    # a slab that deepens with the batch: 2 GiB up to a batch of 4, then 4 GiB
    assert window_batch_for(8 * 2**30, 2**29, lambda b: 2**31 if b <= 4 else 2**32, windows=100) == 8
    assert window_batch_for(5 * 2**30, 2**29, lambda b: 2**31 if b <= 4 else 2**32, windows=100) == 4


def test_slab_depth_grows_with_the_positions_a_batch_spans():
    roi = (16, 16, 16)
    starts = sorted(window_starts((40, 32, 64), roi, 0.5), key=lambda s: (s[2], s))  # 4 x 3 windows per z position
    assert inference.slab_depth(starts, 1, roi, 2, 64) == 16
    assert inference.slab_depth(starts, 12, roi, 2, 64) == 16  # one z position per batch
    assert inference.slab_depth(starts, 13, roi, 2, 64) == 16 + 8  # two: one step deeper
    assert inference.slab_depth(starts, 100, roi, 2, 64) == 64  # never deeper than the volume


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        InferenceOptions(precision="fp8")
    with pytest.raises(ValueError, match="window_batch"):
        InferenceOptions(window_batch=0)
    with pytest.raises(ValueError, match="mirror_axes"):
        InferenceOptions(mirror_axes=(0, 3))


@pytest.mark.parametrize("way", ["top_two", "_top_two_running", "_top_two_reduced"])
@pytest.mark.parametrize("classes", [2, 7, 300])
def test_top_two_matches_torch_on_ties_and_many_classes(way, classes):
    """The CPU's running pass and the GPU's reductions (run here on the CPU) give argmax's index and the margin."""
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.integers(0, 4, size=(2, classes, 5, 6, 3)).astype(np.float32))  # many ties
    index, margin = getattr(inference, way)(logits, 1)
    assert index.dtype == (torch.uint8 if classes < 256 else torch.int64)
    assert torch.equal(index.long(), logits.argmax(1))
    top = torch.topk(logits, 2, dim=1).values
    assert torch.equal(margin, top[:, 0] - top[:, 1])


def test_low_precision_matches_what_the_cpu_supports():
    probes = [getattr(torch.cpu, n, lambda: False) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    assert (inference.low_precision_for(CPU) == torch.bfloat16) == any(p() for p in probes)


def bright_ball(shape=(40, 40, 40), radius=12.0) -> np.ndarray:
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2
    distance = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    return (distance < radius).astype(np.float32)[None]


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no fast bfloat16")
def test_auto_runs_a_confident_model_in_low_precision_with_the_float32_labels():
    net = Confident()
    volume = bright_ball() + np.random.default_rng(0).normal(0, 0.05, (1, 40, 40, 40)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="gaussian")
    exact = sliding_window_probabilities(net, volume, settings, device=CPU, options=FP32)
    report = InferenceReport()
    out = sliding_window_probabilities(net, volume, settings, device=CPU, report=report)
    assert report.precision == "bf16" and report.calibration_disagreement <= inference.DISAGREEMENT_BUDGET
    assert report.estimated_disagreement <= inference.DISAGREEMENT_BUDGET
    assert np.mean(out.argmax(0) == exact.argmax(0)) >= 0.9995
    assert not np.array_equal(out, exact)  # it really ran in bfloat16
    # the same input gives the same result, whatever ran before
    sliding_window_probabilities(net, bright_ball(radius=5.0), settings, device=CPU)
    np.testing.assert_array_equal(sliding_window_probabilities(net, volume, settings, device=CPU), out)


def test_auto_runs_a_volume_of_few_windows_in_float32():
    report = InferenceReport()
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="gaussian")
    sliding_window_probabilities(Confident(), bright_ball((20, 16, 16), 5.0), settings, device=CPU, report=report)
    assert report.windows == 2 and report.precision == "fp32" and report.error_bound is None


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no fast bfloat16")
def test_auto_keeps_float32_for_an_unsure_model():
    """An untrained U-Net's logits nearly tie everywhere: bfloat16 would flip labels, so auto stays in float32."""
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()
    volume = np.random.default_rng(1).normal(size=(1, 40, 36, 30)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="constant")
    report = InferenceReport()
    auto = InferenceOptions(backend="torch")  # the float32 rerun in the same backend as FP32: equal arrays
    out = sliding_window_probabilities(net, volume, settings, device=CPU, report=report, options=auto)
    exact = sliding_window_probabilities(net, volume, settings, device=CPU, options=FP32)
    assert report.precision == "fp32"
    assert report.calibration_disagreement > inference.DISAGREEMENT_BUDGET
    assert "running in float32" in report.notes[0]
    np.testing.assert_array_equal(out, exact)
    forced = sliding_window_probabilities(net, volume, settings, device=CPU, options=InferenceOptions("bf16"))
    assert np.mean(forced.argmax(0) == exact.argmax(0)) < 1 - inference.DISAGREEMENT_BUDGET


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no fast bfloat16")
def test_a_decisive_refusal_is_remembered_for_the_network_until_its_weights_change():
    """A trial that finds bf16 changing several times the budget's labels sends the network's later runs straight
    to float32 (the same result, no trial); new weights, or another network, are tried again."""
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()
    volume = np.random.default_rng(1).normal(size=(1, 40, 36, 30)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="constant")
    auto = InferenceOptions(backend="torch")
    first, second = InferenceReport(), InferenceReport()
    sliding_window_probabilities(net, volume, settings, device=CPU, report=first, options=auto)
    assert first.calibration_disagreement > inference.REMEMBERED_REFUSAL_FACTOR * inference.DISAGREEMENT_BUDGET
    out = sliding_window_probabilities(net, volume[:, ::-1].copy(), settings, device=CPU, report=second, options=auto)
    assert second.precision == "fp32" and second.calibration_disagreement is None and second.trial_shape is None
    assert "in an earlier run of this network" in second.notes[0] and "without another trial" in second.notes[0]
    exact = sliding_window_probabilities(net, volume[:, ::-1].copy(), settings, device=CPU, options=FP32)
    np.testing.assert_array_equal(out, exact)

    with torch.no_grad():  # an optimiser step: the same module, new weights
        next(net.parameters()).mul_(1.0)
    third = InferenceReport()
    sliding_window_probabilities(net, volume, settings, device=CPU, report=third, options=auto)
    assert third.calibration_disagreement is not None and "earlier run" not in " ".join(third.notes)
    other = InferenceReport()  # the same architecture and seed, another module: its own trial
    torch.manual_seed(0)
    twin = UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()
    sliding_window_probabilities(twin, volume, settings, device=CPU, report=other, options=auto)
    assert other.calibration_disagreement is not None


def test_only_a_decisive_refusal_is_remembered():
    net = torch.nn.Conv3d(1, 2, 1)
    key = ("state", (16, 16, 16), 1, "bf16", ((),), "cpu", "torch")
    narrow = inference.REMEMBERED_REFUSAL_FACTOR * inference.DISAGREEMENT_BUDGET
    inference._remember_refusal(net, key, narrow)  # at the factor: a narrow refusal, tried again next time
    assert inference._remembered_refusal(net, key) is None
    inference._remember_refusal(net, key, 1.01 * narrow)
    assert inference._remembered_refusal(net, key) == pytest.approx(1.01 * narrow)
    assert inference._remembered_refusal(net, (*key[:-1], "f32")) is None  # another backend: its own trial


def test_the_cpu_trial_crop_keeps_a_networks_downsampling_and_enough_voxels():
    assert inference.trial_crop((96, 96, 96)) == (48, 48, 48)  # the benchmark's U-Net: an eighth of the work
    assert inference.trial_crop((128, 128, 128)) == (64, 64, 64)
    assert inference.trial_crop((80, 96, 64)) == (32, 48, 32)  # 40 is not a multiple of 16: 32
    assert inference.trial_crop((40, 56, 40)) is None  # the hippocampus window: 16 x 24 x 16 is too few voxels
    assert inference.trial_crop((16, 16, 16)) is None


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no fast bfloat16")
def test_the_cpu_trial_runs_on_the_central_half_of_its_windows_unless_the_network_refuses_that_size():
    """The CPU trial compares the precisions on each trial window's central half (an eighth of the work). A network
    with a fixed input size (UNETR's patch grid) refuses the half: its trial runs on the whole windows instead."""
    volume = np.random.default_rng(2).normal(size=(1, 160, 112, 64)).astype(np.float32)  # 3 x 2 windows of 64
    settings = InferenceSettings(roi_size=(64, 64, 64), overlap=0.25, blend_mode="constant")
    torch.manual_seed(0)
    unsure = UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()
    report = InferenceReport()
    auto = InferenceOptions(backend="torch")
    sliding_window_probabilities(unsure, volume, settings, device=CPU, report=report, options=auto)
    assert report.windows == 6 and report.trial_shape == (32, 32, 32) and report.precision == "fp32"
    assert report.calibration_disagreement > inference.DISAGREEMENT_BUDGET  # the crops still show it is unsure

    fixed = UNETR(1, 2, img_size=(64, 64, 64), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4).eval()
    report = InferenceReport()
    out = sliding_window_probabilities(fixed, volume, settings, device=CPU, report=report, options=auto)
    assert report.trial_shape == (64, 64, 64) and report.calibration_disagreement is not None
    exact = sliding_window_probabilities(fixed, volume, settings, device=CPU, options=FP32)
    if report.precision == "fp32":  # an untrained UNETR nearly ties: the whole-window trial sent it to float32
        np.testing.assert_array_equal(out, exact)
    else:
        assert np.mean(out.argmax(0) == exact.argmax(0)) >= 1 - inference.DISAGREEMENT_BUDGET


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no fast bfloat16")
def test_auto_redoes_the_run_in_float32_when_the_rest_of_the_volume_is_unsure():
    """Confident at the centre (the trial), nearly tied elsewhere: the after-run estimate sends it back to float32."""
    net = Confident()
    volume = unsure_but_for_a_confident_middle()
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="constant")
    report = InferenceReport()
    auto = InferenceOptions(backend="torch")  # the float32 rerun in the same backend as FP32: equal arrays
    out = sliding_window_probabilities(net, volume, settings, device=CPU, report=report, options=auto)
    exact = sliding_window_probabilities(net, volume, settings, device=CPU, options=FP32)
    assert report.calibration_disagreement <= inference.DISAGREEMENT_BUDGET
    assert report.estimated_disagreement > inference.DISAGREEMENT_BUDGET
    assert report.precision == "fp32" and "recomputing in float32" in report.notes[-1]
    np.testing.assert_array_equal(out, exact)


class PositionRamp(torch.nn.Module):
    """Adds the voxel's position in the window along x: not mirror-symmetric, so mirroring shows."""

    def forward(self, x):
        ramp = torch.arange(x.shape[2], dtype=x.dtype).reshape(1, 1, -1, 1, 1) / x.shape[2]
        return torch.cat([torch.zeros_like(x), x + ramp], dim=1)


def test_mirroring_averages_the_flipped_windows():
    volume = np.random.default_rng(0).normal(size=(1, 24, 20, 20)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.5, blend_mode="constant", mirror_axes=(0, 1, 2))
    plain = sliding_window_probabilities(PositionRamp(), volume, settings, device=CPU, options=FP32)
    mirrored = sliding_window_probabilities(
        PositionRamp(),
        volume,
        settings,
        device=CPU,
        options=InferenceOptions("fp32", mirror_axes=(0, 1, 2), backend="torch"),
    )
    # mirrored along x, each window's ramp averages to (16 - 1) / 32 everywhere
    expected = torch.softmax(torch.from_numpy(np.concatenate([0 * volume, volume + 15 / 32])), 0).numpy()
    np.testing.assert_allclose(mirrored, expected, atol=1e-5)
    assert np.abs(plain - expected).max() > 0.05
    counting = Counting(PositionRamp())
    sliding_window_probabilities(
        counting,
        volume,
        settings,
        device=CPU,
        options=InferenceOptions("fp32", window_batch=1, mirror_axes=(0, 2), backend="torch"),
    )
    assert counting.windows == 4 * count_windows(volume.shape[1:], (16, 16, 16), 0.5)


def _fake_gpu_memory(monkeypatch, *, held_gib, window_gib, free_gib, cached_gib=0.0):
    """CUDA's memory queries answered by a fake card: the process holds ``held_gib``, a window takes ``window_gib``,
    and PyTorch's allocator keeps ``cached_gib`` more, freed but not given back to the card."""
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(held_gib * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int((held_gib + cached_gib) * 2**30))
    peak = int((held_gib + window_gib) * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 80 * 2**30))


def test_gpu_window_batch_comes_from_a_probe_within_the_budget_and_the_free_memory(monkeypatch):
    """The GPU's plan, run on the CPU: a one-window probe, then the batch, slab and result within the budget."""
    counting = Counting(Doubling())
    runner = inference._Runner(counting, CPU, None, ())
    roi, shape = (8, 8, 8), (64, 64, 64)
    starts = sorted(window_starts(shape, roi, 0.0), key=lambda s: (s[2], s))
    one = torch.zeros(1, 1, 8, 8, 8)

    def plan(options, **memory):
        _fake_gpu_memory(monkeypatch, **memory)
        return inference._plan_gpu_memory(runner, one, torch.device("cuda"), starts, roi, 2, shape, options)

    # the 6 GiB default budget less the 1 GiB the process holds; the slab of 64 x 64 x 8 voxels is small
    default = plan(InferenceOptions(), held_gib=1, window_gib=1, free_gib=70)
    assert default.batch == 4 and default.classes == 2 and counting.windows == 1
    assert plan(InferenceOptions(gpu_memory_gib=12), held_gib=1, window_gib=1, free_gib=70).batch == 10
    # a process that already holds more than the budget: nothing left for the run, so a batch of 1 (not below 0)
    crowded = plan(InferenceOptions(), held_gib=7, window_gib=1, free_gib=70)
    assert (crowded.batch, crowded.available, crowded.held) == (1, 0, 7 * 2**30)
    assert plan(InferenceOptions(gpu_memory_gib=12), held_gib=1, window_gib=1, free_gib=4).batch == 3  # 90 % free
    # blocks PyTorch keeps for reuse count as free: 90 % of the 4 GiB free and the 2 GiB it keeps
    assert plan(InferenceOptions(gpu_memory_gib=12), held_gib=1, window_gib=1, free_gib=4, cached_gib=2).batch == 5
    # the result stays on the device in float32 when it fits beside the working set, else float16, else the host
    roomy = plan(InferenceOptions(), held_gib=1, window_gib=2**-10, free_gib=70)
    assert roomy.output_dtype(roomy.batch, np.float32) == np.float32
    roomy.voxels = 3 * 2**28  # 2 classes: 6 GiB in float32, 3 GiB in float16, of 5 GiB available
    assert roomy.output_dtype(roomy.batch, np.float32) == np.float16
    roomy.voxels = 2**31
    assert roomy.output_dtype(roomy.batch, np.float32) is None
    # a pointwise head's result has its classes, while the slab blends the 2 channels a window returns: the slab is
    # the same, a finished chunk's temporaries (4 of them, 64 x 64 x 8 voxels) have 105 channels instead of 2
    cuda = torch.device("cuda")
    headed = inference._plan_gpu_memory(runner, one, cuda, starts, roi, 2, shape, InferenceOptions(), 105)
    assert headed.classes == 105 and headed.slab_bytes(1) - default.slab_bytes(1) == 4 * (105 - 2) * 64 * 64 * 8 * 4
    assert inference._plan_gpu_memory(runner, one, CPU, starts, roi, 2, shape, InferenceOptions()) is None
    with pytest.raises(ValueError, match="gpu_memory_gib"):
        InferenceOptions(gpu_memory_gib=0)


def test_gpu_low_precision_is_fp16():
    assert inference.low_precision_for(torch.device("cuda")) == torch.float16


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_result_kept_on_the_device_matches_the_host_one(monkeypatch, dtype):
    """The GPU's device-resident result (accumulated in place in float32, or through the slab in float16), on the
    CPU: the plan is forced as a GPU would make it."""
    volume = np.random.default_rng(5).normal(size=(1, 30, 26, 40)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="gaussian")
    host = sliding_window_probabilities(small_unet(), volume, settings, device=CPU, options=FP32)
    assert isinstance(
        sliding_window_probabilities(small_unet(), volume, settings, device=CPU, keep_on_device=True), np.ndarray
    )  # the CPU never keeps a tensor

    def plan(runner, one, device, starts, roi, axis, shape, options, classes=None):
        return inference._GpuPlan(2, 2**40, 0, classes or 3, int(np.prod(shape)), lambda batch: 0)

    monkeypatch.setattr(inference, "_plan_gpu_memory", plan)
    kept = sliding_window_probabilities(
        small_unet(), volume, settings, device=CPU, options=FP32, keep_on_device=True, out_dtype=dtype
    )
    assert isinstance(kept, torch.Tensor) and kept.dtype == torch.from_numpy(np.zeros(0, dtype)).dtype
    assert kept.shape == host.shape
    np.testing.assert_allclose(kept.float().numpy(), host, atol=1e-6 if dtype == np.float32 else 1e-3)
    # blended features: the slab holds the features, the result on the device the head's 12 classes
    settings = replace(settings, roi_size=(32, 32, 32))
    report = InferenceReport()
    kept = sliding_window_probabilities(
        many_class_dynunet(),
        volume,
        settings,
        device=CPU,
        options=FP32,
        keep_on_device=True,
        out_dtype=dtype,
        report=report,
    )
    monkeypatch.undo()
    host = sliding_window_probabilities(many_class_dynunet(), volume, settings, device=CPU, options=FP32)
    assert isinstance(kept, torch.Tensor) and kept.shape == host.shape == (12, 30, 26, 40)
    assert report.blended_channels == 8
    np.testing.assert_allclose(kept.float().numpy(), host, atol=1e-6 if dtype == np.float32 else 1e-3)


class Overflowing(torch.nn.Module):
    """Logits beyond float16's range (65504) in a bright spot: float16 autocast turns them into inf."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-1e5, 1e5]).reshape(2, 1, 1, 1, 1))

    def forward(self, x):
        return self.conv(x)


def test_float16_overflow_sends_the_run_to_float32():
    volume = np.zeros((1, 24, 24, 24), np.float32)
    volume[0, 10:14, 10:14, 10:14] = 1.0
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.5, blend_mode="gaussian")
    exact = sliding_window_probabilities(Overflowing(), volume, settings, device=CPU, options=FP32)
    report = InferenceReport()
    out = sliding_window_probabilities(
        Overflowing(), volume, settings, device=CPU, options=InferenceOptions("fp16", backend="torch"), report=report
    )
    assert report.precision == "fp32" and "overflowed" in report.notes[-1]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, exact, atol=1e-6)


def test_half_precision_output_matches_float32():
    """Large outputs are kept in float16; on the CPU that takes the slab accumulator path, with the same result."""
    volume = np.random.default_rng(3).normal(size=(1, 30, 26, 40)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="gaussian")
    full = sliding_window_probabilities(small_unet(), volume, settings, device=CPU, options=FP32)
    half = sliding_window_probabilities(small_unet(), volume, settings, device=CPU, options=FP32, out_dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, full, atol=1e-3)


def test_mirroring_is_bounded_by_the_axes_the_card_allows():
    """Mirroring along an axis training never flipped ruins a model, so the card's ``mirror_axes`` bound it."""
    volume = np.random.default_rng(0).normal(size=(1, 24, 20, 20)).astype(np.float32)
    only_x = InferenceSettings(roi_size=(16, 16, 16), overlap=0.5, blend_mode="constant", mirror_axes=(0,))
    counting = Counting(PositionRamp())
    model_axes = InferenceOptions("fp32", window_batch=1, mirror_axes="model", backend="torch")
    sliding_window_probabilities(counting, volume, only_x, device=CPU, options=model_axes)
    assert counting.windows == 2 * count_windows(volume.shape[1:], (16, 16, 16), 0.5), "'model' means x alone here"
    with pytest.raises(ValueError, match=r"mirroring along y, z: the model card allows only x \(inference.mirror_axes"):
        sliding_window_probabilities(
            PositionRamp(), volume, only_x, device=CPU, options=InferenceOptions("fp32", mirror_axes=(0, 1, 2))
        )
    none = replace(only_x, mirror_axes=())
    with pytest.raises(ValueError, match=r"the model card allows no mirror axis"):
        sliding_window_probabilities(PositionRamp(), volume, none, device=CPU, options=model_axes)
    with pytest.raises(ValueError, match="'model'"):
        InferenceOptions(mirror_axes="all")


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="auto runs float32 throughout on a CPU without fast bf16")
def test_a_rejected_trial_replans_the_batch_on_float32_memory(monkeypatch):
    """A batch planned on low-precision activations (the GPU's plan, forced here on the CPU) is planned again on
    the memory the float32 trial measured when the trial sends the run to float32; the result is float32's."""
    volume = np.random.default_rng(6).normal(size=(1, 40, 40, 40)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="gaussian")
    exact = sliding_window_probabilities(small_unet(), volume, settings, device=CPU, options=FP32)
    mib = 2**20
    # the low-precision plan: a batch of 4 at 1 MiB a window, within 10 MiB
    plan = inference._GpuPlan(4, 10 * mib, mib, 3, int(np.prod(volume.shape[1:])), lambda batch: 0)
    monkeypatch.setattr(inference, "_plan_gpu_memory", lambda *args: plan)
    measured = []

    def peak_bytes(device, function):  # the trial's 4 float32 windows held 12 MiB: 3 MiB a window
        measured.append(True)
        return function(), 12 * mib

    monkeypatch.setattr(inference, "_peak_bytes", peak_bytes)
    report = InferenceReport()
    out = sliding_window_probabilities(
        small_unet(), volume, settings, device=CPU, options=InferenceOptions(backend="torch"), report=report
    )
    assert report.precision == "fp32" and "running in float32" in report.notes[0]  # an untrained net: near ties
    assert measured == [True] and plan.per_window == 3 * mib
    assert report.window_batch == 3  # 10 MiB / 3 MiB a window
    np.testing.assert_allclose(out, exact, atol=1e-6)


def forced_gpu_plan(monkeypatch, volume, float32_window_mib: int):
    """The GPU's plan forced on the CPU: a batch of 4 at 1 MiB a (low-precision) window within 10 MiB, and every
    device-memory measurement answering ``float32_window_mib`` a float32 window."""
    mib = 2**20
    plan = inference._GpuPlan(4, 10 * mib, mib, 2, int(np.prod(volume.shape[1:])), lambda batch: 0)
    monkeypatch.setattr(inference, "_plan_gpu_memory", lambda *args: plan)
    measured = []

    def peak_bytes(device, function):  # what the float32 windows measured held
        result = function()
        measured.append(len(result[1]) if isinstance(result, tuple) else len(result))
        return result, measured[-1] * float32_window_mib * mib

    monkeypatch.setattr(inference, "_peak_bytes", peak_bytes)
    return plan, measured


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="auto runs float32 throughout on a CPU without fast bf16")
def test_a_volume_too_small_for_a_trial_replans_its_float32_batch(monkeypatch):
    """Too few windows for a trial: auto runs float32 at once, on a batch planned again from a float32 window's
    memory (the plan probed the low precision's)."""
    volume = np.random.default_rng(7).normal(size=(1, 40, 16, 16)).astype(np.float32)  # 3 windows of 16^3
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="gaussian")
    plan, measured = forced_gpu_plan(monkeypatch, volume, float32_window_mib=5)
    report = InferenceReport()
    out = sliding_window_probabilities(
        small_unet(), volume, settings, device=CPU, options=InferenceOptions(backend="torch"), report=report
    )
    assert report.precision == "fp32" and measured == [1]  # one float32 window probed
    assert plan.per_window == 5 * 2**20 and report.window_batch == 2  # 10 MiB / 5 MiB
    exact = sliding_window_probabilities(small_unet(), volume, settings, device=CPU, options=FP32)
    np.testing.assert_allclose(out, exact, atol=1e-6)


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="auto runs float32 throughout on a CPU without fast bf16")
def test_a_low_precision_run_redone_in_float32_replans_its_batch(monkeypatch):
    """Confident at the centre (the trial keeps bf16), nearly tied elsewhere (the estimate sends it back to
    float32): the float32 redo runs at the batch its float32 memory allows, measured by the trial."""
    volume = unsure_but_for_a_confident_middle()
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="constant")
    plan, measured = forced_gpu_plan(monkeypatch, volume, float32_window_mib=3)
    report = InferenceReport()
    out = sliding_window_probabilities(
        Confident().eval(), volume, settings, device=CPU, options=InferenceOptions(backend="torch"), report=report
    )
    assert "recomputing in float32" in report.notes[0] and report.precision == "fp32"
    assert measured == [4] and plan.per_window == 3 * 2**20  # the trial's 4 windows
    assert report.window_batch == 3  # 10 MiB / 3 MiB
    exact = sliding_window_probabilities(Confident().eval(), volume, settings, device=CPU, options=FP32)
    np.testing.assert_array_equal(out.argmax(0), exact.argmax(0))
    np.testing.assert_allclose(out, exact, atol=1e-6)


class OverflowsInLowPrecision(torch.nn.Module):
    """Confident logits, infinite under autocast: float16's overflow on a GPU, reproduced on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Confident()

    def forward(self, x):
        out = self.inner(x)
        return out * float("inf") if torch.is_autocast_enabled("cpu") else out


def test_a_trial_that_overflows_sends_the_run_to_float32(monkeypatch):
    """An overflow in the trial leaves no error bound to estimate with: the run is float32 from the start."""
    monkeypatch.setattr(inference, "low_precision_for", lambda device: torch.bfloat16)
    volume = unsure_but_for_a_confident_middle()
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="constant")
    report = InferenceReport()
    net = OverflowsInLowPrecision().eval()
    out = sliding_window_probabilities(
        net, volume, settings, device=CPU, options=InferenceOptions(backend="torch"), report=report
    )
    assert report.precision == "fp32" and report.notes == [
        "bf16 overflowed in a trial window batch; running in float32"
    ]
    np.testing.assert_array_equal(out, sliding_window_probabilities(net, volume, settings, device=CPU, options=FP32))


def test_a_window_and_slab_beyond_the_gpu_budget_run_at_a_batch_of_1_and_say_so(monkeypatch):
    """A 105-class model's slab can outgrow the budget on its own (the GPU's plan, forced here on the CPU)."""
    volume = np.random.default_rng(6).normal(size=(1, 40, 40, 40)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="gaussian")
    exact = sliding_window_probabilities(small_unet(), volume, settings, device=CPU, options=FP32)
    gib, voxels = 2**30, int(np.prod(volume.shape[1:]))
    plan = inference._GpuPlan(1, 6 * gib, int(2.7 * gib), 105, voxels, lambda batch: int(3.6 * gib))  # 272x272x224
    monkeypatch.setattr(inference, "_plan_gpu_memory", lambda *args: plan)
    report = InferenceReport()
    out = sliding_window_probabilities(small_unet(), volume, settings, device=CPU, options=FP32, report=report)
    assert report.window_batch == 1
    (note,) = report.notes
    assert "one window (2.7 GiB) and its blending slab (3.6 GiB for 105 classes) need more than the 6.0 GiB" in note
    np.testing.assert_allclose(out, exact, atol=1e-6)
    plan.available, plan.held = 0, 7 * gib  # the process held more than its budget before the run
    report = InferenceReport()
    sliding_window_probabilities(small_unet(), volume, settings, device=CPU, options=FP32, report=report)
    assert (
        "need more than the 0.0 GiB this run may use on the GPU (gpu_memory_gib, less the 7.0 GiB the process"
        in (report.notes[0])
    )
    roomy = inference._GpuPlan(1, 8 * gib, int(2.7 * gib), 105, voxels, lambda batch: int(3.6 * gib))
    monkeypatch.setattr(inference, "_plan_gpu_memory", lambda *args: roomy)
    report = InferenceReport()
    sliding_window_probabilities(small_unet(), volume, settings, device=CPU, options=FP32, report=report)
    assert report.notes == []


@pytest.mark.parametrize("shape", [(30, 26, 40), (12, 20, 9)], ids=["windows", "padded"])
def test_labels_streamed_slab_by_slab_are_the_argmax_of_the_probabilities(shape):
    volume = np.random.default_rng(7).normal(size=(1, *shape)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="gaussian")
    probabilities = sliding_window_probabilities(small_unet(), volume, settings, device=CPU, options=FP32)
    labels = inference.sliding_window_labels(small_unet(), volume, settings, device=CPU, options=FP32)
    assert isinstance(labels, np.ndarray) and labels.dtype == np.uint8 and labels.shape == shape
    np.testing.assert_array_equal(labels, probabilities.argmax(0))


def test_finished_slabs_give_the_same_result_in_chunks_of_any_size(monkeypatch):
    """The CPU finishes a slab in chunks of about ``CPU_FLUSH_CHUNK_BYTES`` of logits: one slice at a time or all
    at once, the labels and the count of voxels near a tie are the same, bit for bit, and so are the
    probabilities to the last bit of float32 (PyTorch's softmax vectorises a chunk by its shape; in place, through
    a slab of blended features for a pointwise head, or into float16)."""
    volume = np.random.default_rng(8).normal(size=(1, 44, 30, 20)).astype(np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="gaussian")
    features = InferenceSettings(roi_size=(32, 32, 32), overlap=0.25, blend_mode="gaussian")
    big = np.random.default_rng(9).normal(size=(1, 70, 40, 36)).astype(np.float32)

    # an error bound on every run, so that the voxels near a tie are counted (no flips: no redo)
    monkeypatch.setattr(inference, "_openvino_rounding", lambda runner: inference._Calibration(0.02, 0.0, 0.0))

    def results():
        report = InferenceReport()
        ov = InferenceOptions("fp32", backend="auto")
        runs = [
            sliding_window_probabilities(small_unet(), volume, settings, device=CPU, options=ov, report=report),
            sliding_window_probabilities(
                small_unet(), volume, settings, device=CPU, options=FP32, out_dtype=np.float16
            ),
            inference.sliding_window_labels(small_unet(), volume, settings, device=CPU, options=FP32),
            sliding_window_probabilities(many_class_dynunet(), big, features, device=CPU, options=FP32),
        ]
        return runs, report.at_risk_fraction

    monkeypatch.setattr(inference, "CPU_FLUSH_CHUNK_BYTES", 1)  # a slice per chunk
    sliced, sliced_risk = results()
    monkeypatch.setattr(inference, "CPU_FLUSH_CHUNK_BYTES", 2**40)  # the whole finished part at once
    whole, whole_risk = results()
    for a, b in zip(sliced, whole):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == np.uint8:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-7 if a.dtype == np.float32 else 1e-3)
            np.testing.assert_array_equal(a.argmax(0), b.argmax(0))
    assert sliced_risk == whole_risk and sliced_risk > 0


def many_class_dynunet(classes: int = 12, seed: int = 0) -> torch.nn.Module:
    """nnU-Net's shape in small: a DynUNet whose 1x1x1 output block reads 8 features and writes ``classes``."""
    torch.manual_seed(seed)
    return DynUNet(
        3, 1, classes, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[8, 16, 32, 64], norm_name="instance"
    ).eval()


def test_a_many_class_dynunet_blends_its_features_and_gives_monais_result():
    """Blending is linear: blending DynUNet's 8 last features and applying its 1x1x1 output block afterwards gives
    the blended logits of its 12 classes, so the slab holds 8 channels instead of 13."""
    net = many_class_dynunet()
    volume = np.random.default_rng(3).normal(size=(1, 70, 50, 44)).astype(np.float32)
    settings = InferenceSettings(roi_size=(32, 32, 32), overlap=0.25, blend_mode="gaussian")
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(volume[None]), (32, 32, 32), 1, net, 0.25, "gaussian")
    expected = torch.softmax(logits[0], 0).numpy()
    report = InferenceReport()
    out = sliding_window_probabilities(net, volume, settings, device=CPU, options=FP32, report=report)
    assert report.blended_channels == 8 and out.shape == (12, 70, 50, 44)
    assert np.abs(out - expected).max() < 1e-5
    assert np.mean(out.argmax(0) == expected.argmax(0)) >= 0.99999  # near ties of an untrained net may flip
    logits_blended = InferenceOptions("fp32", backend="torch", blend_features=False)
    plain_report = InferenceReport()
    plain = sliding_window_probabilities(net, volume, settings, device=CPU, options=logits_blended, report=plain_report)
    assert plain_report.blended_channels == 12
    np.testing.assert_allclose(out, plain, atol=1e-5)
    labels = inference.sliding_window_labels(net, volume, settings, device=CPU, options=FP32)
    assert np.mean(labels == expected.argmax(0)) >= 0.99999
    # mirrored windows average their features as they would their logits
    mirrored = InferenceOptions("fp32", backend="torch", mirror_axes=(0, 2))
    settings = replace(settings, mirror_axes=(0, 1, 2))
    both = [
        sliding_window_probabilities(net, volume, settings, device=CPU, options=replace(mirrored, blend_features=f))
        for f in (True, False)
    ]
    np.testing.assert_allclose(both[0], both[1], atol=1e-5)


def test_feature_blending_is_left_out_where_it_would_not_save_channels():
    net = many_class_dynunet(classes=3)  # 3 classes from 8 features: blending the logits is smaller
    volume = np.random.default_rng(4).normal(size=(1, 40, 36, 36)).astype(np.float32)
    settings = InferenceSettings(roi_size=(32, 32, 32), overlap=0.25, blend_mode="constant")
    report = InferenceReport()
    sliding_window_probabilities(net, volume, settings, device=CPU, options=FP32, report=report)
    assert report.blended_channels == 3
    report = InferenceReport()
    sliding_window_probabilities(small_unet(), volume, settings, device=CPU, options=FP32, report=report)
    assert report.blended_channels == 3  # MONAI's UNet ends in a 3x3x3 convolution: no pointwise head


@pytest.mark.parametrize("backend", ["torch", "openvino"])
@pytest.mark.parametrize("blend_mode", ["constant", "gaussian"])
def test_a_two_class_unet_blends_its_logit_difference_and_gives_monais_result(backend, blend_mode):
    """Blending is linear and softmax ignores a shift: blending l1 - l0 and taking the logits (0, l1 - l0) gives
    MONAI's blended probabilities and labels, from one blended channel instead of two."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    net = small_unet(classes=2)
    volume = np.random.default_rng(11).normal(size=(1, 70, 50, 44)).astype(np.float32)
    settings = InferenceSettings(roi_size=(32, 32, 32), overlap=0.25, blend_mode=blend_mode)
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(volume[None]), (32, 32, 32), 1, net, 0.25, blend_mode)[0]
    expected = torch.softmax(logits, 0).numpy()
    options = InferenceOptions("fp32", backend=backend)
    report = InferenceReport()
    out = sliding_window_probabilities(net, volume, settings, device=CPU, options=options, report=report)
    assert report.blended_channels == 1 and report.backend == backend and out.shape == (2, 70, 50, 44)
    assert np.abs(out - expected).max() < 1e-5
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-6)
    labels = inference.sliding_window_labels(net, volume, settings, device=CPU, options=options)
    margin = (logits[1] - logits[0]).abs().numpy()
    clear = margin > 1e-4 * float(margin.max())  # the labels away from a tie (float32 sums in another order)
    np.testing.assert_array_equal(labels[clear], expected.argmax(0)[clear])
    plain_report = InferenceReport()
    as_monai = replace(options, blend_features=False)
    plain = sliding_window_probabilities(net, volume, settings, device=CPU, options=as_monai, report=plain_report)
    assert plain_report.blended_channels == 2
    np.testing.assert_allclose(out, plain, atol=1e-5)


def test_a_tie_of_the_two_logits_is_the_first_class_as_in_monais_argmax():
    """Logits (x, x) everywhere: MONAI's argmax takes class 0; so does the blended difference, 0."""
    net = UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0).eval()  # ends in a transposed convolution
    last = net.model[-1].conv
    with torch.no_grad():  # both classes' kernels and biases equal: l0 == l1 exactly
        last.weight[:, 1] = last.weight[:, 0]
        last.bias[1] = last.bias[0]
    volume = np.random.default_rng(2).normal(size=(1, 40, 36, 36)).astype(np.float32)
    settings = InferenceSettings(roi_size=(32, 32, 32), overlap=0.25, blend_mode="constant")
    with torch.inference_mode():
        assert bool((net(torch.from_numpy(volume[None, :, :32, :32, :32])).diff(dim=1) == 0).all())
    labels = inference.sliding_window_labels(net, volume, settings, device=CPU, options=FP32)
    assert not labels.any()
    out = sliding_window_probabilities(net, volume, settings, device=CPU, options=FP32)
    np.testing.assert_array_equal(out, 0.5)


def test_only_networks_known_to_return_their_out_channels_blend_a_difference():
    class TwoChannels(torch.nn.Module):  # an arbitrary network: its class count is not known before it runs
        out_channels = 2

        def forward(self, x):
            return torch.cat([x, -x], 1)

    volume = np.random.default_rng(4).normal(size=(1, 40, 36, 36)).astype(np.float32)
    settings = InferenceSettings(roi_size=(32, 32, 32), overlap=0.25, blend_mode="constant")
    report = InferenceReport()
    sliding_window_probabilities(TwoChannels(), volume, settings, device=CPU, options=FP32, report=report)
    assert report.blended_channels == 2
    for net, blended in ((SegResNet(3, 8, 1, 2).eval(), 1), (many_class_dynunet(classes=2), 1)):
        report = InferenceReport()
        sliding_window_probabilities(net, volume, settings, device=CPU, options=FP32, report=report)
        assert report.blended_channels == blended


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no fast bfloat16")
def test_auto_precision_compares_the_heads_logits_when_features_are_blended():
    """The trial turns both precisions' features into logits before it compares them: an untrained 12-class
    DynUNet's near ties send it to float32, and the result is float32's."""
    net = many_class_dynunet()
    volume = np.random.default_rng(5).normal(size=(1, 96, 80, 64)).astype(np.float32)
    settings = InferenceSettings(roi_size=(32, 32, 32), overlap=0.25, blend_mode="constant")
    report = InferenceReport()
    out = sliding_window_probabilities(
        net, volume, settings, device=CPU, options=InferenceOptions(backend="torch"), report=report
    )
    assert report.blended_channels == 8 and report.calibration_disagreement > inference.DISAGREEMENT_BUDGET
    assert report.precision == "fp32"
    np.testing.assert_array_equal(out, sliding_window_probabilities(net, volume, settings, device=CPU, options=FP32))
    openvino = sliding_window_probabilities(net, volume, settings, device=CPU, options=InferenceOptions("fp32"))
    assert np.mean(openvino.argmax(0) == out.argmax(0)) >= 0.9999  # OpenVINO runs the features' part alone


def test_backend_openvino_with_float16_is_refused_not_run_in_pytorch():
    with pytest.raises(ValueError, match="backend openvino runs float32 and bf16 windows; fp16 runs in PyTorch"):
        InferenceOptions(backend="openvino", precision="fp16")
    InferenceOptions(backend="openvino", precision="bf16")
    InferenceOptions(backend="auto", precision="fp16")
