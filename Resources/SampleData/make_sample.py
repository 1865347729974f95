"""Make the bundled demo sample: a crop of the MNI ICBM152 2009a T1 template around the left hippocampus.

The template ships inside the ``nilearn`` wheel (``nilearn/datasets/data/
mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``). Run from the repository root:

    pip download --no-deps nilearn==0.14.1 -d /tmp/nilearn-wheel
    python Resources/SampleData/make_sample.py /tmp/nilearn-wheel/nilearn-0.14.1-py3-none-any.whl

The crop is 36 x 52 x 36 voxels at 1 mm, like the MSD Task04 crops the bundled model was trained on, centred on
MNI (x, y, z) = (-27, -23, -12) mm (RAS), the centre of the left hippocampus. Voxels are kept as they are
(8-bit, geometry of the template), so the crop's physical coordinates are still MNI coordinates.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import SimpleITK as sitk

TEMPLATE_IN_WHEEL = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
CENTRE_RAS_MM = (-27.0, -23.0, -12.0)
SIZE = (36, 52, 36)
OUTPUT = Path(__file__).with_name("hippocampus-mni152-t1.nii.gz")


def read_template(source: Path) -> sitk.Image:
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = wheel.read(TEMPLATE_IN_WHEEL)
        tmp = Path("/tmp") / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
        tmp.write_bytes(io.BytesIO(data).getvalue())
        source = tmp
    return sitk.ReadImage(str(source))


def crop_around(image: sitk.Image, centre_ras: tuple[float, float, float], size: tuple[int, int, int]) -> sitk.Image:
    centre_lps = (-centre_ras[0], -centre_ras[1], centre_ras[2])
    centre_index = image.TransformPhysicalPointToIndex(centre_lps)
    start = [int(c - s // 2) for c, s in zip(centre_index, size)]
    return sitk.RegionOfInterest(image, list(size), start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the nilearn wheel, or the template .nii.gz itself")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    sample = crop_around(read_template(args.source), CENTRE_RAS_MM, SIZE)
    sitk.WriteImage(sample, str(args.output), useCompression=True)
    print(f"wrote {args.output}: size {sample.GetSize()}, origin {sample.GetOrigin()}")


if __name__ == "__main__":
    main()
