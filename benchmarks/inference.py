"""Inference speed and memory: MedSeg against plain MONAI and a MONAI tutorial-style pipeline, one input, one model.

python benchmarks/inference.py --device cpu --model unet --classes 2 --shape 256 256 160
python benchmarks/inference.py --device cpu --model unet-ct --shape 256 256 160
python benchmarks/inference.py --device cpu --model hippocampus-mri --shape path/to/image.nii.gz

The tutorial-style baseline reads NIfTI with nibabel, as MONAI does by default (``pip install -e .[bench]``).

Variants, each in its own child process (so ``peak_rss_MiB`` / ``peak_gpu_MiB`` is its own), timed as the median of
``--repeats`` runs after a warm-up (``first_*`` is that first run):

* ``monai``: plain ``sliding_window_inference(x, roi, 1, net, overlap=0.25)`` in float32 on MedSeg's network input
  (the network part only);
* ``tutorial``: a MONAI tutorial-style pipeline, file in and file out: LoadImaged, EnsureChannelFirstd,
  Orientationd, Spacingd, intensity scaling, sliding window (window batch 4), Invertd, AsDiscreted(argmax),
  SaveImaged;
* ``medseg`` (``--precision auto``, the default), ``medseg-fp32``, ``medseg-bf16``, ``medseg-fp16``:
  ``Segmenter.segment_files``, file in and file out, and its network part on the same input as ``monai``;
  a third part names the float32 backend: ``medseg-fp32-torch``, ``medseg-auto-torch`` (the default, ``auto``,
  is OpenVINO when installed). Each invocation uses a fresh cache folder that ``convert`` fills, so ``first_*``
  includes reading the converted network back (0.06 s), not converting it;
  ``medseg-preview``: the same with ``preview=True`` (the fast preview);
* ``model``: the model alone, weights plus one window batch through it: the "plus the model" of the memory target;
* with OpenVINO installed, on the CPU: ``convert`` first converts the network for OpenVINO into this invocation's
  cache (``conversion_seconds``, a one-time cost per model and machine), and ``model-openvino`` is the model as
  OpenVINO runs it (PyTorch weights, compiled network, one window batch). A variant whose float32 windows ran in
  OpenVINO holds both runtimes, so its budget's model is the larger of ``model`` and ``model-openvino``.

``peak_rss_MiB`` is the resident high-water mark above what the child held once torch, MONAI and MedSeg were
imported; for MedSeg it is that of the file-in, file-out runs alone (the high-water mark is reset after the network
part, whose own is ``network_part_peak_rss_MiB``). Each MedSeg variant's row is followed at once by its summary
(so a run cut short keeps what it measured): ``speedup_vs_monai`` (network part), ``end_to_end_speedup_vs_tutorial``,
``agreement`` (fraction of voxels with the same label: network part vs plain MONAI, and labelmap vs the tutorial
pipeline's), and the memory check ``peak_rss_MiB <= 4 x input float32 + model``.

``--model`` is the bundled model (or any installed model id); an untrained architecture by name (``unet``: the
4.8 M-parameter MONAI U-Net; ``segresnet``; ``dynunet``) with ``--classes``; or ``unet-ct``, the same U-Net fitted
to a real CT's liver by ``benchmarks/ct_model.py`` (a trained model's confident logits; an untrained network's
logits nearly tie in most voxels, so any change in arithmetic flips them and its agreements mostly measure ties).
Untrained models get a card with 1.5 x 1.5 x 2 mm spacing and CT intensity scaling (-57 to 164 HU), as in MONAI's
tutorials. ``--shape X Y Z`` is a synthetic CT-like volume (0.8 x 0.8 x 1.5 mm voxels), or, with ``--resample``
FILE, that real image resampled to X Y Z voxels over its own extent (``unet-ct`` uses the multi-organ CT); a single
``--shape FILE`` is an image file as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSegExtension"))

from memory import reset_peak, status_mib  # noqa: E402  (benchmarks/memory.py)

BASELINE = {"rss": 0.0}  #: the child's resident size once the libraries are imported

UNTRAINED = {
    "unet": ("UNet", {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2}),
    "segresnet": ("SegResNet", {"init_filters": 16}),
    "dynunet": (
        "DynUNet",
        {
            "kernel_size": [3, 3, 3, 3, 3],
            "strides": [1, 2, 2, 2, 2],
            "upsample_kernel_size": [2, 2, 2, 2],
            "norm_name": "instance",
        },
    ),
}


def synthetic_ct(shape, path: Path, spacing=(0.8, 0.8, 1.5)) -> Path:
    """A CT-like volume in HU: air, a body ellipse with fat and soft tissue, two lungs, a spine; seeded noise."""
    x, y, z = (np.linspace(-1, 1, n)[:, None, None] for n in shape)
    y, z = y.reshape(1, -1, 1), z.reshape(1, 1, -1)
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
    lungs = (((x - 0.35) / 0.25) ** 2 + (y / 0.35) ** 2 <= 1) | (((x + 0.35) / 0.25) ** 2 + (y / 0.35) ** 2 <= 1)
    spine = (x / 0.08) ** 2 + ((y + 0.45) / 0.08) ** 2 <= 1
    volume = np.full(shape, -1000.0)
    volume[np.broadcast_to(body, shape)] = 40.0
    volume[np.broadcast_to(lungs & body, shape)] = -800.0
    volume[np.broadcast_to(spine & np.ones_like(z, bool), shape)] = 700.0
    volume += np.random.default_rng(0).normal(0, 20, shape)
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0).astype(np.int16))
    image.SetSpacing(tuple(float(v) for v in spacing))
    sitk.WriteImage(image, str(path))
    return path


def resampled_file(source: Path, shape, path: Path) -> Path:
    """``source`` resampled (linear) to ``shape`` voxels over the same physical extent."""
    image = sitk.ReadImage(str(source))
    spacing = [n * s / m for n, s, m in zip(image.GetSize(), image.GetSpacing(), shape)]
    lowest = float(sitk.GetArrayViewFromImage(image).min())
    out = sitk.Resample(
        image,
        [int(v) for v in shape],
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        spacing,
        image.GetDirection(),
        lowest,
        image.GetPixelID(),
    )
    sitk.WriteImage(out, str(path))
    return path


def ct_card(model_id: str, name: str, description: str, labels: list, architecture: str, kwargs: dict, roi) -> dict:
    """A CT model card as MONAI's tutorials set CT up: 1.5 x 1.5 x 2 mm, -57 to 164 HU scaled to [0, 1]."""
    return {
        "format_version": 1,
        "id": model_id,
        "version": "0",
        "name": name,
        "description": description,
        "task": "segmentation",
        "modality": "CT",
        "licence": "Apache-2.0",
        "channels": [{"name": "CT", "modality": "CT"}],
        "labels": labels,
        "preprocessing": {
            "orientation": "RAS",
            "spacing": [1.5, 1.5, 2.0],
            "normalization": {"method": "range", "a_min": -57, "a_max": 164, "clip_percentiles": None},
            "crop": "none",
        },
        "network": {"architecture": architecture, "kwargs": kwargs},
        "inference": {"roi_size": list(roi), "overlap": 0.25, "blend_mode": "constant", "sw_batch_size": 2},
        "weights": {"file": "model.pt", "sha256": "0" * 64},
    }


