"""OpenVINO as the CPU's float32 backend (medseg.backends): same answer as PyTorch, cached, refused when wrong.

Real OpenVINO, real MONAI networks, real files in a per-test cache folder. OpenVINO is in the ``dev`` extra, so
these tests run in CI; a machine without it skips them (the engine then runs everything in PyTorch).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Confident, cpu_has_fast_bf16, unsure_but_for_a_confident_middle
from medseg import backends
from medseg import inference as inference_module
from medseg.errors import CancelledError, MedSegError
from medseg.inference import (
    DeviceError,
    InferenceOptions,
    InferenceReport,
    sliding_window_labels,
    sliding_window_probabilities,
)
from medseg.models.card import InferenceSettings
from medseg.progress import RunControl
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

pytest.importorskip("openvino")

CPU = torch.device("cpu")
WINDOW = (1, 24, 24, 24)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


def unet(seed: int = 0, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return UNet(3, 1, classes, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.max() - b.min()))


def test_the_converted_unet_has_no_group_norm_reshape_and_no_top_concatenation():
    """The rewrites OpenVINO runs faster (rewrite.phase_group_norm, rewrite.SkipIntoTail) reach the converted graph:
    the tail's group norm is per-channel reductions, and only the inner skip connection concatenates feature maps."""
    model, _ = backends._convert(unet(), WINDOW)
    kinds = [op.get_type_name() for op in model.get_ordered_ops()]
    feature_concats = [
        op
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Concat" and op.get_output_partial_shape(0).rank == 5
    ]
    assert "GroupNormalization" not in kinds
    assert len(feature_concats) == 1  # the U-Net has two skip connections


def test_openvino_gives_pytorchs_logits_for_any_window_batch_and_caches_the_conversion(own_cache):
    net = unet()
    compiled = backends.openvino_network(net, WINDOW)
    assert compiled.source == "converted"
    for batch in (1, 2, 3):  # the window batch is a dynamic dimension
        x = torch.randn(batch, *WINDOW, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = net(x)
        got = compiled(x)
        assert got.shape == expected.shape
        assert relative_difference(got, expected) < 1e-4
        assert float((got.argmax(1) == expected.argmax(1)).float().mean()) > 0.9999
    # the same object again: the compiled network held in memory
    assert backends.openvino_network(net, WINDOW) is compiled
    # an equal network in another object (a new process, as far as memory goes): read from the disk cache
    (entry,) = own_cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "model.bin", "model.xml"]
    again = backends.openvino_network(copy.deepcopy(net), WINDOW)
    assert again.source == "cache"
    x = torch.randn(2, *WINDOW)
    torch.testing.assert_close(again(x), compiled(x))
    # the check's rounding bound travels with the cached copy; float32 rounding: far below the logits' range
    assert 0 < compiled.bound < 1e-3 and 0 < compiled.flips_per_risk <= 1
    assert (again.bound, again.flips_per_risk) == (compiled.bound, compiled.flips_per_risk)
    manifest = entry / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"check"', '"unchecked"'))  # an older cache's manifest
    assert backends.openvino_network(copy.deepcopy(net), WINDOW).source == "converted"


