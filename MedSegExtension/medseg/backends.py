"""OpenVINO for the windows on the CPU: the same network, run by a faster CPU runtime.

PyTorch's CPU convolutions leave speed unused for 3D U-Nets. OpenVINO's CPU plugin runs the same network's windows
about twice as fast on this project's 2-core Xeon (AMX):

* float32: 0.053 to 0.060 s against 0.10 to 0.11 s per 96^3 window of the 4.8 M-parameter MONAI U-Net, window
  batch 2 (0.063 s before the rewrites below);
* bfloat16 (``precision="bf16"``: the same converted network compiled again with OpenVINO's bf16 inference
  precision): 0.021 to 0.025 s against 0.039 to 0.057 s for PyTorch's autocast, depending on the day, and 1.8
  times autocast's speed over a whole sliding window measured side by side. Its labels agreed with float32's as well as
  autocast's did (on the CT-fitted U-Net 0.99997 against 0.99996; on the untrained one 0.9977 against 0.9972).
  Low precision is never checked here: the engine's auto precision measures it on each input, as for autocast.
  The engine's auto backend uses it on a CPU with fast bf16 (AMX or AVX-512-BF16) since session 14: it holds
  about 75 MiB more than autocast between runs, with the same peak (see :mod:`medseg.inference`).

The answer stays PyTorch's to within float32 rounding. OpenVINO sums in a different order, so the logits differ by
about 2e-4 of their range on that U-Net, and 2 voxels in 100 000 changed label on a random window.

* **Conversion** traces the network once for its channels and window, with a dynamic window batch (about 3 s
  for that U-Net) and, where the network converts so, dynamic spatial dimensions. float32 is compiled from a copy
  reshaped to the window (as fast as a conversion for that shape alone; its check measured that compilation).
  bf16 is compiled once with the dynamic spatial dimensions, and that one compilation runs the window and the
  engine's trial crops alike: as fast per window as a compilation for the window alone (0.035 to 0.044 s either
  way), with the same outputs, and one compilation's memory instead of two (a 256x256x160 CT's end-to-end runs, 6
  in one process: peak 455 -> 422 MiB, held between runs 304 -> 207 MiB, medians). A network converted for its
  window alone is compiled for each shape it can be reshaped to. The result is kept in memory for the life of the
  network object. It is also kept on disk
  under :func:`cache_dir` ``/openvino/<key>``, so the next process reads it in 0.06 s instead. The key is the
  SHA-256 of:
  - the network's structure (its ``repr``) and every weight;
  - the input shape;
  - the OpenVINO and PyTorch versions, and the version of the rewrites below.
  A changed weight, window or library version gives a new key. The :data:`MAX_CACHED_NETWORKS` most recently
  used are kept.
* **Rewrites.** The network converted is :func:`medseg.rewrite.for_cpu`'s: the same function, with its
  few-channel transposed convolutions computed as sub-pixel convolutions and its conv-only identity residuals
  folded into their convolutions (0.061 -> 0.053 s per window on that U-Net).
* **Checks.** A freshly converted network runs a seeded window next to PyTorch before it is used or cached:
  - the logits must agree within :data:`RELATIVE_TOLERANCE` of their range;
  - at least :data:`MIN_AGREEMENT` of the labels must match.

  This catches a trace that dropped data-dependent control flow. The check also records OpenVINO's rounding: the
  largest change of a top-class logit margin (:attr:`OpenVINONetwork.bound`) and the labels it changed per voxel
  within that bound of a tie. The engine counts, after each OpenVINO run, the voxels within the bound of a tie and
  redoes the run in PyTorch when too many could differ: on a CT's flat regions an untrained 105-class DynUNet's
  near ties flip together (1.3 % of its labels at 128^3 windows), where the noise window showed 0.03 %. A cached
  copy is read only if its files still have the SHA-256s recorded when it was written, and carries the check's
  figures in its manifest.
* **Fallback.** When OpenVINO is not installed, the network does not convert or the check fails,
  :func:`openvino_network` raises :class:`BackendUnavailableError`; the engine then runs the windows in PyTorch and
  puts the reason in the run's notes. A cache that cannot be written only logs a warning: the next process
  converts again.

``pip install openvino`` installs it (in Slicer: ``slicer.util.pip_install("openvino")``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import rewrite
from .models.folder import sha256_of

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino")
#: What :func:`openvino_network` can compile a network to compute in.
PRECISIONS = ("f32", "bf16")
#: Largest |OpenVINO - PyTorch| logit difference allowed, as a fraction of the logits' range, on the check window.
RELATIVE_TOLERANCE = 1e-3
#: Fraction of the check window's labels that must match PyTorch's.
MIN_AGREEMENT = 0.999
#: Converted networks kept on disk; the least recently used beyond this many are deleted when one is added.
MAX_CACHED_NETWORKS = 16
_MANIFEST = "manifest.json"
#: What :func:`_convert` does to a network before converting it; part of the cache key.
_REWRITES = (
    "subpixel-transposed-convolutions-1, folded-identity-residuals-1, phase-space-tail-2, skip-into-tail-1, "
    "dynamic-spatial-dimensions-1"
)

_memory: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # network -> (state, _Converted)
_lock = threading.Lock()


class BackendUnavailableError(RuntimeError):
    """OpenVINO cannot run this network here; the message says why."""


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except Exception as error:  # ImportError, or a broken install's OSError from its native libraries
        logger.debug("OpenVINO cannot be imported: %s", error)
        return False
    return True


def cache_dir() -> Path:
    """``$MEDSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/medseg``, else ``~/.cache/medseg``."""
    if os.environ.get("MEDSEG_CACHE_DIR"):
        return Path(os.environ["MEDSEG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medseg"


class OpenVINONetwork:
    """A network compiled by OpenVINO for (batch, channels, *window) float32 input; call it like the network."""

    def __init__(self, compiled, threads: int, source: str, precision: str = "f32"):
        self.compiled = compiled
        self.threads = threads
        self.source = source  #: "converted" or "cache": how it was obtained
        self.precision = precision  #: what OpenVINO computes in: "f32", or "bf16" (measured by the engine's trial)
        #: the largest change of a top-class logit margin against PyTorch on the check window, and the labels that
        #: changed there per voxel within that bound of a tie: the engine's after-run estimate of OpenVINO's effect
        self.bound = 0.0
        self.flips_per_risk = 0.0
        self._request = compiled.create_infer_request()
        self._request_lock = threading.Lock()  # one request: calls from several threads take turns
        self._fixed_shape = _fixed_output_shape(compiled)  #: one window's output shape, where compiled for one
        self._shapes: dict[tuple, tuple] = {}  # window shape -> output shape, compiled for any window shape

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of a window batch. The windows run one at a time: OpenVINO is as fast per window at a batch of
        1 as of 2 (unlike PyTorch on the CPU), and its working memory is then one window's."""
        array = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        with self._request_lock:  # OpenVINO refuses a request already running ("Infer Request is busy")
            return self._run(array)

    def release_memory(self) -> None:
        """Give the windows' working memory back until the next call, which allocates it again.

        OpenVINO keeps a request's intermediate tensors between calls: for the U-Net's 96^3 windows in bf16, 57 MiB,
        of which dropping the request and :meth:`openvino.CompiledModel.release_memory` return 36 MiB (the rest
        stays with the compiled network). The engine calls this once a volume's windows are done, so the blending's
        last slab and the labels' restoring do not sit on top of it.
        """
        with self._request_lock:
            self._request = None
            release = getattr(self.compiled, "release_memory", None)  # not in every OpenVINO this supports
            if release is not None:
                release()

    def _run(self, array: np.ndarray) -> torch.Tensor:
        import openvino

        if self._request is None:
            self._request = self.compiled.create_infer_request()
        request = self._request
        first = None
        shape = self._fixed_shape or self._shapes.get(array.shape[1:])
        if shape is None:  # a network compiled for any window shape, first run on this one: its output says
            # into a tensor of OpenVINO's (it grows to fit), not the last call's logits, which the caller holds
            request.set_output_tensor(0, openvino.Tensor(openvino.Type.f32, openvino.Shape([0] * array.ndim)))
            first = request.infer({0: array[:1]}, share_inputs=True)[0]
            shape = self._shapes[array.shape[1:]] = tuple(first.shape[1:])
        out = np.empty((len(array), *shape), dtype=np.float32)
        if first is not None:
            out[0] = first[0]
        for index in range(0 if first is None else 1, len(array)):  # each window read in place, written into out
            request.set_output_tensor(0, openvino.Tensor(out[index : index + 1], shared_memory=True))
            request.infer({0: array[index : index + 1]}, share_inputs=True, share_outputs=True)
        return torch.from_numpy(out)


