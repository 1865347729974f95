"""Reading and writing compressed volumes: MedSeg's ``medseg.io`` against ITK's own reader and writer.

    python benchmarks/nifti_io.py [--shape 512 512 320] [--repeats 3]

``benchmarks/inference.py``'s synthetic CT (int16) is written as ``.nii.gz``; then, in one process, medians of
``--repeats``:

- ``read``: ITK's ``ReadImage`` followed by the complete-file check the engine needs with it (ITK zero-fills a
  truncated ``.nii.gz`` and returns garbage for a corrupt one), inflated with Python's gzip (the engine before
  ``medseg.gzipio``), against ``medseg.io.read_image`` (one checked inflation);
- ``write``: ITK's compressed ``WriteImage`` against ``medseg.io.write_image``, for noisy labels (what an untrained
  network gives), smooth labels (what a trained one gives) and two-class float32 probabilities as ``.nrrd``.

One JSON object per case, with the sizes, both times, ``speedup`` and the compressed sizes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSegExtension"))
from inference import synthetic_ct  # noqa: E402  (benchmarks/inference.py: the CT its runs use)
from medseg import gzipio, io  # noqa: E402


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def itk_read_and_check(path: Path) -> sitk.Image:
    image = sitk.ReadImage(str(path))
    with gzip.open(path, "rb") as handle:  # the engine's check before medseg.gzipio
        while handle.read(1 << 22):
            pass
    return image


def volumes(ct_path: Path, shape_xyz: tuple[int, int, int], rng) -> dict[str, sitk.Image]:
    """``benchmarks/inference.py``'s synthetic CT, written to ``ct_path`` as ``.nii.gz``, and three outputs on its
    grid: noisy labels (an untrained network's), smooth labels and two-class probabilities (a trained one's)."""
    synthetic_ct(shape_xyz, ct_path)
    ct = sitk.ReadImage(str(ct_path))
    hu = sitk.GetArrayViewFromImage(ct)
    body = 1 / (1 + np.exp(-(hu.astype(np.float32) + 500) / 50))  # smooth, with the CT's noise in its low bits
    images = {
        "ct": ct,
        "noisy labels": sitk.GetImageFromArray((rng.random(hu.shape) < 0.5).astype(np.uint8)),
        "smooth labels": sitk.GetImageFromArray((hu > -500).astype(np.uint8) + (hu > 400).astype(np.uint8)),
        "probabilities": sitk.GetImageFromArray(np.stack([1 - body, body], -1), isVector=True),
    }
    for image in images.values():
        image.CopyInformation(ct)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=3, type=int, default=[512, 512, 320], metavar=("X", "Y", "Z"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "cpus": gzipio.usable_cores(),
                "gzip": gzipio.backend(),
                "shape": args.shape,
                "repeats": args.repeats,
            }
        ),
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="medseg-io-") as folder:
        work = Path(folder)
        ct = work / "ct.nii.gz"
        images = volumes(ct, tuple(args.shape), np.random.default_rng(0))
        itk = median_seconds(lambda: itk_read_and_check(ct), args.repeats)
        medseg = median_seconds(lambda: io.read_image(ct), args.repeats)
        back = io.read_image(ct)  # a view of a temporary image would point at freed memory
        assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(images["ct"]))
        report("read", "ct", ".nii.gz", images["ct"], itk, medseg, ct.stat().st_size, ct.stat().st_size)
        for name, suffix in (("noisy labels", ".nii.gz"), ("smooth labels", ".nii.gz"), ("probabilities", ".nrrd")):
            image = images[name]
            theirs, ours = work / f"itk{suffix}", work / f"medseg{suffix}"
            itk = median_seconds(partial(sitk.WriteImage, image, str(theirs), useCompression=True), args.repeats)
            medseg = median_seconds(partial(io.write_image, image, ours), args.repeats)
            back = io.read_any_image(ours)
            assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)), name
            report("write", name, suffix, image, itk, medseg, theirs.stat().st_size, ours.stat().st_size)
            for path in (theirs, ours):
                os.unlink(path)


def report(what, name, suffix, image, itk, medseg, itk_bytes, medseg_bytes) -> None:
    array = sitk.GetArrayViewFromImage(image)
    print(
        json.dumps(
            {
                "case": f"{what} {name} {suffix}",
                "voxels": list(image.GetSize()),
                "uncompressed_MB": round(array.nbytes / 1e6, 3),
                "itk_seconds": float(f"{itk:.4g}"),  # 4 significant digits: a small volume's times are not 0
                "medseg_seconds": float(f"{medseg:.4g}"),
                "speedup": round(itk / medseg, 2),
                "itk_MB": round(itk_bytes / 1e6, 3),
                "medseg_MB": round(medseg_bytes / 1e6, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
