"""Render the README's picture: the bundled model's result on the bundled sample, in three planes.

python Resources/Screenshots/make_demo_picture.py   # writes Resources/Screenshots/hippocampus-demo.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from medseg import io  # noqa: E402
from medseg.models.registry import resources_dir  # noqa: E402
from medseg.segmenter import Segmenter  # noqa: E402

OUTPUT = Path(__file__).with_name("hippocampus-demo.png")


def main() -> None:
    sample = resources_dir() / "SampleData" / "hippocampus-mni152-t1.nii.gz"
    image = sitk.DICOMOrient(io.read_image(sample), "LPS")  # display in radiological convention
    result = Segmenter(None, device="cpu").segment(image)
    volume = sitk.GetArrayFromImage(image).astype(float)  # (z, y, x) = (S, P, L) in LPS
    labels = sitk.GetArrayFromImage(result.labelmap)
    colors = [(0, 0, 0, 0)] + [(*lb.color_float, 0.55) for lb in result.card.labels]
    cmap = ListedColormap(colors)
    z, y, x = (int(round(c)) for c in np.argwhere(labels > 0).mean(0))
    views = [
        ("axial", volume[z], labels[z], "lower"),
        ("coronal", volume[:, y, :], labels[:, y, :], "lower"),
        ("sagittal", volume[:, :, x], labels[:, :, x], "lower"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.8), facecolor="black")
    for ax, (title, plane, mask, origin) in zip(axes, views):
        ax.imshow(plane, cmap="gray", origin=origin, interpolation="nearest")
        ax.imshow(mask, cmap=cmap, vmin=0, vmax=len(colors) - 1, origin=origin, interpolation="nearest")
        ax.set_title(title, color="white")
        ax.axis("off")
    handles = [
        Patch(color=lb.color_float, label=f"{s.name}: {s.volume_ml:.2f} mL")
        for lb, s in zip(result.card.labels, result.statistics)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, labelcolor="white")
    fig.suptitle("medseg demo: hippocampus-mri on the MNI152 T1 template (left hippocampus)", color="white")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(OUTPUT, dpi=100, facecolor="black")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
