"""Accuracy, time and memory of the bundled model on its validation cases, from files, on one device.

    python benchmarks/bundled_model.py [--device cpu|cuda] [--data ../shared/data/msd_hippocampus]

Prints one JSON object per case and a summary with: mean and worst Dice per label, median seconds per case end
to end (read, preprocess, infer, postprocess, write) and for the network alone, the same network run through
plain MONAI ``sliding_window_inference`` (fp32, window batch 1, overlap 0.25) on the same arrays as a baseline,
and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from medseg import io
from medseg.inference import sliding_window_probabilities
from medseg.metrics import evaluate_images
from medseg.preprocessing import preprocess
from medseg.segmenter import Segmenter

REPO = Path(__file__).resolve().parents[1]


def machine_description(device: torch.device) -> str:
    text = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    return text + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else "")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--compare-cpu",
        action="store_true",
        help="also segment on the CPU and report the fraction of voxels with the same label",
    )
    parser.add_argument(
        "--data",
        default=os.environ.get("MEDSEG_SHARED_DATA", str(REPO.parent / "shared" / "data")) + "/msd_hippocampus",
    )
    args = parser.parse_args()
    from monai.inferers import sliding_window_inference

    segmenter = Segmenter(None, device=args.device)
    cpu_segmenter = Segmenter(None, device="cpu") if args.compare_cpu else None
    card = segmenter.card
    cases = card.training["split"]["validation"]
    names = {label.value: label.name for label in card.labels}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            image_path = Path(args.data) / "imagesTr" / f"{case}.nii.gz"
            label_path = Path(args.data) / "labelsTr" / f"{case}.nii.gz"
            out = Path(tmp) / f"{case}.nii.gz"
            start = time.perf_counter()
            segmenter.segment_files([image_path], out)
            end_to_end = time.perf_counter() - start
            reference = sitk.Cast(sitk.ReadImage(str(label_path)), sitk.sitkUInt8)
            metrics = evaluate_images(sitk.ReadImage(str(out)), reference, list(names))
            # Baseline on the same preprocessed array: plain MONAI, fp32, window batch 1, overlap 0.25.
            volume, _ = preprocess([io.read_image(image_path)], card.preprocessing)
            x = torch.from_numpy(volume)[None].to(segmenter.device)
            with torch.inference_mode():
                if segmenter.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                sliding_window_inference(x, card.inference.roi_size, 1, segmenter.model.network, overlap=0.25)
                if segmenter.device.type == "cuda":
                    torch.cuda.synchronize()
                monai_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                sliding_window_probabilities(segmenter.model.network, volume, card.inference, device=segmenter.device)
                if segmenter.device.type == "cuda":
                    torch.cuda.synchronize()
                network_seconds = time.perf_counter() - t0
            row = {
                "case": case,
                "size": list(sitk.ReadImage(str(image_path)).GetSize()),
                "dice": {names[v]: round(m.dice, 4) for v, m in metrics.items()},
                "hd95_mm": {names[v]: round(m.hd95, 2) for v, m in metrics.items()},
                "end_to_end_seconds": round(end_to_end, 4),
                "network_seconds": round(network_seconds, 4),
                "monai_baseline_seconds": round(monai_seconds, 4),
            }
            if cpu_segmenter is not None:
                on_cpu = cpu_segmenter.segment(io.read_image(image_path)).labelmap
                same = sitk.GetArrayFromImage(on_cpu) == sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
                row["agreement_with_cpu"] = round(float(same.mean()), 6)
            rows.append(row)
            if i < 3 or "--all" in sys.argv:
                print(json.dumps(row))
    summary = {
        "summary": "bundled model on its validation cases",
        "model": f"{card.id} {card.version}",
        "cases": len(rows),
        "device": str(segmenter.device),
        "machine": machine_description(segmenter.device),
        "dice_mean": {n: round(float(np.mean([r["dice"][n] for r in rows])), 4) for n in names.values()},
        "dice_worst": {n: round(float(np.min([r["dice"][n] for r in rows])), 4) for n in names.values()},
        "card_dice_mean": card.training.get("validation", {}).get("mean"),
        "median_end_to_end_seconds": round(float(np.median([r["end_to_end_seconds"] for r in rows])), 4),
        "median_network_seconds": round(float(np.median([r["network_seconds"] for r in rows])), 4),
        "median_monai_baseline_seconds": round(float(np.median([r["monai_baseline_seconds"] for r in rows])), 4),
        "peak_rss_MiB": round(peak_rss_mib(), 1),
    }
    if cpu_segmenter is not None:
        summary["min_agreement_with_cpu"] = min(r["agreement_with_cpu"] for r in rows)
    summary["network_speed_ratio_vs_monai_baseline"] = round(
        summary["median_monai_baseline_seconds"] / summary["median_network_seconds"], 2
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
