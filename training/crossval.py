"""k-fold cross-validation: train every fold of a config, and put the cross-validated Dice into the model card.

    python -m training.crossval training/configs/hippocampus-nnunet.json [--folds 0 1] [--tta] [--ship [--weights int8]]

Fold i is trained into ``<output>-fold<i>`` (its run folder beside it), on the splits file every fold shares.
A fold whose model folder already exists is not trained again, so an interrupted cross-validation continues
where it stopped (and a fold interrupted mid-way resumes from its checkpoint). When every fold is done,
``<output>-cv.json`` gives each fold's validation Dice per label (each fold's held-out cases, segmented from
files by the engine) and their mean over folds. ``--tta`` also scores every fold's held-out cases with the
engine's test-time mirroring along the axes that fold's training flipped (``mirrored`` in the summary), so the card
says what ``medseg segment --tta`` buys. ``--ship`` then copies the best fold's model folder to ``output`` with the
cross-validation summary in its card (``training.cross_validation``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from medseg.models.folder import load_model_folder, quantized, sha256_of

from .config import TrainConfig, load_config
from .data import read_dataset
from .train import evaluate_model_folder, shared_duplicates, staged_folder, train

logger = logging.getLogger("training")


def fold_config(config: TrainConfig, fold: int) -> TrainConfig:
    folded = copy.deepcopy(config)
    folded.fold = fold
    folded.output = f"{config.output}-fold{fold}"
    folded.run_dir = f"{config.output}-fold{fold}.run"
    folded.splits_file = str(config.splits_path if config.splits_file else Path(f"{config.output}-splits.json"))
    return folded


def summarise(config: TrainConfig) -> dict:
    """Each fold's validation Dice per label and the mean over folds, from the folds' model cards."""
    per_fold = []
    for fold in range(config.folds):
        card = json.loads((Path(fold_config(config, fold).output) / "model.json").read_text(encoding="utf-8"))
        validation = card["training"]["validation"]
        per_fold.append({"fold": fold, "cases": validation["cases"], "dice": validation["mean"]})
    labels = list(per_fold[0]["dice"])
    return {
        "metric": "Dice, each fold's held-out cases segmented from files by the engine",
        "folds": config.folds,
        "cases": sum(f["cases"] for f in per_fold),
        "mean": {label: round(float(np.mean([f["dice"][label] for f in per_fold])), 4) for label in labels},
        "per_fold": per_fold,
    }


def flipped_axes(card: dict) -> list[int]:
    """The axes a fold's training flipped: those its engine may mirror (folds trained before cards listed them)."""
    return sorted(set(card["training"]["config"]["augmentation"]["flip_axes"]))


def held_out_cases(card: dict, source: Path, config: TrainConfig, cases: dict) -> list:
    """The dataset's cases a fold's card held out, or a clear error naming those the dataset lacks."""
    held_out = card["training"]["split"]["validation"]
    missing = sorted(set(held_out) - set(cases))
    if missing:
        raise ValueError(f"{source}: held-out case(s) {', '.join(missing[:3])} are not in {config.dataset}")
    return [cases[c] for c in held_out]