def model_folder(name: str, classes: int, roi, work: Path) -> Path:
    """The bundled/installed model's folder, the fitted CT fixture, or an untrained architecture (seeded weights)."""
    from medseg.models.registry import find_model_folder

    if name == "unet-ct":
        from ct_model import fitted_folder

        return fitted_folder(log=lambda message: print(message, file=sys.stderr))
    if name not in UNTRAINED:
        return find_model_folder(name)
    import torch
    from medseg.models.architectures import build_network
    from medseg.models.card import card_from_dict
    from medseg.models.folder import sha256_of

    architecture, kwargs = UNTRAINED[name]
    card = ct_card(
        f"untrained-{name}",
        f"untrained {architecture}",
        "random weights, for speed measurements only",
        [{"value": v, "name": f"class {v}", "color": [255, 0, 0]} for v in range(1, classes)],
        architecture,
        kwargs,
        roi,
    )
    parsed = card_from_dict(card)
    torch.manual_seed(0)
    network = build_network(architecture, in_channels=1, out_channels=parsed.num_classes, kwargs=parsed.network.kwargs)
    folder = work / f"untrained-{name}"
    folder.mkdir(exist_ok=True)
    torch.save(network.state_dict(), folder / "model.pt")
    card["weights"]["sha256"] = sha256_of(folder / "model.pt")
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    return folder