def test_one_compiled_network_serves_several_threads(own_cache):
    """A compiled network has one OpenVINO request, which refuses a second caller while it runs ("Infer Request is
    busy"): callers from several threads take turns, and each gets its own input's logits."""
    compiled = backends.openvino_network(unet(seed=2), WINDOW)
    inputs = [torch.randn(2, *WINDOW, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    expected = [compiled(x) for x in inputs]
    failures = []

    def work(index):
        try:
            for _ in range(10):
                if not torch.equal(compiled(inputs[index]), expected[index]):
                    failures.append(f"thread {index}: other logits")
        except Exception as error:  # noqa: BLE001 - what the test reports
            failures.append(f"thread {index}: {error!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_a_network_that_gave_its_memory_back_runs_again_with_the_same_logits(own_cache):
    """``release_memory`` drops the request and its working memory; the next call makes a new request, for a window
    shape it has run before or a new one (bf16's one compilation for every shape), with the same logits."""
    net = unet(seed=7)
    for precision in ("f32", "bf16"):
        compiled = backends.openvino_network(net, WINDOW, precision=precision)
        shapes = [WINDOW] if precision == "f32" else [WINDOW, (1, 16, 16, 16)]
        inputs = [torch.randn(2, *shape, generator=torch.Generator().manual_seed(8)) for shape in shapes]
        expected = [compiled(x) for x in inputs]
        for _ in range(2):  # released twice in a row: nothing to give back the second time, and no error
            compiled.release_memory()
        assert compiled._request is None
        assert all(torch.equal(compiled(x), e) for x, e in zip(inputs, expected))
        assert compiled._request is not None


def test_each_sliding_window_run_gives_openvinos_memory_back_once_its_windows_are_done(monkeypatch):
    """The windows' network releases its working memory after the last window batch and before the last slab is
    finished (the blending's biggest temporaries), and the trial's bf16 network when the trial rejects it; the
    labels are those of a run that keeps it."""
    net = unet(seed=5, classes=2)
    volume = np.random.default_rng(6).normal(size=(1, 60, 40, 40)).astype(np.float32)
    settings = InferenceSettings(roi_size=(24, 24, 24), overlap=0.25, blend_mode="gaussian")
    options = InferenceOptions("fp32", backend="openvino")
    kept = sliding_window_probabilities(net, volume, settings, device=CPU, options=options)
    events = []
    release, flush = backends.OpenVINONetwork.release_memory, inference_module._SlabStream._flush

    def released(self):
        events.append(("release", self.precision))
        release(self)

    def flushed(self, acc, norm, start, length):
        events.append(("flush", start + length == self.shape[self.axis]))  # True: the last slab
        return flush(self, acc, norm, start, length)

    monkeypatch.setattr(backends.OpenVINONetwork, "release_memory", released)
    monkeypatch.setattr(inference_module._SlabStream, "_flush", flushed)
    report = InferenceReport()
    out = sliding_window_probabilities(net, volume, settings, device=CPU, options=options, report=report)
    assert report.backend == "openvino" and report.precision == "fp32"
    np.testing.assert_array_equal(out, kept)
    assert events.count(("release", "f32")) == 1
    assert events[-2:] == [("release", "f32"), ("flush", True)]
    if cpu_has_fast_bf16():  # an unsure model's trial rejects bf16: its network gives its memory back at once
        events.clear()
        report = InferenceReport()
        sliding_window_probabilities(
            net, volume, settings, device=CPU, options=InferenceOptions(backend="openvino"), report=report
        )
        assert report.precision == "fp32" and report.calibration_disagreement > 5e-4
        assert events[0] == ("release", "bf16") and events[-2:] == [("release", "f32"), ("flush", True)]


def test_a_cancelled_openvino_run_gives_its_memory_back(monkeypatch):
    """Cancel after the first window batch: the run stops with CancelledError and its OpenVINO network gives its
    working memory back at once, not after some later run."""
    net = unet(seed=5, classes=2)
    volume = np.random.default_rng(6).normal(size=(1, 60, 40, 40)).astype(np.float32)
    settings = InferenceSettings(roi_size=(24, 24, 24), overlap=0.25, blend_mode="gaussian")
    released = []
    release = backends.OpenVINONetwork.release_memory
    monkeypatch.setattr(
        backends.OpenVINONetwork, "release_memory", lambda self: (released.append(self.precision), release(self))
    )
    control = RunControl()
    control.progress = lambda stage, fraction: control.cancel()  # after the first batch's progress
    with pytest.raises(CancelledError):
        sliding_window_probabilities(
            net, volume, settings, device=CPU, options=InferenceOptions("fp32", backend="openvino"), control=control
        )
    assert released == ["f32"]
    # the run's compiled network: of what the engine runs on each window (a two-class U-Net's logit difference)
    assert backends.openvino_network(inference_module.window_parts(net, 1)[0], (1, 24, 24, 24))._request is None


def test_changed_weights_or_window_get_their_own_conversion(own_cache):
    net = unet()
    backends.openvino_network(net, WINDOW)
    with torch.no_grad():
        net.model[0].conv.unit0.conv.weight.mul_(-1.0)  # in place: the same tensors, new values
    changed = backends.openvino_network(net, WINDOW)
    assert changed.source == "converted"
    x = torch.randn(1, *WINDOW)
    with torch.inference_mode():
        assert relative_difference(changed(x), net(x)) < 1e-4
    assert backends.openvino_network(net, (1, 32, 32, 32)).source == "converted"
    assert len(list(own_cache.iterdir())) == 3


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="OpenVINO computes bf16 only on a CPU with AMX or AVX-512-BF16")
def test_openvino_bf16_is_the_checked_float32_conversion_compiled_again(own_cache):
    net = unet(seed=1)
    bf16 = backends.openvino_network(net, WINDOW, precision="bf16")
    f32 = backends.openvino_network(net, WINDOW)
    assert (bf16.precision, f32.precision) == ("bf16", "f32") and bf16.source == f32.source == "converted"
    assert len(list(own_cache.iterdir())) == 1  # one conversion, cached once, for both
    # both held in memory: neither evicts the other
    assert backends.openvino_network(net, WINDOW, precision="bf16") is bf16
    assert backends.openvino_network(net, WINDOW) is f32
    x = torch.randn(2, *WINDOW, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = net(x)
    # bfloat16's 8-bit mantissa: well above float32's rounding, well below a wrong network's difference
    low, exact = relative_difference(bf16(x), expected), relative_difference(f32(x), expected)
    assert 1e-4 < low < 0.03 and exact < 1e-5
    assert float((bf16(x).argmax(1) == expected.argmax(1)).float().mean()) > 0.99
    # a crop of the window (the engine's trial): the one bf16 compilation runs it too, no new conversion
    crop = backends.openvino_network(net, (1, 16, 16, 16), precision="bf16", converted_for=WINDOW)
    assert crop is bf16
    small = x[:, :, 4:20, 4:20, 4:20].contiguous()
    with torch.inference_mode():
        expected_small = net(small)
    # windows and crops in turn: each call's logits are its own (OpenVINO writes into the array it returns)
    windows = bf16(x)
    crops = crop(small)
    assert crops.shape == expected_small.shape and 1e-4 < relative_difference(crops, expected_small) < 0.03
    assert torch.equal(bf16(x), windows) and torch.equal(crop(small), crops)
    assert 1e-4 < relative_difference(windows, expected) < 0.03
    assert len(list(own_cache.iterdir())) == 1 and backends.openvino_network(net, WINDOW) is f32
    with pytest.raises(ValueError, match="unknown OpenVINO precision 'int8'"):
        backends.openvino_network(net, WINDOW, precision="int8")
    with pytest.raises(ValueError, match="a float32 network is compiled for the window it was converted"):
        backends.openvino_network(net, (1, 16, 16, 16), converted_for=WINDOW)


def test_a_damaged_cache_entry_is_ignored_and_replaced(own_cache, caplog):
    net = unet()
    backends.openvino_network(net, WINDOW)
    (entry,) = own_cache.iterdir()
    weights = entry / "model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="medseg.backends"):
        fresh = backends.openvino_network(copy.deepcopy(net), WINDOW)
    assert fresh.source == "converted"
    assert "model.bin does not match its recorded SHA-256" in caplog.text
    assert backends.openvino_network(copy.deepcopy(net), WINDOW).source == "cache"  # rewritten whole


def test_a_cache_that_cannot_be_written_costs_only_the_next_conversion(own_cache, caplog, monkeypatch):
    """OpenVINO's save_model raises RuntimeError on a full disk ("basic_ios::clear: iostream error", as it did
    writing to /dev/full here): the run goes on with the network it converted and checked, warns, and leaves no
    half-written entry; a cache folder that goes away while pruning is no error either."""
    import openvino

    def full_disk(model, path, **kwargs):
        Path(path).write_bytes(b"<?xml")  # begun, then the disk is full
        raise RuntimeError("Exception from src/core/src/pass/serialize.cpp:\nbasic_ios::clear: iostream error")

    monkeypatch.setattr(openvino, "save_model", full_disk)
    net = unet()
    with caplog.at_level(logging.WARNING, logger="medseg.backends"):
        compiled = backends.openvino_network(net, WINDOW)
    assert compiled.source == "converted"
    assert "could not cache the OpenVINO model in" in caplog.text and "basic_ios::clear: iostream error" in caplog.text
    assert list(own_cache.iterdir()) == []  # the staging folder went with its partial file
    window = torch.randn(2, *WINDOW)
    torch.testing.assert_close(compiled(window), net(window).detach(), rtol=0, atol=1e-4)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medseg.backends"):
        backends._prune(own_cache / "gone", keep=1)
    assert "could not prune the OpenVINO cache" in caplog.text


class SignFromInput(torch.nn.Module):
    """Data-dependent Python control flow: a trace freezes the branch its example input took (the zeros' one)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        sign = 1.0 if float(x.abs().sum()) > 0 else -1.0
        return sign * self.conv(x)


def test_a_network_openvino_gets_wrong_is_refused_before_it_runs(own_cache):
    net = SignFromInput().eval()
    with pytest.raises(backends.BackendUnavailableError, match="differs from PyTorch's on a check window"):
        backends.openvino_network(net, WINDOW)
    assert not own_cache.exists() or not list(own_cache.iterdir())  # nothing cached
    volume = np.random.default_rng(0).normal(size=(1, 30, 30, 30)).astype(np.float32)
    settings = InferenceSettings(roi_size=(24, 24, 24), overlap=0.25, blend_mode="constant")
    report = InferenceReport()
    out = sliding_window_probabilities(
        net, volume, settings, device=CPU, options=InferenceOptions("fp32"), report=report
    )
    assert report.backend == "torch" and "float32 windows run in PyTorch" in report.notes[0]
    torch_only = sliding_window_probabilities(
        net, volume, settings, device=CPU, options=InferenceOptions("fp32", backend="torch")
    )
    np.testing.assert_array_equal(out, torch_only)
    with pytest.raises(MedSegError, match="backend openvino: OpenVINO's result differs"):
        sliding_window_probabilities(
            net, volume, settings, device=CPU, options=InferenceOptions("fp32", backend="openvino")
        )


@pytest.mark.parametrize("mirror_axes", [(), (0, 2)])
def test_sliding_window_in_openvino_is_plain_monai_to_float32_rounding(mirror_axes):
    net = unet(seed=3)
    volume = np.random.default_rng(4).normal(size=(1, 50, 41, 30)).astype(np.float32)
    settings = InferenceSettings(roi_size=(24, 24, 24), overlap=0.25, blend_mode="gaussian", mirror_axes=(0, 1, 2))
    report = InferenceReport()
    options = InferenceOptions("fp32", backend="openvino", mirror_axes=mirror_axes)
    out = sliding_window_probabilities(net, volume, settings, device=CPU, options=options, report=report)
    assert report.backend == "openvino" and report.precision == "fp32" and not report.notes
    if mirror_axes:
        expected = sliding_window_probabilities(
            net,
            volume,
            settings,
            device=CPU,
            options=InferenceOptions("fp32", backend="torch", mirror_axes=mirror_axes),
        )
    else:
        with torch.inference_mode():
            logits = sliding_window_inference(torch.from_numpy(volume[None]), (24, 24, 24), 1, net, 0.25, "gaussian")
        expected = torch.softmax(logits[0], 0).numpy()
    assert np.abs(out - expected).max() < 1e-4
    assert np.mean(out.argmax(0) == expected.argmax(0)) > 0.9999


def test_auto_precision_falls_back_to_float32_in_openvino_with_a_pytorch_trial():
    """An unsure model: the trial (PyTorch float32 against low precision) rejects low precision, and the rest of
    the volume runs in OpenVINO's float32; on a CPU without fast low precision it is all OpenVINO float32."""
    net = unet(seed=5, classes=2)
    volume = np.random.default_rng(6).normal(size=(1, 60, 40, 40)).astype(np.float32)
    settings = InferenceSettings(roi_size=(24, 24, 24), overlap=0.25, blend_mode="constant")
    report = InferenceReport()
    out = sliding_window_probabilities(net, volume, settings, device=CPU, report=report)
    assert report.precision == "fp32" and report.backend == "openvino"
    exact = sliding_window_probabilities(
        net, volume, settings, device=CPU, options=InferenceOptions("fp32", backend="torch")
    )
    assert np.mean(out.argmax(0) == exact.argmax(0)) > 0.9999


def test_backend_choices_are_checked():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        InferenceOptions(backend="tensorrt")
    settings = InferenceSettings(roi_size=(8, 8, 8), overlap=0.0, blend_mode="constant")
    with pytest.raises(DeviceError, match="backend openvino runs on the CPU only"):
        sliding_window_probabilities(
            unet(),
            np.zeros((1, 8, 8, 8), np.float32),
            settings,
            device=torch.device("cuda"),
            options=InferenceOptions(backend="openvino"),
        )


def test_without_openvino_auto_runs_pytorch_and_openvino_says_how_to_install(monkeypatch):
    # the one stand-in here: OpenVINO cannot be uninstalled for a test, so its import check answers "absent"
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    settings = InferenceSettings(roi_size=(24, 24, 24), overlap=0.25, blend_mode="constant")
    volume = np.random.default_rng(0).normal(size=(1, 30, 30, 30)).astype(np.float32)
    report = InferenceReport()
    sliding_window_probabilities(unet(), volume, settings, device=CPU, options=InferenceOptions("fp32"), report=report)
    assert report.backend == "torch" and not report.notes
    with pytest.raises(
        MedSegError, match=r'not installed \(pip install openvino; in Slicer: slicer\.util\.pip_install\("openvino"\)\)'
    ):
        sliding_window_probabilities(
            unet(), volume, settings, device=CPU, options=InferenceOptions("fp32", backend="openvino")
        )


def test_the_disk_cache_keeps_the_most_recently_used_networks(own_cache, monkeypatch):
    monkeypatch.setattr(backends, "MAX_CACHED_NETWORKS", 2)
    first, second = unet(seed=10), unet(seed=11)
    backends.openvino_network(first, WINDOW)
    (a,) = own_cache.iterdir()
    backends.openvino_network(second, WINDOW)
    (b,) = set(own_cache.iterdir()) - {a}
    os.utime(a, (2000, 2000))  # the first used last
    os.utime(b, (1000, 1000))
    backends.openvino_network(unet(seed=12), WINDOW)
    assert len(list(own_cache.iterdir())) == 2 and a.exists() and not b.exists()
    assert backends.openvino_network(copy.deepcopy(first), WINDOW).source == "cache"
    assert a.stat().st_mtime > 2000  # reading it marked it as used


class RefusesTracing(torch.nn.Module):
    """A network that cannot be traced (as one with Python-side data handling cannot): conversion fails."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("this network cannot be traced")
        return self.conv(x)


def test_a_network_that_does_not_convert_runs_in_pytorch_with_a_note(own_cache):
    volume = np.random.default_rng(1).normal(size=(1, 30, 30, 30)).astype(np.float32)
    settings = InferenceSettings(roi_size=(24, 24, 24), overlap=0.25, blend_mode="constant")
    report = InferenceReport()
    net = RefusesTracing().eval()
    out = sliding_window_probabilities(
        net, volume, settings, device=CPU, options=InferenceOptions("fp32"), report=report
    )
    assert report.backend == "torch"
    (note,) = report.notes
    assert note.startswith("OpenVINO could not convert the network: ")
    assert note.endswith("; float32 windows run in PyTorch")
    expected = sliding_window_probabilities(
        net, volume, settings, device=CPU, options=InferenceOptions("fp32", backend="torch")
    )
    np.testing.assert_array_equal(out, expected)
    assert not own_cache.exists() or not list(own_cache.iterdir())


def test_an_openvino_run_within_its_rounding_of_ties_is_recomputed_in_pytorch():
    """After an OpenVINO run, the voxels whose blended margin is within OpenVINO's rounding bound (from its check)
    estimate how many labels its rounding could change; above the budget the run is redone in PyTorch. Here the
    bound is raised to cover every voxel: the result is then PyTorch's, exactly."""
    net = unet(seed=7, classes=2)
    volume = np.random.default_rng(8).normal(size=(1, 60, 40, 40)).astype(np.float32)
    settings = InferenceSettings(roi_size=(24, 24, 24), overlap=0.25, blend_mode="constant")
    fp32 = InferenceOptions("fp32")
    report = InferenceReport()
    sliding_window_probabilities(net, volume, settings, device=CPU, options=fp32, report=report)
    assert report.backend == "openvino" and report.estimated_disagreement < 5e-4 and not report.notes
    # the run's, held in memory: of what the engine runs on each window (a two-class U-Net's logit difference)
    compiled = backends.openvino_network(inference_module.window_parts(net, 1)[0], (1, 24, 24, 24))
    compiled.bound = 1e9  # every voxel within the bound of a tie
    report = InferenceReport()
    out = sliding_window_probabilities(net, volume, settings, device=CPU, options=fp32, report=report)
    assert report.backend == "torch" and report.at_risk_fraction == 1.0
    assert "within OpenVINO's float32 rounding" in report.notes[0] and "recomputing in PyTorch" in report.notes[0]
    exact = InferenceOptions("fp32", backend="torch")
    np.testing.assert_array_equal(out, sliding_window_probabilities(net, volume, settings, device=CPU, options=exact))


@pytest.mark.parametrize("labels_only", [False, True])
def test_only_the_volumes_own_voxels_count_near_a_tie_not_monais_padding(labels_only):
    """A thin volume padded to the window (4 slices in 16: three quarters padding, cropped away after the run): the
    padding's zeros tie exactly under this network, the volume's voxels are far from a tie. The tie count that
    decides a redo covers the voxels the caller gets, so nothing is redone; it once counted the padding too, and
    redid the run in PyTorch for voxels nobody sees."""
    net = torch.nn.Conv3d(1, 2, 1, bias=False).eval()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1, 1))  # logits (x, -x): margin 2 |x|
    volume = np.ones((1, 20, 20, 4), np.float32)
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="constant")
    backends.openvino_network(net, (1, 16, 16, 16)).bound = 1.0  # the run's: covers the padding's ties, not 2
    report, fp32 = InferenceReport(), InferenceOptions("fp32")
    run = sliding_window_labels if labels_only else sliding_window_probabilities
    out = run(net, volume, settings, device=CPU, options=fp32, report=report)
    assert (report.backend, report.at_risk_fraction, report.notes) == ("openvino", 0.0, [])
    assert out.shape == ((20, 20, 4) if labels_only else (2, 20, 20, 4))
    volume[0, :, :, 1] = 0.0  # a tie inside the volume: one slice of four
    report = InferenceReport()
    run(net, volume, settings, device=CPU, options=fp32, report=report)
    assert report.at_risk_fraction == 0.25 and report.backend == "torch"  # redone, as it should be
    assert "recomputing in PyTorch" in report.notes[0]


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="auto runs float32 throughout on a CPU without fast bf16")
def test_a_low_precision_run_redone_in_openvino_is_checked_against_its_rounding_too():
    """Confident at the centre (the trial passes bf16), nearly tied elsewhere: the bf16 run is redone in float32,
    which goes to OpenVINO; with a rounding bound that covers every voxel, that float32 run is redone in PyTorch."""
    net = Confident().eval()
    volume = unsure_but_for_a_confident_middle()
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25, blend_mode="constant")
    backends.openvino_network(net, (1, 16, 16, 16)).bound = 1e9  # the run's compiled network, held in memory
    report = InferenceReport()
    out = sliding_window_probabilities(net, volume, settings, device=CPU, report=report)
    assert "recomputing in float32" in report.notes[0] and "recomputing in PyTorch" in report.notes[1]
    assert report.precision == "fp32" and report.backend == "torch"
    exact = InferenceOptions("fp32", backend="torch")
    np.testing.assert_array_equal(out, sliding_window_probabilities(net, volume, settings, device=CPU, options=exact))


