"""A trained CT model for the speed benchmark: the benchmark's 4.8 M-parameter MONAI U-Net fitted to the liver.

An untrained network's two logits are nearly equal in most voxels, so its labels flip with any rounding; a trained
model's are not. ``benchmarks/inference.py --model unet-ct`` uses this model to show what a real model does under
each precision. It is fitted here, on the CPU, to the abdominal CT in ``../shared/data/ct_multiorgan`` (Apache-2.0;
its labels are TotalSegmentator's output, value 5 = liver), at the benchmark card's 1.5 x 1.5 x 2 mm with 96^3
patches, and cached under ``benchmarks/`` in the engine's cache folder (``$MEDSEG_CACHE_DIR``, else
``~/.cache/medseg``; never committed). It is a benchmark fixture, fitted to one scan: its accuracy is not the point,
only that its outputs are as confident as a trained model's.

python benchmarks/ct_model.py            # fit (about 2 minutes on 2 cores) or reuse the cached folder
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSegExtension"))

DATA = Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data")) / "ct_multiorgan"


def _cache_dir() -> Path:
    """The engine's cache folder: ``$MEDSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/medseg``, else ``~/.cache/medseg``."""
    try:
        from medseg.backends import cache_dir
    except ImportError:  # the engine's dependencies are missing: the same rule as medseg.backends.cache_dir
        if os.environ.get("MEDSEG_CACHE_DIR"):
            return Path(os.environ["MEDSEG_CACHE_DIR"])
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medseg"
    return cache_dir()


CACHE = _cache_dir() / "benchmarks" / "unet-ct-liver"
LIVER = 5
STEPS = 300
PATCH = (96, 96, 96)


def card(sha256: str = "0" * 64) -> dict:
    from inference import UNTRAINED, ct_card  # benchmarks/inference.py: the same architecture as ``--model unet``

    architecture, kwargs = UNTRAINED["unet"]
    out = ct_card(
        "unet-ct-liver",
        "Liver (benchmark fixture)",
        "The speed benchmark's 4.8 M U-Net fitted to one abdominal CT's liver; not a clinical model.",
        [{"value": 1, "name": "liver", "color": [221, 130, 101]}],
        architecture,
        kwargs,
        PATCH,
    )
    out["licence"] = "Apache-2.0 (fitted to ct_multiorgan, Apache-2.0)"
    out["weights"]["sha256"] = sha256
    return out


def fitted_folder(*, steps: int = STEPS, log=print) -> Path:
    """The cached model folder, fitted first when it is missing."""
    if (CACHE / "model.json").exists():
        return CACHE
    import SimpleITK as sitk
    import torch
    from medseg import io
    from medseg.models.architectures import build_network
    from medseg.models.card import card_from_dict
    from medseg.models.folder import sha256_of
    from medseg.preprocessing import label_to_network_grid, preprocess
    from monai.losses import DiceCELoss

    if not (DATA / "example_ct.nii.gz").exists():
        raise SystemExit(f"the multi-organ CT is not at {DATA}; set MEDSEG_SHARED_DATA")
    parsed = card_from_dict(card())
    image = io.read_image(DATA / "example_ct.nii.gz")
    label = sitk.Cast(sitk.ReadImage(str(DATA / "example_seg_fast_force_split.nii.gz")) == LIVER, sitk.sitkUInt8)
    volume, record = preprocess([image], parsed.preprocessing)
    target = label_to_network_grid(label, record)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    network = build_network("UNet", in_channels=1, out_channels=2, kwargs=parsed.network.kwargs)
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    liver = np.argwhere(target > 0)
    started = time.perf_counter()
    for step in range(steps):
        xs, ys = [], []
        for _ in range(2):
            centre = liver[rng.integers(len(liver))] if rng.random() < 0.6 else [rng.integers(s) for s in target.shape]
            corner = [int(np.clip(c - p // 2, 0, max(s - p, 0))) for c, p, s in zip(centre, PATCH, target.shape)]
            box = tuple(slice(c, c + p) for c, p in zip(corner, PATCH))
            xs.append(volume[(slice(None), *box)])
            ys.append(target[box][None])
        x = torch.from_numpy(np.stack(xs))
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(network(x).float(), y)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    tmp = CACHE.with_name(CACHE.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), tmp / "model.pt")
    (tmp / "model.json").write_text(json.dumps(card(sha256_of(tmp / "model.pt")), indent=1), encoding="utf-8")
    tmp.rename(CACHE)
    return CACHE


if __name__ == "__main__":
    print(fitted_folder())
