"""Exports of a trained model folder, each checked against PyTorch and scored, so a user picks a lighter model
knowingly.

- ``torchscript``: ``model.torchscript.pt`` (traced; loads with ``torch.jit.load`` and no MedSeg code);
- ``onnx``: ``model.onnx`` (dynamic window batch; runs under ONNX Runtime);
- ``fp16``: the same weights run in 16-bit (bfloat16 on a CPU, float16 on a GPU), as the engine's
  ``--precision bf16|fp16`` does; no new file;
- ``int8``: ``model.int8.onnx``, ONNX Runtime static quantisation of the convolutions (per channel, QDQ),
  calibrated on training patches.

Each is run over the validation cases with the engine's sliding window. ``<run_dir>/exports/report.json`` gives
its largest logit difference from PyTorch on real windows, its Dice per label, its seconds over the validation
cases and the ratio to float32 PyTorch, and its file size. TorchScript and ONNX must match PyTorch within
:data:`PARITY`; an export that does not is an error. Each file is written under a temporary name in the same
folder and renamed once it has passed, so a failed or mismatching export (or its intermediate ONNX file for int8)
leaves no file behind, and an earlier good one is not replaced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("training")

#: largest absolute logit difference from PyTorch float32 allowed for each exact export
PARITY = {"torchscript": 1e-4, "onnx": 1e-3}


class ExportError(RuntimeError):
    """An export does not match the PyTorch model it came from."""


class OnnxNetwork(torch.nn.Module):
    """An ONNX Runtime session behind the ``network(x)`` call the engine's sliding window makes."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0]).to(x.device)


def _temporary(path: Path) -> Path:
    """The name ``path`` is written under until it has passed (``model.onnx``: ``.model.tmp.onnx``)."""
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


@contextlib.contextmanager
def _staged(path: Path):
    """A temporary file beside ``path``, renamed to it when the block succeeds and removed whatever happens."""
    tmp = _temporary(path)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _windows(cases, roi, count: int, seed: int) -> list[np.ndarray]:
    """``count`` real windows (1, C, *roi) cut from the cases at seeded places, zero-padded as MONAI pads."""
    from .data import random_patch

    rng = np.random.default_rng(seed)
    return [random_patch(cases[i % len(cases)], roi, rng)[0][None] for i in range(count)]


def _score(network, cases, card, options) -> tuple[dict[str, float], float]:
    """Mean Dice per label over ``cases`` and the seconds the sliding window took over all of them."""
    from medseg.inference import sliding_window_probabilities
    from medseg.metrics import dice_per_label

    values = [label.value for label in card.labels]
    scores: dict[int, list[float]] = {v: [] for v in values}
    seconds = 0.0
    for case in cases:
        t0 = time.perf_counter()
        probabilities = sliding_window_probabilities(
            network, case.volume, card.inference, device=torch.device("cpu"), options=options
        )
        seconds += time.perf_counter() - t0
        for v, d in dice_per_label(np.argmax(probabilities, 0), case.label, values).items():
            scores[v].append(d)
    names = {label.value: label.name for label in card.labels}
    return {names[v]: round(float(np.mean(s)), 4) for v, s in scores.items()}, seconds


def _largest_difference(network, reference, windows) -> float:
    worst = 0.0
    with torch.inference_mode():
        for window in windows:
            x = torch.from_numpy(window)
            worst = max(worst, float((network(x).float() - reference(x)).abs().max()))
    return worst


