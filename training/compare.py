"""Train every architecture MedSeg offers on one split with one budget, and tabulate the results.

    python -m training.compare training/configs/hippocampus.json --epochs 15 --out runs/compare

Each architecture gets the base config with its own network (and, for DynUNet, the nnU-Net-style plan), the
same splits file, seed, epochs, batch, loss, optimiser and augmentation. For each, the table gives the
validation Dice per label (the model folder segmented from files by the engine, as ``medseg segment`` would),
the parameter count, the training time and the engine's inference time per validation case. ``compare.json``
and ``compare.md`` (the table as Markdown) are written to ``--out``; rerunning skips finished architectures.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from .config import load_config
from .train import train

#: name -> (card architecture, kwargs, config overrides); sized for about 1-10 M parameters
UNET = {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2, "norm": "instance"}
ARCHITECTURES = {
    "U-Net": ("UNet", UNET, {}),
    "Attention U-Net": ("AttentionUnet", {"channels": [16, 32, 64, 128], "strides": [2, 2, 2]}, {}),
    "SE U-Net": ("SEUNet", {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2}, {}),
    "SegResNet": ("SegResNet", {"init_filters": 16}, {}),
    "DynUNet (nnU-Net plan)": ("DynUNet", {}, {"plan": "dynunet"}),
    "UNETR": ("UNETR", {"feature_size": 16, "hidden_size": 192, "mlp_dim": 768, "num_heads": 4}, {}),
    "DeepLab 3D (ASPP)": ("DeepLab3D", {"channels": [16, 32, 64, 128]}, {}),
    "FCN 3D": ("FCN3D", {"channels": [16, 32, 64, 128]}, {}),
}


def run_one(base, name: str, out: Path, epochs: int | None) -> dict:
    architecture, kwargs, overrides = ARCHITECTURES[name]
    config = copy.deepcopy(base)
    slug = architecture.lower()
    config.output = str(out / slug / "model")
    config.run_dir = str(out / slug / "run")
    config.splits_file = str(out / "splits.json")
    config.export = []
    if epochs:
        config.epochs = epochs
        config.validate_every = min(config.validate_every, epochs)
    card = config.card
    card["id"] = f"{card['id']}-{slug}"
    if architecture == "UNETR":
        kwargs = {**kwargs, "img_size": list(config.patch_size)}
    card["network"] = {"architecture": architecture, "kwargs": kwargs}
    for key, value in overrides.items():
        setattr(config, key, value)
    folder = train(config, command=f"python -m training.compare ({name})")
    written = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    from medseg.models.folder import load_model_folder

    network = load_model_folder(folder).network
    validation = written["training"]["validation"]
    return {
        "name": name,
        "architecture": architecture,
        "dice": validation["mean"],
        "parameters_M": round(sum(p.numel() for p in network.parameters()) / 1e6, 2),
        "training_minutes": round(written["training"]["training_seconds"] / 60, 1),
        "inference_seconds_per_case": validation.get("seconds_per_case"),
        "epochs": config.epochs,
        "folder": str(folder),
    }


def markdown(rows: list[dict], machine: str) -> str:
    labels = list(rows[0]["dice"]) if rows else []
    head = [
        "architecture",
        *[f"Dice {label}" for label in labels],
        "parameters (M)",
        "training (min)",
        "inference (s/case)",
    ]
    lines = [f"Machine: {machine}.", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [
            row["name"],
            *[f"{row['dice'][label]:.3f}" for label in labels],
            f"{row['parameters_M']:.2f}",
            f"{row['training_minutes']:.1f}",
            f"{row['inference_seconds_per_case']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="the base training config (dataset, card, budget)")
    parser.add_argument("--epochs", type=int, help="the budget: epochs for every architecture")
    parser.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    parser.add_argument("--only", nargs="*", choices=list(ARCHITECTURES), help="a subset of the architectures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base = load_config(args.config)
    base.progress = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "compare.json"
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else {}
    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    machine = f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, {device}"
    for name in args.only or ARCHITECTURES:
        if name in results:
            continue
        started = time.time()
        results[name] = run_one(base, name, out, args.epochs)
        results[name]["wall_minutes"] = round((time.time() - started) / 60, 1)
        results_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    rows = [results[name] for name in ARCHITECTURES if name in results]
    (out / "compare.md").write_text(markdown(rows, machine), encoding="utf-8")
    print(markdown(rows, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
