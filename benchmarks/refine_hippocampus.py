"""Dice before and after graph-cut refinement: the bundled model on its held-out hippocampus cases.

python benchmarks/refine_hippocampus.py [--data ../shared/data/msd_hippocampus] [--smoothness 1.0]

For every validation case of the bundled model's card, the engine segments the image and keeps the per-class
probabilities; the labelmap is then refined with :func:`medseg.graphcut.refine_labelmap` and default settings
(unless options are given). Prints one JSON object per case, then the per-label mean and worst Dice before
and after, and the time the refinement took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSegExtension"))

from medseg.graphcut import GraphCutOptions, refine_labelmap  # noqa: E402
from medseg.metrics import overlap_metrics  # noqa: E402
from medseg.segmenter import Segmenter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_data = Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data")) / "msd_hippocampus"
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--smoothness", type=float, default=GraphCutOptions().smoothness)
    parser.add_argument("--band-mm", type=float, default=GraphCutOptions().band_mm)
    args = parser.parse_args()
    options = GraphCutOptions(smoothness=args.smoothness, band_mm=args.band_mm)
    segmenter = Segmenter(None, device="cpu")
    labels = {label.value: label.name for label in segmenter.card.labels}
    scores = {when: {v: [] for v in labels} for when in ("before", "after")}
    seconds = []
    for case in segmenter.card.training["split"]["validation"]:
        image = sitk.ReadImage(str(args.data / "imagesTr" / f"{case}.nii.gz"))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(args.data / "labelsTr" / f"{case}.nii.gz")))
        result = segmenter.segment(image, with_probabilities=True)
        probabilities = np.moveaxis(sitk.GetArrayFromImage(result.probabilities), -1, 0)
        before = sitk.GetArrayFromImage(result.labelmap)
        start = time.perf_counter()
        after = refine_labelmap(
            sitk.GetArrayViewFromImage(image),
            probabilities,
            spacing=image.GetSpacing(),
            labels=list(labels),
            options=options,
        )
        seconds.append(time.perf_counter() - start)
        row = {"case": case}
        for when, labelmap in (("before", before), ("after", after)):
            for value, name in labels.items():
                dice = overlap_metrics(labelmap == value, reference == value)[0]
                scores[when][value].append(dice)
                row[f"{when}_{name}"] = round(dice, 4)
        print(json.dumps(row), flush=True)
    summary = {
        "cases": len(seconds),
        "options": vars(options),
        "refine_seconds_median": round(float(np.median(seconds)), 4),
    }
    for value, name in labels.items():
        for when in ("before", "after"):
            summary[f"{name} {when} mean"] = round(float(np.mean(scores[when][value])), 4)
            summary[f"{name} {when} worst"] = round(float(np.min(scores[when][value])), 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
