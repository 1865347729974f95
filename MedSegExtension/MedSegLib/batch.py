"""Segment every image of a folder into Slicer ``.seg.nrrd`` files, going on past failing cases.

Run it with Slicer or with plain Python and ``slicer-core``, unchanged::

    Slicer --no-main-window --python-script MedSegLib/batch.py --input scans/ --output results/
    python MedSegLib/batch.py --input scans/ --output results/ --model hippocampus-mri --device cpu

Every image (NIfTI, NRRD, MHA/MHD, or a sub-folder holding one DICOM series) becomes
``<output>/<case>.seg.nrrd``. For a model with several channels, the channels of a case are files named like
nnU-Net's ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... in the card's order. A case that fails is reported
and the batch goes on; at the end a summary lists what succeeded and failed, and ``batch_summary.json`` in the
output folder records it. The exit status is 0 when every case succeeded, 1 when any failed, 2 for bad options,
an input folder without a single image, or missing engine packages (torch, MONAI, ...: named, with how to install
them; nothing is installed). Two inputs with the same case name (``a.nii.gz`` and ``a.nrrd``) are
both reported, not run: their results would share one file. An output folder inside the input folder is not a case.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SUMMARY_FILE = "batch_summary.json"
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Case:
    name: str
    inputs: list[Path]


@dataclass
class CaseOutcome:
    case: str
    inputs: list[str]
    ok: bool
    output: str | None = None
    error: str | None = None
    seconds: float = 0.0
    volumes_ml: dict[str, float] = field(default_factory=dict)


def _caseName(path: Path) -> str | None:
    """The case name of an image file or DICOM folder, or None when ``path`` is not an input."""
    if path.name.startswith("."):  # ._ files of macOS archives, hidden files
        return None
    if path.is_dir():
        return path.name if any(p.is_file() and not p.name.startswith(".") for p in path.iterdir()) else None
    lower = path.name.lower()
    if lower.endswith(".seg.nrrd"):
        return None
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def findCases(folder: Path, channels: int, exclude: Path | None = None) -> tuple[list[Case], list[CaseOutcome]]:
    """The cases of a folder, sorted by name; and, for multi-channel models, groups with missing channels.

    ``exclude`` (the output folder, when it lies inside ``folder``) is not a case.

    Returns:
        (cases, problems): problems are cases that cannot run, reported as failures without being tried.
    """
    skip = exclude.resolve() if exclude is not None else None
    entries = sorted(
        (name, path)
        for path in folder.iterdir()
        if (skip is None or path.resolve() != skip) and (name := _caseName(path)) is not None
    )
    named: dict[str, list[Path]] = {}
    for name, path in entries:
        named.setdefault(name, []).append(path)
    problems = [
        CaseOutcome(
            name,
            [str(p) for p in paths],
            ok=False,
            error=f"{len(paths)} inputs share this case name ({', '.join(p.name for p in paths)}); rename all but one",
        )
        for name, paths in named.items()
        if len(paths) > 1
    ]
    entries = [(name, path) for name, path in entries if len(named[name]) == 1]
    if channels == 1:
        return [Case(name, [path]) for name, path in entries], problems
    groups: dict[str, dict[int, Path]] = {}
    for name, path in entries:
        match = _CHANNEL_SUFFIX.match(name)
        if match is None:
            problems.append(
                CaseOutcome(name, [str(path)], ok=False, error=f"not named <case>_0000 ... <case>_{channels - 1:04d}")
            )
            continue
        groups.setdefault(match["case"], {})[int(match["channel"])] = path
    cases = []
    for name, found in sorted(groups.items()):
        if sorted(found) != list(range(channels)):
            problems.append(
                CaseOutcome(
                    name,
                    [str(p) for _, p in sorted(found.items())],
                    ok=False,
                    error=f"needs channels _0000 to _{channels - 1:04d}, found {[f'_{c:04d}' for c in sorted(found)]}",
                )
            )
            continue
        cases.append(Case(name, [found[c] for c in range(channels)]))
    return cases, problems


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="MedSegLib/batch.py", description="Segment every image of a folder into Slicer .seg.nrrd files."
    )
    parser.add_argument("--input", required=True, type=Path, help="folder of images (or DICOM series folders)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the .seg.nrrd files (created)")
    parser.add_argument("--model", help="model id or model folder (default: the bundled model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--largest-component", action="store_true", help="keep the largest component per label")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose .seg.nrrd already exists")
    return parser


class NoCasesError(ValueError):
    """The input folder holds no image at all: a wrong --input, not a batch with failures."""


def runBatch(args: argparse.Namespace, log=print) -> list[CaseOutcome]:
    """Segment every case of ``args.input``; returns one outcome per case (existing results count as done)."""
    from medseg.io import read_channels
    from medseg.segmenter import Segmenter

    from MedSegLib.segmentationio import writeSegNrrd

    segmenter = Segmenter(args.model, device=args.device)
    card = segmenter.card
    cases, outcomes = findCases(args.input, len(card.channels), exclude=args.output)
    if not cases and not outcomes:
        raise NoCasesError(
            f"no images in {args.input} (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM series folders)"
        )
    for problem in outcomes:
        log(f"skipped  {problem.case}: {problem.error}")
    args.output.mkdir(parents=True, exist_ok=True)
    log(f"model {card.id} {card.version} on {segmenter.device}; {len(cases)} case(s) in {args.input}")
    start = time.perf_counter()
    for index, case in enumerate(cases, start=1):
        output = args.output / f"{case.name}.seg.nrrd"
        prefix = f"[{index}/{len(cases)}] {case.name}"
        if output.exists() and not args.overwrite:
            outcomes.append(CaseOutcome(case.name, [str(p) for p in case.inputs], ok=True, output=str(output)))
            log(f"{prefix}: already done ({output.name}; --overwrite redoes it)")
            continue
        outcome = _runCase(segmenter, case, output, read_channels, writeSegNrrd, keepLargest=args.largest_component)
        outcomes.append(outcome)
        elapsed = time.perf_counter() - start
        remaining = elapsed / index * (len(cases) - index)
        if outcome.ok:
            volumes = ", ".join(f"{name} {ml:.3f} mL" for name, ml in outcome.volumes_ml.items())
            log(f"{prefix}: ok in {outcome.seconds:.1f}s ({volumes}); about {remaining:.0f}s left")
        else:
            log(f"{prefix}: FAILED: {outcome.error}")
    return outcomes


def _runCase(segmenter, case: Case, output: Path, readChannels, writeSegNrrd, *, keepLargest: bool) -> CaseOutcome:
    from medseg.errors import MedSegError

    start = time.perf_counter()
    outcome = CaseOutcome(case.name, [str(p) for p in case.inputs], ok=False)
    try:
        images = readChannels(case.inputs, channel_names=[c.name for c in segmenter.card.channels])
        result = segmenter.segment(images, keep_largest=keepLargest)
        writeSegNrrd(result.labelmap, segmenter.card, output)
    except MedSegError as exc:
        outcome.error = str(exc)
    except Exception as exc:  # an unexpected failure of one case must not end the batch
        logging.getLogger(__name__).exception("case %s", case.name)
        outcome.error = f"unexpected {type(exc).__name__}: {exc}"
    else:
        outcome.ok = True
        outcome.output = str(output)
        outcome.volumes_ml = {s.name: round(s.volume_ml, 4) for s in result.statistics}
    outcome.seconds = time.perf_counter() - start
    return outcome


def writeSummary(outcomes: Sequence[CaseOutcome], folder: Path, log=print) -> Path:
    failed = [o for o in outcomes if not o.ok]
    log(f"\n{len(outcomes) - len(failed)} succeeded, {len(failed)} failed")
    for outcome in failed:
        log(f"  FAILED {outcome.case}: {outcome.error}")
    path = folder / SUMMARY_FILE
    temporary = path.with_name(f".{path.name}.tmp")
    summary = {"succeeded": len(outcomes) - len(failed), "failed": len(failed), "cases": [asdict(o) for o in outcomes]}
    temporary.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    temporary.replace(path)
    log(f"summary: {path}")
    return path


def missingPackagesMessage() -> str | None:
    """One line naming the engine's packages missing from this Python and how to install them; None if none is."""
    from MedSegLib.dependencies import missingRequirements

    missing = [r.requirement for r in missingRequirements()]
    if not missing:
        return None
    quoted = " ".join(f'"{m}"' for m in missing)
    return (
        f"MedSeg's engine needs Python packages that {sys.executable} lacks: {', '.join(missing)}. Nothing was "
        "installed. In Slicer, press Apply once in the MedSeg module (it asks, then installs them, torch through the "
        f"PyTorch extension); in another Python: {sys.executable} -m pip install {quoted}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.input.is_dir():
        print(f"batch: error: {args.input} is not a folder", file=sys.stderr)
        return 2
    missing = missingPackagesMessage()
    if missing:  # the engine would fail on its first import, with a traceback
        print(f"batch: error: {missing}", file=sys.stderr)
        return 2
    from medseg.errors import MedSegError

    try:
        outcomes = runBatch(args, log=lambda message: print(message, flush=True))
    except (MedSegError, NoCasesError) as exc:  # no model, or no input: nothing to go on with
        print(f"batch: error: {exc}", file=sys.stderr)
        return 2
    writeSummary(outcomes, args.output, log=lambda message: print(message, flush=True))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    # Run as a script (by Slicer's --python-script or by python): make MedSegLib and medseg importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from MedSegLib.batch import main as _main

    sys.exit(_main(sys.argv[1:]))