def mirrored_summary(config: TrainConfig) -> dict:
    """Each fold's held-out Dice per label with test-time mirroring along its flipped axes, and the mean over folds."""
    cases = {case.case_id: case for case in read_dataset(config.dataset)[0]}
    per_fold = []
    for fold in range(config.folds):
        source = Path(fold_config(config, fold).output)
        card = json.loads((source / "model.json").read_text(encoding="utf-8"))
        axes = flipped_axes(card)
        if not axes:
            raise ValueError(f"{source}: its training flipped no axis, so there is nothing to mirror (--tta)")
        with tempfile.TemporaryDirectory(prefix="medseg-tta-") as tmp:
            folder = Path(tmp) / source.name
            shutil.copytree(source, folder)
            card["inference"].setdefault("mirror_axes", axes)
            (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
            scored = evaluate_model_folder(folder, held_out_cases(card, source, config, cases), mirror_axes="model")
        per_fold.append({"fold": fold, "cases": scored["cases"], "mirror_axes": axes, "dice": scored["mean"]})
        logger.info("fold %d mirrored along %s: %s", fold, axes, scored["mean"])
    labels = list(per_fold[0]["dice"])
    return {
        "metric": "Dice as `mean`, each window averaged with its mirrorings (medseg segment --tta)",
        "mean": {label: round(float(np.mean([f["dice"][label] for f in per_fold])), 4) for label in labels},
        "per_fold": per_fold,
    }


def ship(config: TrainConfig, summary: dict, *, weights: str = "float") -> Path:
    """Copy the best fold's model folder to ``config.output``, its card carrying the cross-validation summary.

    ``weights="int8"`` stores the weights as int8 with a scale per output channel (half the size of float16; see
    :func:`medseg.models.folder.quantized`) and scores the shipped folder again on its fold's held-out cases, so
    the card's ``training.validation`` describes the weights shipped (the fold's own is kept beside it).
    """
    best = max(summary["per_fold"], key=lambda f: np.mean(list(f["dice"].values())))["fold"]
    folded = fold_config(config, best)
    source = Path(folded.output)
    target = Path(config.output)

    with staged_folder(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        card = json.loads((tmp / "model.json").read_text(encoding="utf-8"))
        weights_path = tmp / card["weights"]["file"]
        # shared_duplicates: folds written before weights were stored once each (DynUNet lists its encoder twice)
        state = shared_duplicates(torch.load(weights_path, map_location="cpu", weights_only=True))
        torch.save(quantized(state) if weights == "int8" else state, weights_path)
        card["weights"].update(sha256=sha256_of(weights_path), storage=weights)
        card["training"]["cross_validation"] = {**summary, "shipped_fold": best}
        card["inference"].setdefault("mirror_axes", flipped_axes(card))
        if weights == "int8":
            card["format_version"] = 2  # an older MedSeg refuses the card by its version, not on the weights
        (tmp / "model.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        if weights == "int8":
            cases = {case.case_id: case for case in read_dataset(config.dataset)[0]}
            card["training"]["validation_float16"] = card["training"]["validation"]
            card["training"]["validation"] = evaluate_model_folder(tmp, held_out_cases(card, source, config, cases))
            (tmp / "model.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
            logger.info("int8 weights: validation %s", card["training"]["validation"]["mean"])
        load_model_folder(tmp)  # the engine must accept what is shipped
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.crossval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="a training config with folds >= 2")
    parser.add_argument("--folds", type=int, nargs="*", help="train only these folds (default: all)")
    parser.add_argument(
        "--tta", action="store_true", help="also score each fold's held-out cases with test-time mirroring"
    )
    parser.add_argument("--ship", action="store_true", help="copy the best fold to the config's output with the CV")
    parser.add_argument(
        "--weights",
        choices=("float", "int8"),
        default="float",
        help="how --ship stores the weights: as trained (float16) or int8 per output channel, half the size, "
        "scored again on the fold's held-out cases (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.weights != "float" and not args.ship:
        parser.error("--weights sets how --ship stores the shipped model; add --ship")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = load_config(args.config)
    if config.folds < 2:
        print(f"{args.config}: set folds (for example 5) for cross-validation", file=sys.stderr)
        return 2
    for fold in args.folds if args.folds is not None else range(config.folds):
        folded = fold_config(config, fold)
        if (Path(folded.output) / "model.json").is_file():
            continue
        train(folded, command=f"python -m training.crossval {args.config} (fold {fold})", resume=True)
    if not all((Path(fold_config(config, f).output) / "model.json").is_file() for f in range(config.folds)):
        return 0
    summary = summarise(config)
    if args.tta:
        summary["mirrored"] = mirrored_summary(config)
    Path(f"{config.output}-cv.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {
                "cross_validated_dice": summary["mean"],
                **({"with_tta": summary["mirrored"]["mean"]} if args.tta else {}),
                "folds": config.folds,
            }
        )
    )
    if args.ship:
        print(ship(config, summary, weights=args.weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