def export_model(
    folder: Path, out: Path, kinds: list[str], validation_cases, training_cases, *, seed: int = 0
) -> dict[str, Any]:
    """Write the requested exports of a model folder into ``out`` and return their report (also in report.json).

    Args:
        folder: a model folder (card + weights).
        out: where the exported files and ``report.json`` go.
        kinds: any of "torchscript", "onnx", "fp16", "int8".
        validation_cases: prepared cases (network grid) to score every variant on.
        training_cases: prepared cases to calibrate the int8 quantisation on.

    Raises:
        ExportError: TorchScript or ONNX logits differ from PyTorch by more than :data:`PARITY` (no file of a
            failed export is left in ``out``).
    """
    from medseg.inference import InferenceOptions
    from medseg.models.folder import load_model_folder

    model = load_model_folder(folder)
    card, network = model.card, model.network.float().eval()
    roi = tuple(card.inference.roi_size)
    out.mkdir(parents=True, exist_ok=True)
    windows = _windows(validation_cases, roi, 4, seed)
    exact = InferenceOptions(precision="fp32", backend="torch")  # the reference every export is compared with
    dice, seconds = _score(network, validation_cases, card, exact)
    report: dict[str, Any] = {
        "cases": len(validation_cases),
        "machine": f"{torch.get_num_threads()} CPU threads",
        "parity_tolerance": PARITY,
        "pytorch_fp32": {"dice": dice, "seconds": round(seconds, 3), "file_MiB": _mib(folder / card.weights_file)},
    }
    example = torch.from_numpy(np.concatenate(windows[:2]))

    def record(kind: str, variant, path: Path | None, options=exact) -> None:
        """Check and score ``variant``; ``path`` is the export's final name, its file still under the temporary."""
        entry: dict[str, Any] = {}
        if kind in PARITY:
            difference = _largest_difference(variant, network, windows)
            entry["max_abs_logit_difference"] = float(f"{difference:.3g}")
            if difference > PARITY[kind]:
                raise ExportError(
                    f"{kind} export of {folder} differs from PyTorch by {difference:.3g} (tolerance {PARITY[kind]})"
                )
        variant_dice, variant_seconds = _score(variant, validation_cases, card, options)
        entry.update(
            {
                "dice": variant_dice,
                "seconds": round(variant_seconds, 3),
                "speed_vs_pytorch_fp32": round(seconds / variant_seconds, 2),
            }
        )
        if path is not None:
            entry["file"] = path.name
            entry["file_MiB"] = _mib(_temporary(path))
        report[kind] = entry
        logger.info("export %s: %s", kind, entry)

    if "torchscript" in kinds:
        path = out / "model.torchscript.pt"
        with _staged(path) as tmp:
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(network, example), str(tmp))
            record("torchscript", torch.jit.load(str(tmp)).eval(), path)
    onnx_path = out / "model.onnx"
    onnx_tmp = _temporary(onnx_path)  # int8 alone quantises it and removes it
    try:
        if "onnx" in kinds or "int8" in kinds:
            with torch.no_grad():
                torch.onnx.export(
                    network,
                    (example,),
                    str(onnx_tmp),
                    input_names=["image"],
                    output_names=["logits"],
                    dynamic_axes={"image": {0: "windows"}, "logits": {0: "windows"}},
                    dynamo=False,
                )
        if "onnx" in kinds:
            record("onnx", OnnxNetwork(onnx_tmp), onnx_path)
            onnx_tmp.replace(onnx_path)
        if "fp16" in kinds:
            precision = "fp16" if torch.cuda.is_available() else "bf16"
            record("fp16", network, None, InferenceOptions(precision=precision))
            report["fp16"]["precision"] = precision
        if "int8" in kinds:
            path = out / "model.int8.onnx"
            with _staged(path) as tmp:
                source = onnx_path if "onnx" in kinds else onnx_tmp
                _quantize(source, tmp, _windows(training_cases, roi, 8, seed + 1))
                record("int8", OnnxNetwork(tmp), path)
    finally:
        onnx_tmp.unlink(missing_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def _quantize(source: Path, target: Path, calibration: list[np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.windows = iter(calibration)

        def get_next(self):
            window = next(self.windows, None)
            return None if window is None else {"image": window}

    prepared = target.with_name(target.stem + ".pre.onnx")
    try:
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            op_types_to_quantize=["Conv"],
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)


def _mib(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 2)


def export_all(folder: Path, config, validation_cases, training_cases) -> dict[str, Any]:
    """The config's ``export`` list for a freshly written model folder, into ``<run_dir>/exports``."""
    return export_model(
        folder, config.run_path / "exports", config.export, validation_cases, training_cases, seed=config.seed
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m training.export CONFIG [--model FOLDER]``: export a trained model folder after the fact.

    The validation cases are those the folder's card records (``training.split.validation``); the int8
    calibration uses up to 16 of its training cases. Exports go to ``--out`` (default ``<run_dir>/exports``).
    """
    import argparse
    import sys

    from medseg.errors import MedSegError
    from medseg.models.card import read_card

    from .config import EXPORTS, load_config
    from .data import prepare_case, read_dataset

    parser = argparse.ArgumentParser(
        prog="python -m training.export", description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="the training config that made the model (for its dataset)")
    parser.add_argument("--model", help="the model folder (default: the config's output)")
    parser.add_argument("--out", help="where the exports go (default: <run_dir>/exports)")
    parser.add_argument("--kinds", nargs="+", choices=EXPORTS, default=list(EXPORTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_config(args.config)
        folder = Path(args.model or config.output)
        card = read_card(folder)
        split = card.training.get("split", {})
        if not split.get("validation"):
            raise ValueError(f"{folder}: its card records no validation cases (training.split.validation)")
        cases, labels = read_dataset(config.dataset)
        by_id = {case.case_id: case for case in cases}
        missing = sorted(set(split["validation"]) - set(by_id))
        if missing:
            raise ValueError(f"{folder}: validation cases {missing[:5]} are not in the config's dataset")
        values = set(labels)
        validation = [prepare_case(by_id[c], card.preprocessing, values) for c in split["validation"]]
        training = [prepare_case(by_id[c], card.preprocessing, values) for c in split.get("train", [])[:16]]
        out = Path(args.out) if args.out else config.run_path / "exports"
        report = export_model(folder, out, args.kinds, validation, training or validation, seed=config.seed)
    except (MedSegError, ValueError, OSError, ExportError) as exc:
        print(f"python -m training.export: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