def timed(function, repeats: int, *, with_first: bool = False):
    """The median seconds of ``repeats`` runs after a warm-up, and the last run's result; ``repeats=0``: the one
    warm-up run is the measurement (a large input measured for its memory)."""
    start = time.perf_counter()
    result = function()  # warm-up
    first = time.perf_counter() - start
    if repeats == 0:
        return (first, result, first) if with_first else (first, result)
    times, result = [], None  # the warm-up's result is not held while the first timed run allocates its own
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    if with_first:
        return float(np.median(times)), result, first
    return float(np.median(times)), result


def network_input(folder: Path, image_path: Path):
    from medseg import io
    from medseg.models.card import read_card
    from medseg.preprocessing import preprocess

    card = read_card(folder)
    volume, _ = preprocess([io.read_image(image_path)], card.preprocessing)
    return card, volume


def run_monai(folder: Path, image_path: Path, device: str, repeats: int, work: Path) -> dict:
    import torch
    from medseg.models.folder import load_model_folder
    from monai.inferers import sliding_window_inference

    card, volume = network_input(folder, image_path)
    network = load_model_folder(folder).network.to(device).eval()
    x = torch.from_numpy(volume[None]).to(device)

    def run():
        with torch.inference_mode():
            out = sliding_window_inference(x, card.inference.roi_size, 1, network, overlap=0.25)
            return out.argmax(1)[0].cpu().numpy().astype(np.uint8)

    seconds, labels = timed(run, repeats)
    np.save(work / "monai_network.npy", labels)
    return {"network_seconds": seconds, "end_to_end_seconds": None}


def run_medseg(
    folder: Path, image_path: Path, device: str, repeats: int, work: Path, variant: str, network_only: bool = False
) -> dict:
    from medseg.inference import InferenceOptions, InferenceReport, release_memory, sliding_window_labels
    from medseg.segmenter import Segmenter

    blend_features = not variant.endswith("-logits")  # medseg...-logits: blend the logits, as MONAI does
    kind, _, backend = variant.removesuffix("-logits").partition("-")[2].partition("-")  # medseg[-precision[-backend]]
    preview = kind == "preview"
    precision = "auto" if preview or not kind else kind
    options = InferenceOptions(precision=precision, backend=backend or "auto", blend_features=blend_features)
    segmenter = Segmenter(folder, device=device, inference=options)
    card, volume = network_input(folder, image_path)
    settings = card.inference
    if preview:  # what Segmenter.segment(preview=True) runs
        settings, options = dataclasses.replace(settings, overlap=0.0), segmenter._preview_options()
    held = {"volume": volume}
    del volume
    reports = []  # each run's: the warm-up's trial is not the timed runs' (a decisive refusal is remembered)

    def network_part():  # the labels on the network grid, as plain MONAI's argmax gives them
        reports.append(InferenceReport())
        return sliding_window_labels(
            segmenter.model.network,
            held["volume"],
            settings,
            device=segmenter.device,
            options=options,
            report=reports[-1],
        )

    network_seconds, labels, first_network = timed(network_part, repeats, with_first=True)
    first, report = reports[0], reports[-1]
    np.save(work / f"{variant}_network.npy", labels)
    held.clear()
    del labels
    gc.collect()
    release_memory()
    network_peak = status_mib("VmHWM")
    row = {
        "network_seconds": network_seconds,
        "first_network_seconds": first_network,
        "network_part_peak_rss_MiB": round(network_peak - BASELINE["rss"], 1),
        "precision": report.precision,
        "backend": report.backend,
        "window_batch": report.window_batch,
        "blended_channels": report.blended_channels,
        "windows": report.windows,
    }
    if report.calibration_disagreement is not None:
        row["trial_shape"] = list(report.trial_shape)
        row["trial_disagreement"] = report.calibration_disagreement
    if report.estimated_disagreement is not None:
        row["estimated_disagreement"] = report.estimated_disagreement
    if report.notes:
        row["notes"] = list(report.notes)
    if first.calibration_disagreement is not None and report.calibration_disagreement is None:  # the warm-up's
        row["first_trial_shape"] = list(first.trial_shape)
        row["first_trial_disagreement"] = first.calibration_disagreement
    if first.notes != report.notes:
        row["first_notes"] = list(first.notes)
    if network_only:
        return row
    reset_peak()  # peak_rss_MiB is the file-in, file-out run's own
    output = work / f"{variant}_seg.nii.gz"
    end_to_end, result, first_end_to_end = timed(
        lambda: segmenter.segment_files([image_path], output, preview=preview), repeats, with_first=True
    )
    np.save(work / f"{variant}_labels.npy", sitk.GetArrayFromImage(sitk.ReadImage(str(output))))
    row.update(
        end_to_end_seconds=end_to_end,
        first_end_to_end_seconds=first_end_to_end,
        stages={k: round(v, 3) for k, v in result.seconds.items()},
    )
    if result.inference.notes:
        row["end_to_end_notes"] = result.inference.notes
    return row


