"""OpenVINO for the float32 windows on the CPU: the same network, run by a faster CPU runtime.

PyTorch's CPU convolutions leave speed unused for 3D U-Nets in float32. OpenVINO's CPU plugin runs the same
network's windows about twice as fast on this project's 2-core Xeon: 0.053 to 0.056 s against 0.10 to 0.11 s per
96^3 window of the 4.8 M-parameter MONAI U-Net, window batch 2 (0.063 s before the rewrites below). In bfloat16
the two are level (0.046 s against 0.048 s). So only float32 windows go to OpenVINO; low-precision windows stay
with PyTorch's autocast.

The answer stays PyTorch's to within float32 rounding. OpenVINO sums in a different order, so the logits differ by
about 2e-4 of their range on that U-Net, and 2 voxels in 100 000 changed label on a random window.

* **Conversion** traces the network once for its channels and window, with a dynamic window batch (about 3 s
  for that U-Net). The result is kept in memory for the life of the network object. It is also kept on disk
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

``pip install "medseg[openvino]"`` installs it.
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
from pathlib import Path

import numpy as np
import torch

from . import rewrite
from .models.folder import sha256_of

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino")
#: Largest |OpenVINO - PyTorch| logit difference allowed, as a fraction of the logits' range, on the check window.
RELATIVE_TOLERANCE = 1e-3
#: Fraction of the check window's labels that must match PyTorch's.
MIN_AGREEMENT = 0.999
#: Converted networks kept on disk; the least recently used beyond this many are deleted when one is added.
MAX_CACHED_NETWORKS = 16
_MANIFEST = "manifest.json"
#: What :func:`_convert` does to a network before converting it; part of the cache key.
_REWRITES = "subpixel-transposed-convolutions-1, folded-identity-residuals-1"

_memory: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # network -> {key: OpenVINONetwork}
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

    def __init__(self, compiled, threads: int, source: str):
        self.compiled = compiled
        self.threads = threads
        self.source = source  #: "converted" or "cache": how it was obtained
        #: the largest change of a top-class logit margin against PyTorch on the check window, and the labels that
        #: changed there per voxel within that bound of a tie: the engine's after-run estimate of OpenVINO's effect
        self.bound = 0.0
        self.flips_per_risk = 0.0
        self._request = compiled.create_infer_request()
        self._shapes: dict[tuple, tuple] = {}  # window shape -> output shape

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of a window batch. The windows run one at a time: OpenVINO is as fast per window at a batch of
        1 as of 2 (unlike PyTorch on the CPU), and its working memory is then one window's."""
        import openvino

        array = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        request = self._request
        out = np.empty((len(array), *self._output_shape(array.shape[1:])), dtype=np.float32)
        for index in range(len(array)):  # OpenVINO reads each window in place and writes its logits into ``out``
            request.set_output_tensor(0, openvino.Tensor(out[index : index + 1], shared_memory=True))
            request.infer({0: array[index : index + 1]}, share_inputs=True, share_outputs=True)
        return torch.from_numpy(out)

    def _output_shape(self, window: tuple) -> tuple:
        """The (channels, *spatial) of one window's output: the compiled network's, else from a run on zeros."""
        if window not in self._shapes:
            shape = self.compiled.outputs[0].get_partial_shape()
            if shape.rank.is_static and all(d.is_static for d in list(shape)[1:]):
                self._shapes[window] = tuple(d.get_length() for d in list(shape)[1:])
            else:
                result = self._request.infer({0: np.zeros((1, *window), dtype=np.float32)})[0]
                self._shapes[window] = tuple(result.shape[1:])
        return self._shapes[window]


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


def _compile(model, threads: int):
    import openvino

    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
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
    except OSError as error:
        return f"could not cache the OpenVINO model in {folder}: {error}"
    _prune(folder.parent, keep=MAX_CACHED_NETWORKS)
    return None


def _prune(cache: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently used converted networks (and staging folders left by a crash)."""
    entries = []
    for path in cache.iterdir():
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
) -> OpenVINONetwork:
    """``network`` compiled by OpenVINO for float32 windows of ``input_shape`` (channels, *window), on the CPU.

    ``head``: where ``network`` returns features that a pointwise head turns into logits (the engine's feature
    blending), that head, so that the check compares logits.

    Raises:
        BackendUnavailableError: OpenVINO is missing, or the network does not convert or fails the check.
    """
    if not openvino_available():
        raise BackendUnavailableError('OpenVINO is not installed (pip install "medseg[openvino]")')
    threads = threads or torch.get_num_threads()
    input_shape = tuple(int(v) for v in input_shape)
    # in memory, keyed by where the weights are and their in-place-change counters: no hashing on a repeat run
    state = rewrite.weights_state(network)
    with _lock:
        held = _memory.setdefault(network, {})
        if (state, input_shape, threads) in held:
            return held[(state, input_shape, threads)]
        folder = cache_dir() / "openvino" / _key(network, input_shape, head)
        cached = _read_cached(folder) if use_disk else None
        source = "cache"
        if cached is None:
            logger.info("converting the network for OpenVINO (once per model and window; cached in %s)", folder)
            model, source = _convert(network, input_shape), "converted"
        else:
            model, check = cached
        compiled = OpenVINONetwork(_compile(model, threads), threads, source)
        if source == "converted":
            check = _check(network, compiled, input_shape, head)
            if use_disk and (reason := _write_cache(model, folder, check)):
                logger.warning(reason)
        compiled.bound, compiled.flips_per_risk = check
        held.clear()  # older weights or windows of this network are not run again
        held[(state, input_shape, threads)] = compiled
        return compiled


def _convert(network: torch.nn.Module, input_shape: Sequence[int]):
    import openvino

    example = torch.zeros((1, *input_shape))
    # tracing records autograd history, which inference tensors refuse: leave any enclosing inference mode
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values frozen into the graph
        try:
            return openvino.convert_model(rewrite.for_cpu(network), example_input=example, input=[(-1, *input_shape)])
        except Exception as error:  # the converter raises many types; each means "cannot run this network"
            raise BackendUnavailableError(f"OpenVINO could not convert the network: {_first_line(error)}") from error