def confident_volume() -> np.ndarray:
    """(1, 160, 100, 64): a bright block in noise, for :class:`Confident`: 6 windows of 64^3, whose central halves
    are large enough for PyTorch's cropped trial."""
    volume = np.random.default_rng(2).normal(0.0, 0.2, (1, 160, 100, 64)).astype(np.float32)
    volume[:, 50:110, 30:70, 20:44] += 1.0
    return volume


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="auto runs float32 throughout on a CPU without fast bf16")
def test_bf16_windows_run_in_openvino_after_a_trial_on_crops_in_openvino():
    """A confident model: auto keeps bf16; with backend auto (OpenVINO installed, a CPU with fast bf16) or
    openvino, in OpenVINO, after a trial that compares PyTorch's float32 with OpenVINO's bf16 on the central crops
    (the converted network reshaped to them); with backend torch, in PyTorch's autocast. Every way, the labels are
    float32's."""
    net, volume = Confident().eval(), confident_volume()
    settings = InferenceSettings(roi_size=(64, 64, 64), overlap=0.25, blend_mode="gaussian", mirror_axes=(0, 1, 2))
    exact = sliding_window_probabilities(
        net, volume, settings, device=CPU, options=InferenceOptions("fp32", backend="torch")
    ).argmax(0)

    def run(options):
        report = InferenceReport()
        out = sliding_window_probabilities(net, volume, settings, device=CPU, options=options, report=report)
        assert report.precision == "bf16" and not report.notes
        assert np.mean(out.argmax(0) == exact) > 0.9995
        return report

    report = run(InferenceOptions(backend="openvino"))
    assert report.backend == "openvino" and report.trial_shape == (32, 32, 32) and report.windows == 6
    assert report.calibration_disagreement <= 5e-4 and 0 < report.error_bound < 0.5
    # what ran: one bf16 compilation, for the windows and the crops alike
    window = backends.openvino_network(net, (1, 64, 64, 64), precision="bf16")
    crops = backends.openvino_network(net, (1, 32, 32, 32), precision="bf16", converted_for=(1, 64, 64, 64))
    assert window.precision == "bf16" and crops is window
    assert run(InferenceOptions("bf16", backend="openvino")).backend == "openvino"
    mirrored = run(InferenceOptions("bf16", backend="openvino", mirror_axes=(0,)))  # a symmetric kernel: same labels
    assert mirrored.backend == "openvino" and mirrored.mirror_axes == (0,)
    for backend in ("auto", "torch"):
        report = run(InferenceOptions(backend=backend))
        assert report.backend == ("openvino" if backend == "auto" else "torch") and report.trial_shape == (32, 32, 32)
        assert run(InferenceOptions("bf16", backend=backend)).backend == report.backend