def run_model(folder: Path, image_path: Path, device: str, repeats: int, work: Path) -> dict:
    """The model's own memory: its weights and one window batch (MedSeg's default for the device) through it."""
    import torch
    from medseg.inference import CPU_WINDOW_BATCH
    from medseg.models.folder import load_model_folder

    loaded = load_model_folder(folder)  # once: two loads could count two sets of weights in the budget
    card, network = loaded.card, loaded.network.to(device).eval()
    del loaded
    x = torch.zeros((CPU_WINDOW_BATCH, len(card.channels), *card.inference.roi_size), device=device)
    with torch.inference_mode():
        network(x)
    parameters = sum(p.numel() * p.element_size() for p in network.parameters())
    return {"parameters_MiB": round(parameters / 2**20, 1), "window_batch": CPU_WINDOW_BATCH}


def run_model_openvino(folder: Path, image_path: Path, device: str, repeats: int, work: Path) -> dict:
    """The model as OpenVINO runs it: the PyTorch weights MedSeg keeps, the compiled network (read from the cache
    the ``convert`` step filled) and one window batch through it."""
    import torch
    from medseg.inference import CPU_WINDOW_BATCH

    compiled, shape = _openvino_model(folder)
    compiled(torch.zeros((CPU_WINDOW_BATCH, *shape)))
    return {"source": compiled.source, "window_batch": CPU_WINDOW_BATCH}


def run_convert(folder: Path, image_path: Path, device: str, repeats: int, work: Path) -> dict:
    """Convert the network for OpenVINO once and fill the invocation's cache: a one-time cost per model and
    machine, reported on its own (the MedSeg variants then read the converted network from the cache)."""
    start = time.perf_counter()
    compiled, _ = _openvino_model(folder)
    return {"conversion_seconds": round(time.perf_counter() - start, 2), "source": compiled.source}


def _openvino_model(folder: Path):
    """The model folder's network as OpenVINO runs it (converted, or read from the cache) and its input shape."""
    from medseg.backends import openvino_network
    from medseg.inference import window_parts
    from medseg.models.folder import load_model_folder

    loaded = load_model_folder(folder)
    shape = (len(loaded.card.channels), *loaded.card.inference.roi_size)
    body, head = window_parts(loaded.network, shape[0])
    return openvino_network(body, shape, head=head), shape