def _fixed_output_shape(compiled) -> tuple | None:
    """The (channels, *spatial) of one window's output where the compilation fixes it, else None."""
    shape = compiled.outputs[0].get_partial_shape()
    if shape.rank.is_static and all(d.is_static for d in list(shape)[1:]):
        return tuple(d.get_length() for d in list(shape)[1:])
    return None


def _key(network: torch.nn.Module, input_shape: Sequence[int], head=None) -> str:
    import openvino

    digest = hashlib.sha256()
    for part in (repr(network), str(tuple(input_shape)), openvino.__version__, torch.__version__, _REWRITES):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    tensors = list(network.state_dict().items())
    if head is not None:  # its check bound is in the head's logits
        tensors += [(f"head.{name}", t) for name, t in (("weight", head.weight), ("bias", head.bias)) if t is not None]
    for name, tensor in tensors:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def _compile(model, threads: int, precision: str = "f32"):
    import openvino

    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    try:
        return openvino.Core().compile_model(model, "CPU", config)
    except Exception as error:  # OpenVINO raises RuntimeError and others; each means "cannot run it here"
        raise BackendUnavailableError(f"OpenVINO could not compile the network: {_first_line(error)}") from error


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_cached(folder: Path):
    """The cached model in ``folder`` and its check's ``(bound, flips_per_risk)`` if its files are whole and
    unchanged, else None."""
    import openvino

    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return None
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
        for name, expected in recorded["sha256"].items():
            if sha256_of(folder / name) != expected:
                raise ValueError(f"{folder / name} does not match its recorded SHA-256")
        check = (float(recorded["check"]["bound"]), float(recorded["check"]["flips_per_risk"]))
        model = openvino.Core().read_model(str(folder / "model.xml"))
        os.utime(folder)  # recently used: the last to be pruned
        return model, check
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        logger.warning("ignoring the cached OpenVINO model in %s: %s", folder, error)
        return None


