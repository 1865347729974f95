"""Render the 128x128 module and extension icon: the bundled model's hippocampus on a sagittal slice of the sample.

python Resources/Screenshots/make_icon.py   # writes MedSegExtension/Resources/Icons/MedSeg.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from medseg import io
from medseg.models.registry import resources_dir
from medseg.segmenter import Segmenter
from PIL import Image, ImageDraw

OUTPUT = Path(__file__).resolve().parents[2] / "MedSegExtension" / "Resources" / "Icons" / "MedSeg.png"
SIZE = 128


def main() -> None:
    sample = resources_dir() / "SampleData" / "hippocampus-mni152-t1.nii.gz"
    image = sitk.DICOMOrient(io.read_image(sample), "LPS")
    result = Segmenter(None, device="cpu").segment(image)
    volume = sitk.GetArrayFromImage(image).astype(float)  # (S, P, L)
    labels = sitk.GetArrayFromImage(result.labelmap)
    x = int(np.argmax((labels > 0).sum(axis=(0, 1))))  # the sagittal slice with the most hippocampus
    plane, mask = volume[::-1, :, x], labels[::-1, :, x]  # superior at the top
    low, high = np.percentile(plane, (1, 99.5))
    gray = np.clip((plane - low) / (high - low), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for label in result.card.labels:
        colour = np.array(label.color_float)
        rgb[mask == label.value] = 0.35 * rgb[mask == label.value] + 0.65 * colour
    side = max(rgb.shape[:2])
    square = np.zeros((side, side, 3))
    top, left = (side - rgb.shape[0]) // 2, (side - rgb.shape[1]) // 2
    square[top : top + rgb.shape[0], left : left + rgb.shape[1]] = rgb
    picture = Image.fromarray((square * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.LANCZOS)
    rounded = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(rounded).rounded_rectangle((0, 0, SIZE - 1, SIZE - 1), radius=18, fill=255)
    icon = picture.convert("RGBA")
    icon.putalpha(rounded)
    icon.save(OUTPUT, optimize=True)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
