"""MedSeg engine: deep-learning segmentation of CT and MRI, without Slicer.

Images go in and out as ``SimpleITK.Image`` so that geometry is never dropped. The stages are modules of pure
functions (:mod:`~medseg.io`, :mod:`~medseg.preprocessing`, :mod:`~medseg.inference`,
:mod:`~medseg.postprocessing`, :mod:`~medseg.metrics`, :mod:`~medseg.models`); :class:`medseg.Segmenter` holds
one loaded model and runs them. Importing this package is cheap: torch and MONAI load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .segmenter import SegmentationResult, Segmenter


def __getattr__(name: str) -> Any:
    if name in ("Segmenter", "SegmentationResult"):
        from . import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")


__all__ = ["Segmenter", "SegmentationResult", "__version__"]