def test_auto_runs_bf16_in_pytorch_where_openvino_cannot_take_the_network_and_tries_it_once(own_cache, monkeypatch):
    """backend auto: a network OpenVINO cannot convert runs its bf16 windows in PyTorch's autocast with a note, and
    a float32 run after a rejected trial does not convert it again; backend openvino refuses it."""
    conversions = []
    convert = backends._convert

    def counted(*args, **kwargs):
        conversions.append(args[1])
        return convert(*args, **kwargs)

    monkeypatch.setattr(backends, "_convert", counted)
    volume = np.random.default_rng(1).normal(size=(1, 60, 40, 40)).astype(np.float32)
    settings = InferenceSettings(roi_size=(24, 24, 24), overlap=0.25, blend_mode="constant")
    net = RefusesTracing().eval()
    report = InferenceReport()
    out = sliding_window_probabilities(net, volume, settings, device=CPU, report=report)
    assert report.backend == "torch" and len(conversions) == 1
    assert report.notes[0].startswith("OpenVINO could not convert the network: ")
    assert report.notes[0].endswith("windows run in PyTorch")  # "the windows", or "float32 windows" without bf16
    torch_only = sliding_window_probabilities(
        net, volume, settings, device=CPU, options=InferenceOptions(backend="torch")
    )
    np.testing.assert_array_equal(out, torch_only)
    if cpu_has_fast_bf16():  # a trial ran: bf16 kept (a single convolution is sure of itself), or float32 in PyTorch
        assert report.precision in ("bf16", "fp32") and report.calibration_disagreement is not None
    with pytest.raises(MedSegError, match="backend openvino: OpenVINO could not convert the network"):
        sliding_window_probabilities(net, volume, settings, device=CPU, options=InferenceOptions(backend="openvino"))


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="auto runs float32 throughout on a CPU without fast bf16")
def test_a_network_that_does_not_compile_in_bf16_runs_its_bf16_windows_in_pytorch(own_cache, monkeypatch):
    """It converts (float32 compiles and passes the check) but OpenVINO cannot compile it in bf16: backend auto
    finds out before any window runs and runs the bf16 windows in PyTorch's autocast, with a note, its float32
    still in OpenVINO; backend openvino refuses the run by name."""
    compile_ = backends._compile
    tried = []

    def no_bf16(model, threads, precision="f32"):
        tried.append(precision)
        if precision == "bf16":
            raise backends.BackendUnavailableError("OpenVINO could not compile the network: no bf16 (simulated)")
        return compile_(model, threads, precision)

    monkeypatch.setattr(backends, "_compile", no_bf16)
    net, volume = Confident().eval(), confident_volume()
    settings = InferenceSettings(roi_size=(64, 64, 64), overlap=0.25, blend_mode="gaussian")
    report = InferenceReport()
    out = sliding_window_probabilities(net, volume, settings, device=CPU, report=report)
    assert (report.precision, report.backend) == ("bf16", "torch") and tried == ["f32", "bf16"]
    assert report.notes == [
        "bf16: OpenVINO could not compile the network: no bf16 (simulated); bf16 windows run in PyTorch"
    ]
    autocast = sliding_window_probabilities(
        net, volume, settings, device=CPU, options=InferenceOptions(backend="torch")
    )
    np.testing.assert_array_equal(out, autocast)
    float32 = InferenceReport()
    sliding_window_probabilities(net, volume, settings, device=CPU, options=InferenceOptions("fp32"), report=float32)
    assert float32.backend == "openvino"  # only bf16 was refused
    with pytest.raises(MedSegError, match=r"^backend openvino, bf16: OpenVINO could not compile the network"):
        sliding_window_probabilities(
            net, volume, settings, device=CPU, options=InferenceOptions("bf16", backend="openvino")
        )


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="auto runs float32 throughout on a CPU without fast bf16")
def test_bf16_in_openvino_whose_crops_do_not_compile_has_its_trial_on_whole_windows(own_cache, monkeypatch):
    """Where OpenVINO cannot take the crops (a network converted for its window alone, as a transformer's fixed
    patches make it, whose copy reshaped to the crops then fails shape inference, as MONAI's U-Net's skip
    connections do), the trial runs on the whole central windows, and bf16 still runs in OpenVINO. Stand-ins: the
    conversion is asked for the window alone (the engine's own static path), and reshaping refuses every other
    shape (this small network would reshape)."""
    convert, reshape = backends._convert, backends._for_shape

    def window_only(model, shape):
        if tuple(shape) != (1, 64, 64, 64):
            raise backends.BackendUnavailableError(f"OpenVINO could not reshape the network to {tuple(shape)}")
        return reshape(model, shape)

    monkeypatch.setattr(backends, "_convert", lambda network, shape: convert(network, shape, spatially_dynamic=False))
    monkeypatch.setattr(backends, "_for_shape", window_only)
    net, volume = Confident().eval(), confident_volume()
    settings = InferenceSettings(roi_size=(64, 64, 64), overlap=0.25, blend_mode="gaussian")
    report = InferenceReport()
    out = sliding_window_probabilities(
        net, volume, settings, device=CPU, options=InferenceOptions(backend="openvino"), report=report
    )
    assert (report.precision, report.backend, report.trial_shape) == ("bf16", "openvino", (64, 64, 64))
    assert not backends._spatially_dynamic(backends.openvino_model(net, (1, 64, 64, 64)))  # frozen to the window
    exact = sliding_window_probabilities(
        net, volume, settings, device=CPU, options=InferenceOptions("fp32", backend="torch")
    )
    assert np.mean(out.argmax(0) == exact.argmax(0)) > 0.9995