def run_tutorial(folder: Path, image_path: Path, device: str, repeats: int, work: Path) -> dict:
    import torch
    from medseg.models.card import read_card
    from medseg.models.folder import load_model_folder
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    card = read_card(folder)
    network = load_model_folder(folder).network.to(device).eval()
    prep = card.preprocessing
    if prep.normalization.method == "range":
        scale = ScaleIntensityRanged("image", prep.normalization.a_min, prep.normalization.a_max, 0.0, 1.0, clip=True)
    else:
        scale = NormalizeIntensityd("image")
    steps = [LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes=prep.orientation)]
    if prep.spacing is not None:
        steps.append(Spacingd("image", pixdim=prep.spacing, mode="bilinear"))
    pre = Compose([*steps, scale])
    post = Compose(
        [
            Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted("pred", argmax=True),
            SaveImaged(
                "pred",
                output_dir=str(work / "tutorial"),
                output_postfix="seg",
                resample=False,
                separate_folder=False,
                print_log=False,
            ),
        ]
    )
    network_times = []

    def run():
        data = pre({"image": str(image_path)})
        with torch.inference_mode():
            start = time.perf_counter()
            data["pred"] = sliding_window_inference(
                data["image"][None].to(device), card.inference.roi_size, 4, network, overlap=0.25
            )[0]
            network_times.append(time.perf_counter() - start)
        return post(data)

    end_to_end, _ = timed(run, repeats)
    saved = next((work / "tutorial").glob("*_seg.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(saved)))
    np.save(work / "tutorial_labels.npy", labels.reshape(labels.shape[-3:]) if labels.ndim > 3 else labels)
    return {"network_seconds": float(np.median(network_times[1:])), "end_to_end_seconds": end_to_end}


def child(args) -> None:
    import medseg.segmenter  # noqa: F401  (libraries load before the baseline: their memory is not the variant's)
    import monai.inferers  # noqa: F401
    import monai.transforms  # noqa: F401
    import torch

    try:
        import openvino  # noqa: F401  (a library too; the networks it compiles are counted)
    except ImportError:
        pass
    torch.manual_seed(0)
    work = Path(args.work)
    before = BASELINE["rss"] = status_mib("VmRSS")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if args.variant.startswith("medseg"):
        row = run_medseg(
            Path(args.folder), Path(args.image), args.device, args.repeats, work, args.variant, args.network_only
        )
    else:
        runner = {
            "monai": run_monai,
            "tutorial": run_tutorial,
            "model": run_model,
            "model-openvino": run_model_openvino,
            "convert": run_convert,
        }[args.variant]
        row = runner(Path(args.folder), Path(args.image), args.device, args.repeats, work)
    row = {"variant": args.variant, **row}
    if args.device.startswith("cuda"):
        row["peak_gpu_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    row["peak_rss_MiB"] = round(status_mib("VmHWM") - before, 1)
    print(json.dumps(row))


def agreement(a: Path, b: Path) -> float | None:
    if not (a.exists() and b.exists()):
        return None
    x, y = np.load(a), np.load(b)
    return round(float(np.mean(x == y)), 6) if x.shape == y.shape else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--model",
        default="unet",
        help="a model id, unet-ct (fitted CT fixture), or unet / segresnet / dynunet (untrained)",
    )
    parser.add_argument("--classes", type=int, default=2, help="classes of an untrained model, background included")
    parser.add_argument("--shape", nargs="+", default=["256", "256", "160"], help="X Y Z of a synthetic CT, or a file")
    parser.add_argument("--resample", metavar="FILE", help="with --shape X Y Z: this image resampled to that size")
    parser.add_argument("--roi", nargs=3, type=int, default=[96, 96, 96], help="window of an untrained model")
    parser.add_argument(
        "--spacing",
        nargs=3,
        type=float,
        default=[0.8, 0.8, 1.5],
        help="voxel size of the synthetic CT in mm (1.5 1.5 2: the untrained models' grid, so the network runs on the "
        "volume as it is, like the issue's table)",
    )
    parser.add_argument(
        "--network-only", action="store_true", help="MedSeg variants time the network part only (no file in, file out)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up; 0: the warm-up alone")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["monai", "tutorial", "model", "medseg", "medseg-fp32", "medseg-bf16"],
        help="monai, tutorial, model, medseg (auto precision), medseg-fp32, medseg-bf16, medseg-fp16, medseg-preview; "
        "a MedSeg variant with a backend suffix (medseg-fp32-torch, medseg-auto-torch) forces that backend; "
        "one ending in -logits (medseg-fp32-torch-logits) blends the logits where MedSeg would blend the features "
        "before a pointwise head (a many-class DynUNet)",
    )
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "FOLDER", "IMAGE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.variant, args.folder, args.image, args.work = args.child
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="medseg-inference-") as folder:
        work = Path(folder)
        source = Path(args.resample) if args.resample else None
        if source is None and args.model == "unet-ct" and len(args.shape) == 3:
            from ct_model import DATA

            source = DATA / "example_ct.nii.gz"
        if len(args.shape) == 1:
            image = Path(args.shape[0])
        elif source is not None:
            image = resampled_file(source, tuple(map(int, args.shape)), work / "input.nii.gz")
        else:
            image = synthetic_ct(tuple(map(int, args.shape)), work / "ct.nii", args.spacing)  # uncompressed: quick
        model = model_folder(args.model, args.classes, args.roi, work)
        size = sitk.ReadImage(str(image)).GetSize()
        input_mib = float(np.prod(size)) * 4 / 2**20
        print(
            json.dumps(
                {
                    "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "device": args.device,
                    "model": args.model,
                    "input": list(size),
                    "input_file": str(source or image) if source or len(args.shape) == 1 else "synthetic CT",
                    "input_float32_MiB": round(input_mib, 1),
                    "repeats": args.repeats,
                }
            )
        )
        rows = {}
        variants = list(args.variants)
        if (
            args.device == "cpu"
            and importlib.util.find_spec("openvino")
            and any(v.startswith("medseg") and not v.endswith("-torch") for v in variants)
        ):  # MedSeg's float32 windows may run in OpenVINO: convert once, and measure that model's memory too
            variants.insert(0, "convert")
            if "model" in variants:
                variants.insert(variants.index("model") + 1, "model-openvino")
        for variant in variants:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--device",
                    args.device,
                    "--repeats",
                    str(args.repeats),
                    *(["--network-only"] if args.network_only else []),
                    "--child",
                    variant,
                    str(model),
                    str(image),
                    str(work),
                ],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "MEDSEG_CACHE_DIR": str(work / "cache")},  # conversions start afresh
            )
            if done.returncode != 0:
                print(json.dumps({"variant": variant, "error": done.stderr.strip().splitlines()[-1:]}))
                continue
            rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(rows[variant]), flush=True)
            if variant.startswith("medseg"):  # at once, so a run cut short keeps the ratios of what it measured
                print(json.dumps(summary(variant, rows, work, input_mib)), flush=True)