def _write_cache(model, folder: Path, check: tuple[float, float]) -> str | None:
    """Save ``model`` into ``folder`` atomically (a temporary sibling renamed into place); a reason on failure."""
    import openvino

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            openvino.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
            files = {name: sha256_of(staging / name) for name in ("model.xml", "model.bin")}
            bound, flips_per_risk = check
            manifest = {"sha256": files, "check": {"bound": bound, "flips_per_risk": flips_per_risk}}
            (staging / _MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    # OSError, and OpenVINO's RuntimeError from save_model (a full disk: "basic_ios::clear: iostream error"): the
    # network converted and checked, so the run goes on; only the next process converts it again
    except Exception as error:
        reason = " ".join(str(error).split()) or type(error).__name__  # OpenVINO's says where first, then what
        return f"could not cache the OpenVINO model in {folder}: {reason}"
    _prune(folder.parent, keep=MAX_CACHED_NETWORKS)
    return None


def _prune(cache: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently used converted networks (and staging folders left by a crash)."""
    entries = []
    try:
        paths = list(cache.iterdir())
    except OSError as error:  # the cache folder went or became unreadable: nothing to prune, nothing lost
        logger.warning("could not prune the OpenVINO cache in %s: %s", cache, error)
        return
    for path in paths:
        try:
            entries.append((path.stat().st_mtime, path))
        except OSError:  # removed meanwhile by another process
            continue
    entries.sort(reverse=True)
    for _, path in entries[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def _check(network: torch.nn.Module, compiled: OpenVINONetwork, input_shape: Sequence[int], head=None):
    """Compare OpenVINO with PyTorch on a seeded window; raise :class:`BackendUnavailableError` when they differ.

    Compares logits (``head`` turns a network's features into them). Returns ``(bound, flips_per_risk)``: the
    largest change of a top-class margin, and the labels that changed per voxel within that bound of a tie.
    """
    generator = torch.Generator().manual_seed(20260101)
    window = torch.randn((1, *input_shape), generator=generator)
    with torch.inference_mode():
        expected = network(window).float()
    try:
        got = compiled(window)
    except Exception as error:  # OpenVINO's runtime errors: this network cannot run there
        raise BackendUnavailableError(f"OpenVINO could not run the network: {_first_line(error)}") from error
    if head is not None and got.shape == expected.shape:
        with torch.inference_mode():
            expected, got = head(expected), head(got)
    if got.shape != expected.shape:
        raise BackendUnavailableError(f"OpenVINO returned shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    scale = float(expected.max() - expected.min()) or 1.0
    difference = float((got - expected).abs().max()) / scale
    agreement = float((got.argmax(1) == expected.argmax(1)).float().mean())
    if difference > RELATIVE_TOLERANCE or agreement < MIN_AGREEMENT:
        raise BackendUnavailableError(
            f"OpenVINO's result differs from PyTorch's on a check window (largest difference {difference:.2e} of "
            f"the logit range, {agreement:.4%} of labels equal)"
        )
    from .inference import compare_logits  # the engine's measure of a precision's error (imported here: no cycle)

    rounding = compare_logits(expected, got)
    return rounding.bound, rounding.flips_per_risk


def openvino_network(
    network: torch.nn.Module,
    input_shape: Sequence[int],
    *,
    threads: int | None = None,
    use_disk: bool = True,
    head=None,
    precision: str = "f32",
    converted_for: Sequence[int] | None = None,
) -> OpenVINONetwork:
    """``network`` compiled by OpenVINO for float32 windows of ``input_shape`` (channels, *window), on the CPU.

    ``head``: where ``network`` returns features that a pointwise head turns into logits (the engine's feature
    blending), that head, so that the check compares logits.

    ``precision``: ``"f32"``, or ``"bf16"``: the same converted and checked network compiled to compute in
    bfloat16 (AMX on this CPU; float32 inputs, outputs and accumulation). A low precision's error is the caller's
    to measure, as for PyTorch's autocast: the engine's auto precision does, on each input.

    ``converted_for``: for a low precision only, the (channels, *window) to convert for (or read from the cache)
    when ``input_shape`` differs: the converted network is then reshaped to ``input_shape`` (the engine's trial
    crops), which only the caller's comparison checks.

    Raises:
        BackendUnavailableError: OpenVINO is missing, or the network does not convert, fails the check or cannot
            be compiled for that shape and precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown OpenVINO precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    input_shape = tuple(int(v) for v in input_shape)
    window = tuple(int(v) for v in converted_for) if converted_for is not None else input_shape
    if window != input_shape and precision == "f32":
        raise ValueError("a float32 network is compiled for the window it was converted and checked for")
    threads = threads or torch.get_num_threads()
    with _lock:
        converted = _converted(network, window, threads, use_disk, head)
        key = (input_shape, precision)
        if precision != "f32" and _spatially_dynamic(converted.model):
            key = (None, precision)  # one compilation for the window and the trial's crops: the memory of one
        if key not in converted.compiled:
            model = converted.model if key[0] is None else _for_shape(converted.model, input_shape)
            compiled = OpenVINONetwork(_compile(model, threads, precision), threads, converted.source, precision)
            compiled.bound, compiled.flips_per_risk = converted.check
            converted.compiled[key] = compiled
        return converted.compiled[key]


def openvino_model(network: torch.nn.Module, input_shape: Sequence[int], *, head=None, use_disk: bool = True):
    """``network`` converted for windows of ``input_shape`` and checked (or read from the cache), compiling
    nothing that was not needed for the check: what :func:`openvino_network` then compiles for a precision.

    Raises:
        BackendUnavailableError: as :func:`openvino_network`.
    """
    input_shape = tuple(int(v) for v in input_shape)
    with _lock:
        return _converted(network, input_shape, torch.get_num_threads(), use_disk, head).model


@dataclass
class _Converted:
    """A network converted for one window and checked: the model, the check's ``(bound, flips_per_risk)``, how it
    was obtained, and its compiled networks by (input shape, precision)."""

    model: object
    check: tuple[float, float]
    source: str
    compiled: dict = field(default_factory=dict)


def _converted(network, window, threads, use_disk, head) -> _Converted:
    """The held conversion of ``network`` for ``window``, else the disk cache's, else a fresh conversion (checked
    against PyTorch, then cached). Called under ``_lock``."""
    if not openvino_available():
        raise BackendUnavailableError(
            'OpenVINO is not installed (pip install openvino; in Slicer: slicer.util.pip_install("openvino"))'
        )
    # in memory, keyed by where the weights are and their in-place-change counters: no hashing on a repeat run
    state = (rewrite.weights_state(network), window, threads)
    held = _memory.get(network)
    if held is not None and held[0] == state:
        return held[1]
    folder = cache_dir() / "openvino" / _key(network, window, head)
    cached = _read_cached(folder) if use_disk else None
    if cached is not None:
        model, check = cached
        converted = _Converted(model, check, "cache")
    else:
        logger.info("converting the network for OpenVINO (once per model and window; cached in %s)", folder)
        model, windowed = _convert(network, window)
        compiled = OpenVINONetwork(_compile(windowed, threads), threads, "converted")
        check = compiled.bound, compiled.flips_per_risk = _check(network, compiled, window, head)
        if use_disk and (reason := _write_cache(model, folder, check)):
            logger.warning(reason)
        converted = _Converted(model, check, "converted", {(window, "f32"): compiled})
    _memory[network] = (state, converted)  # older weights or windows of this network are not run again
    return converted


def _convert(network: torch.nn.Module, input_shape: Sequence[int], spatially_dynamic: bool = True):
    """The network converted with a dynamic window batch and, where it converts so (and ``spatially_dynamic``),
    dynamic spatial dimensions; else static ones. Returns the model and its copy for ``input_shape`` (the model
    itself when static)."""
    import openvino

    example = torch.zeros((1, *input_shape))
    rewritten = rewrite.for_cpu(network)
    dynamic = [(-1, input_shape[0], *(-1 for _ in input_shape[1:]))]
    # tracing records autograd history, which inference tensors refuse: leave any enclosing inference mode
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values frozen into the graph
        if spatially_dynamic:
            try:
                model = openvino.convert_model(rewritten, example_input=example, input=dynamic)
                return model, _for_shape(model, input_shape)  # its shapes must infer for the window
            except Exception as error:  # a shape the network fixes (a transformer's patches): for the window
                logger.debug("OpenVINO converts the network for its window only: %s", _first_line(error))
        try:
            model = openvino.convert_model(rewritten, example_input=example, input=[(-1, *input_shape)])
            return model, model
        except Exception as error:  # the converter raises many types; each means "cannot run this network"
            raise BackendUnavailableError(f"OpenVINO could not convert the network: {_first_line(error)}") from error


def _spatially_dynamic(model) -> bool:
    """Whether ``model`` was converted with dynamic spatial dimensions (it then runs any window shape)."""
    return any(not d.is_static for d in list(model.inputs[0].get_partial_shape())[2:])


def _for_shape(model, input_shape: Sequence[int]):
    """``model`` for (batch, *input_shape) input: itself where its input already has that shape, else a reshaped
    copy (float32's window, or a network converted for its window alone reshaped to the trial's crops)."""
    wanted = [-1, *input_shape]
    if [d.get_length() if d.is_static else -1 for d in model.inputs[0].get_partial_shape()] == wanted:
        return model
    reshaped = model.clone()
    try:
        reshaped.reshape({reshaped.inputs[0]: wanted})
    except Exception as error:  # OpenVINO raises RuntimeError and others: a shape frozen in the conversion
        raise BackendUnavailableError(
            f"OpenVINO could not reshape the network to {tuple(input_shape)}: {_first_line(error)}"
        ) from error
    return reshaped
