"""The ``Segmenter``: one loaded model, run on images or on files.

Layers, as in nnU-Net's predictor: :meth:`Segmenter.segment_files` (paths in, files out) →
:meth:`Segmenter.segment` (images in, images out) → :func:`medseg.inference.sliding_window_probabilities`
(array in, probabilities out).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch

from . import io
from .errors import InputImageError, MedSegError
from .inference import (
    InferenceOptions,
    InferenceReport,
    low_precision_for,
    mirror_axes_for,
    precision_name,
    release_memory,
    select_device,
    sliding_window_probabilities,
)
from .models.card import ModelCard
from .models.folder import LoadedModel, load_model_folder
from .models.registry import find_model_folder
from .postprocessing import (
    LabelStatistics,
    keep_largest_component,
    label_statistics,
    labels_to_image,
    restore_argmax,
    restore_argmax_on,
    restore_label_array,
    restore_probabilities,
)
from .preprocessing import IndexBox, PhysicalBox, network_array_to_image, preprocess
from .progress import ProgressCallback, RunControl

if TYPE_CHECKING:
    from .graphcut import GraphCutOptions

logger = logging.getLogger(__name__)

#: Probabilities larger than this in float32 are kept in float16 (a 105-class CT at 1.5 mm would need tens of GB).
LARGE_OUTPUT_BYTES = 2**31


@dataclass
class SegmentationResult:
    """A labelmap on the input grid, optionally the per-class probabilities, and what it took."""

    labelmap: sitk.Image
    card: ModelCard
    statistics: list[LabelStatistics]
    probabilities: sitk.Image | None = None  #: vector image, component k = probability of class k (0 background)
    device: str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)
    #: the result is a fast preview at the network's resolution (see :meth:`Segmenter.segment`), not for measurement
    preview: bool = False
    inference: InferenceReport = field(default_factory=InferenceReport)


class Segmenter:
    """Holds one loaded model and runs the stages on it.

    Args:
        model: a model id, a model folder, an already loaded model, or None for the bundled default.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        inference: precision, window batch and test-time mirroring (:class:`medseg.inference.InferenceOptions`).

    Example:
        >>> segmenter = Segmenter("hippocampus-mri", device="cpu")
        >>> result = segmenter.segment(medseg.io.read_image("case.nii.gz"))
        >>> result.statistics[0].volume_ml
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | LoadedModel | None = None,
        *,
        device: str = "auto",
        inference: InferenceOptions | None = None,
    ) -> None:
        self.model = model if isinstance(model, LoadedModel) else load_model_folder(find_model_folder(model))
        self.device = select_device(device)
        self.inference = inference or InferenceOptions()
        try:
            mirror_axes = mirror_axes_for(self.inference, self.card.inference)
        except ValueError as exc:
            raise MedSegError(f"model {self.card.id} ({self.model.folder}): {exc}") from None
        self.inference = replace(self.inference, mirror_axes=mirror_axes)
        self.model.network.to(self.device)

    @property
    def card(self) -> ModelCard:
        return self.model.card

    def _preview_options(self) -> InferenceOptions:
        """A preview's inference: the device's fast precision without the trial, unless one was asked for."""
        precision = self.inference.precision
        if precision == "auto":
            precision = precision_name(low_precision_for(self.device))
        return replace(self.inference, precision=precision, mirror_axes=())  # no mirroring in a preview

    def _restore_labels(self, probabilities, record, report: InferenceReport):
        """Labels on the input grid: on the GPU when inference ran there (K resamplings), else with SimpleITK.

        ``probabilities`` is a NumPy array, or a tensor on the GPU where inference kept it.
        """
        if self.device.type == "cuda":
            try:
                return restore_argmax_on(probabilities, record, self.device)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                message = "GPU out of memory while mapping the result back to the input grid; doing it on the CPU"
                logger.warning(message)
                report.notes.append(message)
        if isinstance(probabilities, torch.Tensor):
            probabilities = probabilities.cpu().numpy()
        return restore_argmax(probabilities, record)

    def check_channels(self, images: Sequence[sitk.Image], paths: Sequence[str | Path] | None = None) -> None:
        expected = len(self.card.channels)
        if len(images) != expected:
            names = ", ".join(c.name for c in self.card.channels)
            raise InputImageError(
                paths[0] if paths and len(paths) == 1 else None,
                f"model {self.card.id} needs {expected} input channel(s) ({names}), got {len(images)}",
            )

    def segment(
        self,
        images: sitk.Image | Sequence[sitk.Image],
        *,
        roi: IndexBox | None = None,
        keep_largest: bool = False,
        with_probabilities: bool = False,
        refine: GraphCutOptions | None = None,
        preview: bool = False,
        progress: ProgressCallback | None = None,
        control: RunControl | None = None,
    ) -> SegmentationResult:
        """Segment one case given as images (one per channel, on one grid).

        Args:
            images: the channels in the card's order, on one grid (refused otherwise); a single image for
                single-channel models.
            roi: restrict the work to this box of the input grid; outside it the result is background. A box with
                no voxel on the grid is refused.
            keep_largest: keep only the largest connected component of each label.
            refine: refine the labels by graph cut (:mod:`medseg.graphcut`) on the first channel's intensities.
            with_probabilities: also return the per-class probabilities on the input grid.
            preview: a quick look, marked ``preview``: windows without overlap (fewer of them), the device's fast
                precision without the float32 trial (unless the Segmenter was given a precision), and labels
                taken on the network's grid and mapped to the input by nearest neighbour, so boundaries are at
                the network's resolution (blocky where it is coarser than the input). The network still sees the
                resolution it was trained at: on coarser voxels a model trained at one scale fails (the bundled
                model's Dice falls from 0.88 to 0.20 at 1.5x coarser voxels). Not for measurement.
            progress: ``progress(stage, fraction)`` callback.
            control: carries progress and cancellation (overrides ``progress``).

        Returns:
            A :class:`SegmentationResult` whose labelmap has the input's size, spacing, origin and direction.
        """
        if isinstance(images, _Handover):
            images = images.take()
        else:
            images = [images] if isinstance(images, sitk.Image) else list(images)
        self.check_channels(images)
        for index in range(len(images)):
            io.validate_volume(images[index])
        names = [channel.name for channel in self.card.channels]
        for name, image in zip(names[1:], images[1:]):  # read_channels checks files; images given here, too
            problem = io.grid_mismatch(images[0], image)
            if problem:
                raise InputImageError(
                    None, f"channel {name}: its voxel grid differs from channel {names[0]}'s: {problem}"
                )
        if roi is not None:
            check_roi_overlaps(roi, images[0].GetSize())
        control = control or RunControl(progress=progress)
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        control.report("preprocessing", 0.0)
        on_gpu = self.device if self.device.type == "cuda" else None  # SimpleITK is as fast on the CPU
        notes = []
        try:
            volume, record = preprocess(images, self.card.preprocessing, roi=roi, device=on_gpu)
        except torch.cuda.OutOfMemoryError:
            if on_gpu is None:
                raise
            torch.cuda.empty_cache()
            notes.append("GPU out of memory while resampling the input to the model's spacing; doing it on the CPU")
            logger.warning(notes[-1])
            volume, record = preprocess(images, self.card.preprocessing, roi=roi)
        guide = images[0] if refine is not None else None  # the graph cut's intensities; nothing else needs them
        del images
        release_memory()
        seconds["preprocessing"] = time.perf_counter() - start

        start = time.perf_counter()
        report = InferenceReport(notes=notes)
        maps = with_probabilities or refine is not None
        # Labels straight from the blended logits, slab by slab, where they need no interpolation: a preview (nearest
        # neighbour by design), or a network grid that is the input's up to axis order and flips (the same labels as
        # interpolating the class maps, which then reproduces them voxel for voxel)
        labels_only = not maps and (preview or not record.resampled)
        probabilities = sliding_window_probabilities(
            self.model.network,
            volume,
            replace(self.card.inference, overlap=0.0) if preview else self.card.inference,
            device=self.device,
            control=control,
            options=self._preview_options() if preview else self.inference,
            out_dtype=np.float16 if self.card.num_classes * volume[0].size * 4 > LARGE_OUTPUT_BYTES else np.float32,
            report=report,
            keep_on_device=not maps,  # only labels come back from the GPU, not K maps
            labels_only=labels_only,
        )
        del volume
        release_memory()
        seconds["inference"] = time.perf_counter() - start

        start = time.perf_counter()
        control.report("postprocessing", 0.0)
        restored = None
        if maps:
            restored = restore_probabilities(probabilities, record)
            if preview:  # a preview's labels stay the network grid's, nearest neighbour, with or without the maps
                labels = restore_label_array(probabilities.argmax(0).astype(np.uint8), record)
            else:
                labels = restored.argmax(0).astype(np.uint8)
        elif labels_only:  # labels on the network grid, nearest neighbour to the input's
            network_labels = probabilities.cpu().numpy() if isinstance(probabilities, torch.Tensor) else probabilities
            labels = restore_label_array(network_labels, record)
        else:  # one class at a time: the input-grid memory is one channel, its running maximum and the labels
            labels = self._restore_labels(probabilities, record, report)
        del probabilities
        seconds["postprocessing"] = time.perf_counter() - start
        if refine is not None:
            start = time.perf_counter()
            control.report("refining", 0.0)
            labels = _refined_labels(guide, restored, [label.value for label in self.card.labels], refine)
            seconds["refinement"] = time.perf_counter() - start
            control.report("refining", 1.0)
        start = time.perf_counter()
        if keep_largest:
            labels = keep_largest_component(labels, [label.value for label in self.card.labels])
        labelmap = labels_to_image(labels, record.input_reference)
        probability_image = network_array_to_image(restored, record.input_reference) if with_probabilities else None
        del restored
        release_memory()  # what the run freed goes back to the system, not held until the next case
        seconds["postprocessing"] += time.perf_counter() - start
        control.report("postprocessing", 1.0)
        return SegmentationResult(
            labelmap=labelmap,
            card=self.card,
            statistics=label_statistics(labelmap, {label.value: label.name for label in self.card.labels}),
            probabilities=probability_image,
            device=str(self.device),
            seconds=seconds,
            preview=preview,
            inference=report,
        )

    def segment_files(
        self,
        inputs: Sequence[str | Path],
        output: str | Path,
        *,
        probabilities: str | Path | None = None,
        roi: IndexBox | PhysicalBox | None = None,
        keep_largest: bool = False,
        refine: GraphCutOptions | None = None,
        preview: bool = False,
        control: RunControl | None = None,
    ) -> SegmentationResult:
        """Read the input channels, segment, and write the labelmap (and probabilities) atomically.

        The output format follows the suffix: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` write a labelmap;
        ``.seg.nrrd`` writes a Slicer segmentation with the card's names, colours and terminology (needs
        ``slicer-core``). Outputs are checked before the work starts and written only when it succeeded.
        ``roi`` is a voxel box of the input grid or a physical (LPS mm) box; outside it the result is background.
        A ``preview`` says so in its files: a ``.seg.nrrd``'s segment names end in " (preview)", the other formats
        carry the marks of :func:`medseg.io.write_image` (NIfTI in its ``descrip`` field).
        """
        output = Path(output)
        is_seg_nrrd = io.image_suffix(output) == ".seg.nrrd"
        io.check_output_path(output, suffixes=(*io.WRITABLE_SUFFIXES, ".seg.nrrd"))
        if probabilities is not None:
            io.check_output_path(probabilities)
        io.refuse_overwriting_inputs(inputs, [output] + ([Path(probabilities)] if probabilities is not None else []))
        if is_seg_nrrd:
            writer = seg_nrrd_writer()
        control = control or RunControl()
        control.report("reading", 0.0)
        start = time.perf_counter()
        images = io.read_channels(inputs, channel_names=[c.name for c in self.card.channels])
        orientation = io.read_nifti_orientation(inputs[0], images[0])  # a NIfTI input's qform and sform, as stored
        reading = time.perf_counter() - start
        if isinstance(roi, PhysicalBox):
            try:
                roi = roi.to_index_box(images[0])
            except InputImageError as error:  # the box knows the image, not its file
                raise InputImageError(inputs[0], error.problem) from None
        if roi is not None:
            check_roi_overlaps(roi, images[0].GetSize(), inputs[0])
        handover, images = _Handover(images), None  # segment() drops them after preprocessing, before the network
        result = self.segment(
            handover,
            roi=roi,
            keep_largest=keep_largest,
            with_probabilities=probabilities is not None,
            refine=refine,
            preview=preview,
            control=control,
        )
        result.seconds = {"reading": reading, **result.seconds}
        control.report("writing", 0.0)
        start = time.perf_counter()
        # all outputs or none, and an earlier result under those names stays whole if writing fails: a lone new
        # probability map would look like a result, and a deleted old one would be a loss
        with io.outputs_together():
            if probabilities is not None and result.probabilities is not None:
                io.write_image(result.probabilities, probabilities, orientation=orientation, preview=result.preview)
            if is_seg_nrrd:  # a preview's segments say so in their names, as in the Slicer module
                writer(result.labelmap, self.card, output, nameSuffix=io.PREVIEW_NAME_SUFFIX if result.preview else "")
            else:
                io.write_image(result.labelmap, output, orientation=orientation, preview=result.preview)
        result.seconds["writing"] = time.perf_counter() - start
        control.report("writing", 1.0)
        return result


