"""Inference speed and memory: MedSeg against plain MONAI and a MONAI tutorial-style pipeline, one input, one model.

python benchmarks/inference.py --device cpu --model unet --classes 2 --shape 256 256 160
python benchmarks/inference.py --device cpu --model hippocampus-mri --shape path/to/image.nii.gz

The tutorial-style baseline reads NIfTI with nibabel, as MONAI does by default (``pip install -e .[bench]``).

Variants, each in its own child process (so ``peak_rss_MiB`` / ``peak_gpu_MiB`` is its own), timed as the median of
``--repeats`` runs after a warm-up:

* ``monai``: plain ``sliding_window_inference(x, roi, 1, net, overlap=0.25)`` in float32 on MedSeg's network input
  (the network part only);
* ``tutorial``: a MONAI tutorial-style pipeline, file in and file out: LoadImaged, EnsureChannelFirstd,
  Orientationd, Spacingd, intensity scaling, sliding window (window batch 4), Invertd, AsDiscreted(argmax),
  SaveImaged;
* ``medseg``: ``Segmenter.segment_files``, file in and file out, and its network part on the same input as ``monai``.

``peak_rss_MiB`` is the resident high-water mark above what the child held once torch, MONAI and MedSeg were
imported. For an untrained network the agreements mostly measure near-ties: its two logits are almost equal in
many voxels, so any change in arithmetic (blending probabilities instead of logits, another resampler) flips them.

``--model`` is the bundled model (or any installed model id), or an untrained architecture by name (``unet``: the
4.8 M-parameter MONAI U-Net; ``segresnet``; ``dynunet``) with ``--classes``; an untrained one gets a model card with
1.5 x 1.5 x 2 mm spacing and CT intensity scaling (-57 to 164 HU), as in MONAI's tutorials. ``--shape`` is a
synthetic CT-like volume (0.8 x 0.8 x 1.5 mm voxels) or an image file. One JSON object per variant, then one with
``speedup_vs_monai`` (network part), ``end_to_end_speedup_vs_tutorial`` and the agreements (fraction of voxels
with the same label) of MedSeg's network output with plain MONAI's and of its labelmap with the tutorial's.
"""

from __future__ import annotations

import argparse
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

from memory import status_mib  # noqa: E402  (benchmarks/memory.py)

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


def synthetic_ct(shape, path: Path) -> Path:
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
    image.SetSpacing((0.8, 0.8, 1.5))
    sitk.WriteImage(image, str(path))
    return path


def model_folder(name: str, classes: int, roi, work: Path) -> Path:
    """The bundled/installed model's folder, or a folder for an untrained architecture (seeded weights)."""
    from medseg.models.registry import find_model_folder

    if name not in UNTRAINED:
        return find_model_folder(name)
    import torch
    from medseg.models.architectures import build_network
    from medseg.models.card import card_from_dict
    from medseg.models.folder import sha256_of

    architecture, kwargs = UNTRAINED[name]
    card = {
        "format_version": 1,
        "id": f"untrained-{name}",
        "version": "0",
        "name": f"untrained {architecture}",
        "description": "random weights, for speed measurements only",
        "task": "segmentation",
        "modality": "CT",
        "licence": "Apache-2.0",
        "channels": [{"name": "CT", "modality": "CT"}],
        "labels": [{"value": v, "name": f"class {v}", "color": [255, 0, 0]} for v in range(1, classes)],
        "preprocessing": {
            "orientation": "RAS",
            "spacing": [1.5, 1.5, 2.0],
            "normalization": {"method": "range", "a_min": -57, "a_max": 164, "clip_percentiles": None},
            "crop": "none",
        },
        "network": {"architecture": architecture, "kwargs": kwargs},
        "inference": {"roi_size": list(roi), "overlap": 0.25, "blend_mode": "constant", "sw_batch_size": 4},
        "weights": {"file": "model.pt", "sha256": "0" * 64},
    }
    parsed = card_from_dict(card)
    torch.manual_seed(0)
    network = build_network(architecture, in_channels=1, out_channels=parsed.num_classes, kwargs=parsed.network.kwargs)
    folder = work / f"untrained-{name}"
    folder.mkdir(exist_ok=True)
    torch.save(network.state_dict(), folder / "model.pt")
    card["weights"]["sha256"] = sha256_of(folder / "model.pt")
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    return folder


