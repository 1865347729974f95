"""``medseg-train CONFIG`` (or ``python -m training CONFIG``): train and write the model folder named in the config.

Under ``torchrun --nproc_per_node N -m training CONFIG`` it trains with distributed data parallelism (NCCL on
GPUs, gloo on CPUs); the config's batch size is the global batch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medseg.errors import MedSegError

from .config import load_config
from .export import ExportError
from .train import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medseg-train", description=__doc__)
    parser.add_argument("config", help="JSON or YAML training config (see training/configs/)")
    parser.add_argument("--epochs", type=int, help="override the config's epoch count (for quick trials)")
    parser.add_argument("--output", help="override the config's output model folder")
    parser.add_argument("--fold", type=int, help="override the config's cross-validation fold")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--stop-at-step", type=int, help="write a checkpoint after this many steps and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_config(args.config)
    except (OSError, ValueError) as exc:
        print(f"medseg-train: error: {exc}", file=sys.stderr)
        return 2
    if args.epochs:
        config.epochs = args.epochs
    if args.output:
        config.output = args.output
    if args.fold is not None:
        config.fold = args.fold
    command = " ".join(["medseg-train", *(argv if argv is not None else sys.argv[1:])])
    try:
        folder = train(config, command=command, resume=args.resume, stop_at_step=args.stop_at_step)
    except (MedSegError, ValueError, ExportError) as exc:  # bad data or config, a failed export: a message
        print(f"medseg-train: error: {exc}", file=sys.stderr)
        return 2
    if folder is not None:
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