def check_roi_overlaps(roi: IndexBox, size: Sequence[int], path: str | Path | None = None) -> None:
    """Refuse a region of interest with no voxel on a grid of ``size`` (x, y, z): clipped to the volume, it would
    become a one-voxel slab at its edge and a result that looks like one.

    Raises:
        InputImageError: naming ``path`` (the first channel's file) where given.
    """
    problem = roi.overlap_problem(size)
    if problem:
        raise InputImageError(path, problem)


class _Handover:
    """Images passed to :meth:`Segmenter.segment` by a caller that keeps no reference to them."""

    def __init__(self, images: list[sitk.Image]) -> None:
        self._images = images

    def take(self) -> list[sitk.Image]:
        images, self._images = self._images, []
        return images


def _refined_labels(image: sitk.Image, probabilities_xyz, labels: Sequence[int], options: GraphCutOptions):
    """Graph-cut labels, (X, Y, Z) like the other stages, from (C, X, Y, Z) probabilities on the input grid."""
    from .graphcut import refine_labelmap

    refined = refine_labelmap(
        sitk.GetArrayViewFromImage(image),
        probabilities_xyz.transpose(0, 3, 2, 1),
        spacing=image.GetSpacing(),
        labels=labels,
        options=options,
    )
    return refined.transpose(2, 1, 0)


def seg_nrrd_writer():
    """Slicer's own ``.seg.nrrd`` writer, from MedSegLib on slicer-core (imported only when asked for)."""
    try:
        from MedSegLib.segmentationio import writeSegNrrd
    except ImportError as exc:
        raise io.OutputError(
            f"writing .seg.nrrd needs Slicer's MRML libraries ({exc}); install them with "
            "'pip install slicer-core', or write .nii.gz / .nrrd instead"
        ) from None
    return writeSegNrrd
