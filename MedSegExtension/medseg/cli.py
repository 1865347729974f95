"""The ``medseg`` command.

medseg segment scan.nii.gz -o scan_seg.nii.gz
medseg segment t1.nii.gz -o t1.seg.nrrd --model hippocampus-mri --device cpu
medseg segment flair.nii.gz t1c.nii.gz -o seg.nii.gz --model path/to/model_folder
medseg segment ct.nrrd -o ct_seg.nrrd --roi -120 -80 -300 40 60 -180
medseg segment t1.nii.gz -o t1_seg.nii.gz --refine
medseg segment ct.nii.gz -o ct_preview.nii.gz --preview
medseg segment t1.nii.gz -o t1_seg.nii.gz --precision fp32 --tta   # mirrored along the card's axes
medseg refine t1.nii.gz t1_probabilities.nii.gz -o t1_refined.nii.gz --seeds-fg strokes.nii.gz
medseg models
medseg demo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import MedSegError, OutputError
from .progress import RunControl

logger = logging.getLogger("medseg")

SAMPLE_FILE = "hippocampus-mni152-t1.nii.gz"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description="Deep-learning segmentation of CT and MRI.")
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    verbosity = argparse.ArgumentParser(add_help=False)
    group = verbosity.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    group.add_argument("-v", "--verbose", action="store_true", help="print details of each step")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    segment = commands.add_parser(
        "segment",
        parents=[verbosity],
        help="segment one case",
        description="Segment one case; several inputs are the channels of one case, "
        "in the order the model card names them.",
    )
    segment.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI, NRRD or MHA file, or a DICOM series folder")
    segment.add_argument(
        "-o", "--output", required=True, help="labelmap (.nii.gz, .nii, .nrrd, .mha) or Slicer segmentation (.seg.nrrd)"
    )
    _model_options(segment)
    segment.add_argument(
        "--probabilities",
        metavar="FILE",
        help="also write per-class probabilities (vector image; component 0 is background)",
    )
    segment.add_argument(
        "--largest-component", action="store_true", help="keep only the largest connected component of each label"
    )
    roi = segment.add_mutually_exclusive_group()
    roi.add_argument(
        "--roi",
        nargs=6,
        type=float,
        metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
        help="work only inside this box: two opposite corners in LPS millimetres (as ITK and DICOM)",
    )
    roi.add_argument(
        "--roi-voxels",
        nargs=6,
        type=int,
        metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
        help="work only inside this box of voxel indices, first and last included",
    )
    _inference_options(segment)
    segment.add_argument(
        "--preview",
        action="store_true",
        help="a quick look, not for measurement: windows without overlap, fast precision without the float32 "
        "trial, labels at the network's resolution (blocky where it is coarser than the input)",
    )
    segment.add_argument(
        "--refine", action="store_true", help="refine the labels by graph cut on the image (see 'medseg refine')"
    )
    _refine_options(segment)
    segment.add_argument(
        "--progress-json",
        action="store_true",
        help="print progress and the result as JSON lines on stdout (for programs driving medseg)",
    )
    segment.add_argument(  # for a program driving medseg through a pipe (the Slicer module): not for the shell
        "--exit-with-stdin", action="store_true", help=argparse.SUPPRESS
    )

    refine = commands.add_parser(
        "refine",
        parents=[verbosity],
        help="refine a segmentation by graph cut, optionally with strokes",
        description="Refine a segmentation by a minimum cut: the probabilities (or, from a labelmap, soft "
        "probabilities from the distance to its boundary) give each voxel its cost, neighbours of similar "
        "intensity are expensive to separate, and strokes are hard constraints. Only the uncertain band around "
        "the boundary becomes a graph.",
    )
    refine.add_argument("image", metavar="IMAGE", help="the image the segmentation belongs to")
    refine.add_argument(
        "segmentation",
        metavar="SEGMENTATION_OR_PROBABILITIES",
        help="a labelmap, or per-class probabilities (vector image, component 0 background) on IMAGE's grid",
    )
    refine.add_argument("-o", "--output", required=True, help="refined labelmap (.nii.gz, .nii, .nrrd, .mha)")
    refine.add_argument(
        "--seeds-fg", metavar="MASK", help="foreground strokes: a labelmap whose value k marks voxels of label k"
    )
    refine.add_argument("--seeds-bg", metavar="MASK", help="background strokes: nonzero voxels are background")
    _refine_options(refine)

    models = commands.add_parser("models", parents=[verbosity], help="list bundled and installed models")
    models.add_argument("--json", action="store_true", help="machine-readable output")

    demo = commands.add_parser("demo", parents=[verbosity], help="run the bundled model on the bundled sample")
    demo.add_argument("--output-dir", default="medseg-demo", help="where to write the results (default: %(default)s)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    return parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-m", "--model", help="model id (see 'medseg models') or model folder; default: the bundled model"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")


#: ``medseg.inference.PRECISIONS``, repeated so that parsing the command line does not import torch (a test checks)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: ``medseg.backends.BACKENDS``, repeated for the same reason
BACKENDS = ("auto", "torch", "openvino")


def _inference_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference")
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16/fp16 where the device runs it fast and the first windows show it cannot change the "
        "labels, else fp32; fp16 is for GPUs (on most CPUs it is many times slower than fp32) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--window-batch",
        type=int,
        metavar="N",
        help="windows per network call (default: 2 on the CPU; on a GPU, planned within its memory budget)",
    )
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="what runs the windows on the CPU: auto (float32 and bf16 in OpenVINO when installed and the network "
        "converts, else PyTorch), torch, or openvino (OpenVINO or an error) (default: %(default)s)",
    )
    group.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average each window's mirrorings along the axes the model's training flipped "
        "(its card's inference.mirror_axes; 2x slower per axis)",
    )


def _inference_settings(args: argparse.Namespace):
    from .inference import InferenceOptions

    try:
        return InferenceOptions(
            precision=args.precision,
            window_batch=args.window_batch,
            mirror_axes="model" if args.tta else (),
            backend=args.backend,
        )
    except ValueError as exc:
        raise MedSegError(str(exc)) from None


def _refine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("graph cut")
    group.add_argument(
        "--smoothness", type=float, default=1.0, help="weight of the boundary term (default: %(default)s)"
    )
    group.add_argument("--connectivity", type=int, choices=(6, 26), default=6, help="neighbourhood (default: 6)")
    group.add_argument(
        "--band-mm",
        type=float,
        default=None,
        help="how far the graph reaches beyond the uncertain band, in mm (default: 0)",
    )
    group.add_argument("--full-volume", action="store_true", help="cut the whole volume instead of the band (slow)")


def _graphcut_options(args: argparse.Namespace):
    from .graphcut import GraphCutOptions

    if args.full_volume and args.band_mm is not None:
        raise MedSegError("--band-mm with --full-volume: the whole volume is cut, so there is no band; drop one")

    return GraphCutOptions(
        smoothness=args.smoothness,
        connectivity=args.connectivity,
        band_mm=None if args.full_volume else args.band_mm or 0.0,
    )


def _configure_logging(args: argparse.Namespace) -> None:
    """Messages of the engine's loggers go to stderr; --quiet keeps warnings and errors, --verbose adds details."""
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    root = logging.getLogger("medseg")
    for handler in [h for h in root.handlers if getattr(h, "_medseg_cli", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._medseg_cli = True
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


class _ProgressBar:
    """A tqdm bar per stage on stderr; silent with --quiet or when stderr is not a terminal and not verbose."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.bar = None

    def __call__(self, stage: str, fraction: float) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(
                total=100,
                desc=f"{stage:<15}",
                unit="%",
                leave=False,
                file=sys.stderr,
                bar_format="{desc} {bar} {percentage:3.0f}% {elapsed}",
            )
        self.bar.n = round(fraction * 100)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_result(result, output: Path, seconds: float) -> None:
    card = result.card
    report = result.inference
    mirrored = f", mirrored along {', '.join('xyz'[a] for a in report.mirror_axes)}" if report.mirror_axes else ""
    print(
        f"model      {card.id} {card.version} on {result.device} "
        f"({report.precision} in {report.backend}, {report.windows} windows{mirrored})"
    )
    if result.preview:
        print("PREVIEW    a quick look at the network's resolution, not for measurement")
    print(f"output     {output.resolve()}")
    for stats in result.statistics:
        print(f"  {stats.value:>3}  {stats.name:<30} {stats.volume_ml:9.3f} mL  ({stats.voxels} voxels)")
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items())
    print(f"time       {seconds:.2f}s ({timings})")


def _json_line(**event) -> None:
    print(json.dumps(event), flush=True)


#: the exit status of an engine whose standard input closed under ``--exit-with-stdin``
EXIT_STDIN_CLOSED = 3


def _exit_when_stdin_closes() -> None:
    """Stop the process when its standard input ends: the program that started it and holds the other end of the
    pipe (Slicer) closed it, or crashed or was killed, which closes it too. Without this an engine outlives a
    crashed Slicer and holds the GPU until its next write. Outputs appear only when whole: a stop while writing can
    leave only a hidden partial file, as a kill does."""

    try:
        descriptor = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # no standard input at all: nothing to watch
        return

    def watch() -> None:
        # the file descriptor, not sys.stdin: a daemon thread blocked in sys.stdin's read holds its buffer's lock,
        # and the interpreter then aborts at exit ("could not acquire lock ... at interpreter shutdown")
        try:
            while os.read(descriptor, 65536):  # what is written is ignored; only the end counts
                pass
        except OSError:  # closed or unreadable: the same end
            pass
        print("medseg: error: the program that started the engine has gone; stopping", file=sys.stderr, flush=True)
        os._exit(EXIT_STDIN_CLOSED)

    threading.Thread(target=watch, name="medseg-stdin-watch", daemon=True).start()


def _roi_option(args: argparse.Namespace):
    from .preprocessing import IndexBox, PhysicalBox

    if args.roi is not None:
        return PhysicalBox(tuple(args.roi[:3]), tuple(args.roi[3:]))
    if args.roi_voxels is not None:
        first, last = args.roi_voxels[:3], args.roi_voxels[3:]
        if any(b < a for a, b in zip(first, last)):
            raise MedSegError(f"--roi-voxels: the last index must not be below the first, got {args.roi_voxels}")
        return IndexBox(tuple(first), tuple(b - a + 1 for a, b in zip(first, last)))
    return None


def _check_segment_options(args: argparse.Namespace) -> None:
    """Options that would do nothing in this combination are an error, not silently dropped."""
    given = [
        flag
        for flag, differs in (
            ("--smoothness", args.smoothness != 1.0),
            ("--connectivity", args.connectivity != 6),
            ("--band-mm", args.band_mm is not None),
            ("--full-volume", args.full_volume),
        )
        if differs
    ]
    if given and not args.refine:
        raise MedSegError(f"{', '.join(given)} set(s) the graph-cut refinement; add --refine to use it")
    if args.tta and args.preview:
        raise MedSegError("--tta with --preview: a preview runs without test-time mirroring; drop one of them")


def _segment(args: argparse.Namespace) -> int:
    from .segmenter import Segmenter

    start = time.perf_counter()
    if args.exit_with_stdin:
        _exit_when_stdin_closes()
    _check_segment_options(args)
    roi = _roi_option(args)
    if args.progress_json:
        _json_line(event="progress", stage="loading model", fraction=0.0)
    segmenter = Segmenter(args.model, device=args.device, inference=_inference_settings(args))
    logger.debug("loaded model %s from %s", segmenter.card.id, segmenter.model.folder)
    if args.progress_json:
        bar = None
        progress = lambda stage, fraction: _json_line(event="progress", stage=stage, fraction=fraction)  # noqa: E731
    else:
        bar = progress = _ProgressBar(enabled=not args.quiet and (sys.stderr.isatty() or args.verbose))
    try:
        result = segmenter.segment_files(
            args.inputs,
            args.output,
            probabilities=args.probabilities,
            roi=roi,
            keep_largest=args.largest_component,
            refine=_graphcut_options(args) if args.refine else None,
            preview=args.preview,
            control=RunControl(progress=progress),
        )
    finally:
        if bar is not None:
            bar.close()
    if args.progress_json:
        _json_line(
            event="result",
            model=result.card.id,
            device=result.inference.device or result.device,  # where the windows ran (a GPU out of memory: the CPU)
            notes=list(result.inference.notes),
            output=str(Path(args.output).resolve()),
            statistics=[vars(s) for s in result.statistics],
            seconds=result.seconds,
            preview=result.preview,
            precision=result.inference.precision,
            backend=result.inference.backend,
            mirror_axes=list(result.inference.mirror_axes),
        )
    elif not args.quiet:
        _print_result(result, Path(args.output), time.perf_counter() - start)
    return 0


def _refine(args: argparse.Namespace) -> int:
    from .refinement import refine_files

    start = time.perf_counter()
    summary = refine_files(
        args.image,
        args.segmentation,
        args.output,
        seeds_fg=args.seeds_fg,
        seeds_bg=args.seeds_bg,
        options=_graphcut_options(args),
    )
    if not args.quiet:
        print(f"output     {Path(args.output).resolve()}")
        for value, (before, after) in summary.volumes_ml.items():
            print(f"  {value:>3}  {before:9.3f} mL -> {after:9.3f} mL")
        print(f"time       {time.perf_counter() - start:.2f}s (graph cut {summary.seconds:.2f}s)")
    return 0


def _per_label(dice: dict) -> str:
    """``{label name: Dice}`` as one line: ``Anterior hippocampus 0.902, Posterior hippocampus 0.888``."""
    return ", ".join(f"{name} {value:.3f}" for name, value in dice.items())


def _models(args: argparse.Namespace) -> int:
    from .models.registry import list_models

    entries = list_models()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": e.card.id if e.card else None,
                        "folder": str(e.folder),
                        "source": e.source,
                        "problem": e.problem,
                        "card": e.card.to_dict() if e.card else None,
                    }
                    for e in entries
                ],
                indent=2,
            )
        )
        return 0
    if not entries:
        print("no models found; see 'medseg segment --help' for how models are found")
    for entry in entries:
        if entry.card is None:
            print(f"BROKEN  {entry.folder}: {entry.problem}")
            continue
        card = entry.card
        print(f"{card.id}  {card.version}  [{entry.source}]  {entry.folder}")
        print(f"    {card.name}")
        print(f"    channels: {', '.join(f'{c.name} ({c.modality})' for c in card.channels)}")
        print(f"    labels:   {', '.join(f'{lb.value} {lb.name}' for lb in card.labels)}")
        print(f"    licence:  {card.licence}")
        validation = card.training.get("validation") or {}
        if validation.get("mean"):
            held_out = f" ({validation['cases']} held-out cases)" if validation.get("cases") else ""
            print(f"    validation Dice{held_out}: {_per_label(validation['mean'])}")
        cross = card.training.get("cross_validation") or {}
        if cross.get("mean"):
            folds = f"{cross['folds']}-fold cross-validated Dice"
            print(f"    {folds}: {_per_label(cross['mean'])}")
            if cross.get("mirrored"):
                print(f"    {folds} with --tta: {_per_label(cross['mirrored']['mean'])}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import io
    from .models.registry import DEFAULT_MODEL_ID, resources_dir
    from .segmenter import Segmenter, seg_nrrd_writer

    resources = resources_dir()
    sample = None if resources is None else resources / "SampleData" / SAMPLE_FILE
    if sample is None or not sample.is_file():
        raise MedSegError(f"the bundled sample {SAMPLE_FILE} is missing from this installation")
    out_dir = Path(args.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a folder that cannot be written, a full disk
        raise OutputError(f"{out_dir}: cannot make the output folder ({exc.strerror or exc})") from None
    labelmap_path = out_dir / SAMPLE_FILE.replace(".nii.gz", "_seg.nii.gz")
    seg_nrrd_path = out_dir / SAMPLE_FILE.replace(".nii.gz", ".seg.nrrd")
    start = time.perf_counter()
    # the bundled model itself: a user's own model of that id, found first by id, is not the demo
    segmenter = Segmenter(resources / "Models" / DEFAULT_MODEL_ID, device=args.device)
    bar = _ProgressBar(enabled=not args.quiet and sys.stderr.isatty())
    try:
        image = io.read_image(sample)
        orientation = io.read_nifti_orientation(sample, image)
        result = segmenter.segment(image, control=RunControl(progress=bar))
    finally:
        bar.close()
    try:
        writer = seg_nrrd_writer()
    except MedSegError as exc:
        logger.info("not writing a .seg.nrrd: %s", exc)
        writer, seg_nrrd_path = None, None
    with io.outputs_together():  # both files or neither: "interrupted; nothing was written" holds
        io.write_image(result.labelmap, labelmap_path, orientation=orientation)
        if writer is not None:
            writer(result.labelmap, segmenter.card, seg_nrrd_path)
    if not args.quiet:
        print(f"input      {sample}")
        _print_result(result, labelmap_path, time.perf_counter() - start)
        if seg_nrrd_path is not None:
            print(f"Slicer     {seg_nrrd_path.resolve()} (load it in 3D Slicer with the input)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")  # names in cards may not fit an ASCII terminal
    args = _parser().parse_args(argv)
    _configure_logging(args)
    handlers = {"segment": _segment, "refine": _refine, "models": _models, "demo": _demo}
    try:
        return handlers[args.command](args)
    except MedSegError as exc:
        print(f"medseg: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("medseg: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
