"""``python -m training CONFIG``: train and write the model folder named in the config."""

from __future__ import annotations

import argparse
import logging
import sys

from .train import load_config, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("config", help="JSON or YAML training config (see training/configs/)")
    parser.add_argument("--epochs", type=int, help="override the config's epoch count (for quick trials)")
    parser.add_argument("--output", help="override the config's output model folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = load_config(args.config)
    if args.epochs:
        config.epochs = args.epochs
    if args.output:
        config.output = args.output
    folder = train(config, command=" ".join(["python -m training", *(argv if argv is not None else sys.argv[1:])]))
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