def timed(function, repeats: int):
    function()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
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


def run_medseg(folder: Path, image_path: Path, device: str, repeats: int, work: Path) -> dict:
    from medseg.inference import sliding_window_probabilities
    from medseg.segmenter import Segmenter

    segmenter = Segmenter(folder, device=device)
    card, volume = network_input(folder, image_path)

    def network_part():
        probabilities = sliding_window_probabilities(
            segmenter.model.network, volume, card.inference, device=segmenter.device
        )
        return np.argmax(probabilities, axis=0).astype(np.uint8)

    network_seconds, labels = timed(network_part, repeats)
    np.save(work / "medseg_network.npy", labels)
    output = work / "medseg_seg.nii.gz"
    end_to_end, _ = timed(lambda: segmenter.segment_files([image_path], output), repeats)
    np.save(work / "medseg_labels.npy", sitk.GetArrayFromImage(sitk.ReadImage(str(output))))
    return {"network_seconds": network_seconds, "end_to_end_seconds": end_to_end}


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

    torch.manual_seed(0)
    work = Path(args.work)
    before = status_mib("VmRSS")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runner = {"monai": run_monai, "medseg": run_medseg, "tutorial": run_tutorial}[args.variant]
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
    parser.add_argument("--model", default="unet", help="a model id, or unet / segresnet / dynunet (untrained)")
    parser.add_argument("--classes", type=int, default=2, help="classes of an untrained model, background included")
    parser.add_argument("--shape", nargs="+", default=["256", "256", "160"], help="X Y Z of a synthetic CT, or a file")
    parser.add_argument("--roi", nargs=3, type=int, default=[96, 96, 96], help="window of an untrained model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["monai", "tutorial", "medseg"])
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "FOLDER", "IMAGE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.variant, args.folder, args.image, args.work = args.child
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="medseg-inference-") as folder:
        work = Path(folder)
        image = (
            Path(args.shape[0])
            if len(args.shape) == 1
            else synthetic_ct(tuple(map(int, args.shape)), work / "ct.nii.gz")
        )
        model = model_folder(args.model, args.classes, args.roi, work)
        size = sitk.ReadImage(str(image)).GetSize()
        print(
            json.dumps(
                {
                    "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "device": args.device,
                    "model": args.model,
                    "input": list(size),
                    "repeats": args.repeats,
                }
            )
        )
        rows = {}
        for variant in args.variants:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--device",
                    args.device,
                    "--repeats",
                    str(args.repeats),
                    "--child",
                    variant,
                    str(model),
                    str(image),
                    str(work),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                print(json.dumps({"variant": variant, "error": done.stderr.strip().splitlines()[-1:]}))
                continue
            rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(rows[variant]), flush=True)
        summary = {
            "agreement_network_vs_monai": agreement(work / "medseg_network.npy", work / "monai_network.npy"),
            "agreement_labelmap_vs_tutorial": agreement(work / "medseg_labels.npy", work / "tutorial_labels.npy"),
        }
        if "monai" in rows and "medseg" in rows:
            summary["speedup_vs_monai"] = round(rows["monai"]["network_seconds"] / rows["medseg"]["network_seconds"], 2)
        if "tutorial" in rows and "medseg" in rows:
            summary["end_to_end_speedup_vs_tutorial"] = round(
                rows["tutorial"]["end_to_end_seconds"] / rows["medseg"]["end_to_end_seconds"], 2
            )
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