def summary(variant: str, rows: dict, work: Path, input_mib: float) -> dict:
    """Ratios and agreements of one MedSeg variant against the baselines, and the memory check."""
    row = rows[variant]
    out = {
        "summary": variant,
        "agreement": agreement(work / f"{variant}_network.npy", work / "monai_network.npy"),
        "agreement_labelmap_vs_tutorial": agreement(work / f"{variant}_labels.npy", work / "tutorial_labels.npy"),
    }
    if "monai" in rows:
        out["speedup_vs_monai"] = round(rows["monai"]["network_seconds"] / row["network_seconds"], 2)
        out["first_run_speedup_vs_monai"] = round(rows["monai"]["network_seconds"] / row["first_network_seconds"], 2)
    if "tutorial" in rows and row.get("end_to_end_seconds"):
        out["end_to_end_speedup_vs_tutorial"] = round(
            rows["tutorial"]["end_to_end_seconds"] / row["end_to_end_seconds"], 2
        )
    if variant != "medseg" and "medseg" in rows:
        out["agreement_labelmap_vs_medseg"] = agreement(work / f"{variant}_labels.npy", work / "medseg_labels.npy")
    models = [m for m in ("model", "model-openvino") if m in rows]
    if row.get("backend") != "openvino":
        models = models[:1] if models and models[0] == "model" else []
    if models:  # the model as this variant ran it; with OpenVINO the process holds both runtimes' (the larger)
        model = max(models, key=lambda m: rows[m]["peak_rss_MiB"])
        budget = 4 * input_mib + rows[model]["peak_rss_MiB"]
        out["memory_budget_model"] = model
        out["memory_budget_MiB"] = round(budget, 1)
        out["memory_within_budget"] = row["peak_rss_MiB"] <= budget
    return out


if __name__ == "__main__":
    main()
