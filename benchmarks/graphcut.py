"""Graph-cut refinement: narrow band against the full-volume cut (and Slicer's GrowCut) on a real CT.

python benchmarks/graphcut.py [--data ../shared/data] [--cases lesion body] [--no-growcut]

Two structures of ``ct_lung/lung2_image.nrrd`` (512 x 512 x 61, 0.63 x 0.63 x 5 mm): the lesion of
``lung2_label.nrrd``, and the body (voxels above -500 HU, largest connected component, holes filled slice by
slice). For each, a noisy probability map is made from the mask: ``p = 1 / (1 + exp(d / 1.5))`` from the signed
distance ``d`` to its boundary in voxels, plus Gaussian noise (sd 0.25, seed 0) within 6 voxels of the boundary,
clipped to [1e-4, 1 - 1e-4]. It is refined by (a) the full-volume cut and (b) the narrow-band cut with the same
unary and pairwise terms, and for the lesion also by (c) Slicer's GrowCut from seeds eroded from and around the
mask, and (d) one added stroke re-solved in the band session.

Each method runs in its own child process, a warm-up and then several timed runs (the median is reported; the
full cut twice and GrowCut once after the warm-up), so that ``peak_MiB`` (resident memory above what the process held
before the method started) is the method's own. One JSON object per case and method, then one per case with the
ratios. ``agreement_with_full`` is the Dice overlap of a method's mask with the full cut's.
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
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSegExtension"))

from medseg.graphcut import RefinementSession, refine_full_volume  # noqa: E402
from medseg.metrics import overlap_metrics  # noqa: E402
from memory import status_mib  # noqa: E402  (benchmarks/memory.py)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return overlap_metrics(a, b)[0]


def body_mask(image: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(image > -500)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body


def noisy_probability(mask: np.ndarray) -> np.ndarray:
    distance = ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)  # voxels, + outside
    probability = 1.0 / (1.0 + np.exp(distance / 1.5))
    near = np.abs(distance) <= 6
    rng = np.random.default_rng(0)
    probability[near] += rng.normal(0.0, 0.25, int(near.sum()))
    return np.clip(probability, 1e-4, 1 - 1e-4).astype(np.float32)


def prepare(data: Path, work: Path) -> dict[str, dict]:
    image_sitk = sitk.ReadImage(str(data / "ct_lung" / "lung2_image.nrrd"))
    image = sitk.GetArrayFromImage(image_sitk).astype(np.float32)
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "ct_lung" / "lung2_label.nrrd"))) > 0
    np.save(work / "image.npy", image)
    cases = {}
    for name, mask in (("lesion", lesion), ("body", body_mask(image))):
        np.save(work / f"{name}_mask.npy", mask)
        np.save(work / f"{name}_probability.npy", noisy_probability(mask))
        cases[name] = {"voxels": int(mask.sum()), "fraction": float(mask.mean())}
    cases["spacing"] = image_sitk.GetSpacing()
    return cases


def stroke_for(result: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """A small stroke where the band result is most wrong: a 3x3 patch in the slice with the most errors."""
    missed, extra = mask & ~result, result & ~mask
    wrong, foreground = (missed, True) if missed.sum() >= extra.sum() else (extra, False)
    k = int(np.argmax(wrong.sum(axis=(1, 2))))
    y, x = np.argwhere(wrong[k])[len(np.argwhere(wrong[k])) // 2]
    stroke = np.zeros_like(mask)
    stroke[k, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] = True
    return stroke & (mask if foreground else ~mask), foreground


def run_method(work: Path, case: str, method: str, spacing, repeats: int) -> dict:
    """Run one method ``repeats`` times after a warm-up (the full cut once more only); report the median."""
    image = np.load(work / "image.npy")
    probability = np.load(work / f"{case}_probability.npy")
    mask = np.load(work / f"{case}_mask.npy")
    before = status_mib("VmRSS")
    times, extra = [], {}
    runs = {"full": 3, "growcut": 2}.get(method, repeats + 1)
    for _ in range(runs):
        start = time.perf_counter()
        if method == "full":
            result = refine_full_volume(image, probability, spacing=spacing)
        elif method == "band":
            session = RefinementSession(image, probability, spacing=spacing)
            result = session.refine()
            extra.update(session.graph_size)
        elif method == "band+stroke":
            session = RefinementSession(image, probability, spacing=spacing)
            first = session.refine()
            stroke, foreground = stroke_for(first, mask)
            start = time.perf_counter()  # only the second refinement is timed
            result = session.refine(stroke if foreground else None, None if foreground else stroke)
            extra.update(stroke_voxels=int(stroke.sum()), stroke="foreground" if foreground else "background")
            extra["reused_search_trees"] = session.rebuilds == 1
        elif method == "growcut":
            result = growcut(image, mask)
        else:
            raise SystemExit(f"unknown method {method}")
        times.append(time.perf_counter() - start)
    np.save(work / f"{case}_{method}_result.npy", result)
    measured = times[1:]  # the first run is the warm-up
    return {
        "seconds": round(float(np.median(measured)), 4),
        "runs": len(measured),
        "peak_MiB": round(status_mib("VmHWM") - before, 1),
        **extra,
    }


def growcut(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Slicer's GrowCut from seeds: the mask eroded by 2 voxels in-plane, and a shell 3 to 5 voxels around it.

    The shell also caps the slices just above and below the mask, so the foreground cannot leak along z.
    """
    import slicer
    from vtk.util import numpy_support

    in_plane = np.zeros((1, 3, 3), bool)
    in_plane[0] = True
    foreground = ndimage.binary_erosion(mask, in_plane, iterations=2)
    near = ndimage.binary_dilation(mask, in_plane, iterations=3)
    far = ndimage.binary_dilation(mask, in_plane, iterations=5)
    along_z = np.zeros((3, 1, 1), bool)
    along_z[:, 0, 0] = True
    ring = ndimage.binary_dilation(far, along_z) & ~near
    seeds = np.zeros(mask.shape, np.int16)
    seeds[foreground], seeds[ring] = 1, 2

    def vtk_image(array: np.ndarray):
        import vtk

        data = vtk.vtkImageData()
        data.SetDimensions(array.shape[::-1])
        data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
        return data

    segmenter = slicer.vtkImageGrowCutSegment()
    segmenter.SetIntensityVolume(vtk_image(image.astype(np.int16)))
    segmenter.SetSeedLabelVolume(vtk_image(seeds))
    segmenter.Update()
    output = numpy_support.vtk_to_numpy(segmenter.GetOutput().GetPointData().GetScalars()).reshape(mask.shape)
    return output == 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--cases", nargs="+", default=["lesion", "body"], choices=["lesion", "body"])
    parser.add_argument("--no-growcut", action="store_true", help="skip GrowCut (about 40 s per run)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the band methods (median)")
    parser.add_argument("--run-method", nargs=4, metavar=("WORKDIR", "CASE", "METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_method:
        work, case, method, repeats = args.run_method
        spacing = json.loads((Path(work) / "spacing.json").read_text(encoding="utf-8"))
        print(json.dumps(run_method(Path(work), case, method, spacing, int(repeats))))
        return
    with tempfile.TemporaryDirectory(prefix="medseg-graphcut-") as folder:
        work = Path(folder)
        info = prepare(args.data, work)
        (work / "spacing.json").write_text(json.dumps(info["spacing"]), encoding="utf-8")
        print(
            json.dumps(
                {
                    "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "image": "lung2_image.nrrd 512x512x61",
                    "spacing_mm": info["spacing"],
                }
            )
        )
        for case in args.cases:
            methods = ["full", "band"] + (["band+stroke"] if case == "lesion" else [])
            methods += ["growcut"] if case == "lesion" and not args.no_growcut else []
            mask = np.load(work / f"{case}_mask.npy")
            thresholded = np.load(work / f"{case}_probability.npy") >= 0.5
            rows = {}
            for method in methods:
                done = subprocess.run(
                    [sys.executable, __file__, "--run-method", str(work), case, method, str(args.repeats)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = json.loads(done.stdout.strip().splitlines()[-1])
                result = np.load(work / f"{case}_{method}_result.npy")
                full = np.load(work / f"{case}_full_result.npy")
                rows[method] = {
                    "case": case,
                    "method": method,
                    **row,
                    "dice": round(float(dice(result, mask)), 5),
                    "dice_input": round(float(dice(thresholded, mask)), 5),
                    "agreement_with_full": round(float(dice(result, full)), 6),
                    "voxels_differing_from_full": int(np.count_nonzero(result != full)),
                }
                print(json.dumps(rows[method]), flush=True)
            summary = {
                "case": case,
                "structure_voxels": info[case]["voxels"],
                "speedup_vs_full": round(rows["full"]["seconds"] / rows["band"]["seconds"], 1),
                "dice_gap_vs_full": round(rows["full"]["dice"] - rows["band"]["dice"], 5),
                "memory_ratio_vs_full": round(rows["band"]["peak_MiB"] / max(rows["full"]["peak_MiB"], 1e-9), 3),
            }
            if "band+stroke" in rows:
                summary["second_refinement_seconds"] = rows["band+stroke"]["seconds"]
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
