"""Shared fixtures: paths to real data, small synthetic volumes, and a tiny model folder.

Real data lives beside the project in ``../shared/data`` (or ``$MEDSEG_SHARED_DATA``). Outside CI a test that
needs it is skipped when it is absent; in CI (``CI=true``) that is an error, so a missing mount cannot turn the
real-data tests into silent skips.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO))  # the training package lives at the repository root

from helpers import write_model_folder  # noqa: E402

# converted networks (medseg.backends) are cached here, not in the user's ~/.cache; subprocesses inherit it
os.environ.setdefault("MEDSEG_CACHE_DIR", tempfile.mkdtemp(prefix="medseg-test-cache-"))


def shared_data_dir() -> Path:
    return Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_dir()
    if not (root / "msd_hippocampus" / "dataset.json").is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real data missing at {root}: in CI the real-data tests must run")
        pytest.skip(f"real data not found at {root}")
    return root


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    folder = REPO / "Resources" / "Models" / "hippocampus-mri"
    assert (folder / "model.json").is_file(), "the bundled model is missing from Resources/Models"
    return folder


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    """A valid model folder with an untrained 2-level UNet (1 channel, 2 labels)."""
    return write_model_folder(tmp_path / "tiny-model")


@pytest.fixture
def blob_image() -> sitk.Image:
    """An asymmetric 3D volume (20 x 24 x 16, anisotropic spacing) with a bright off-centre box and noise."""
    rng = np.random.default_rng(0)
    array = rng.normal(100, 5, (16, 24, 20)).astype(np.float32)  # (z, y, x)
    array[4:9, 5:12, 3:8] += 300
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetOrigin((12.0, -30.0, 7.5))
    return image


@pytest.fixture(autouse=True)
def _logging_handlers_of_the_test_only():
    """Commands a test runs in-process (``medseg``, ``medseg-train``) attach logging handlers to the stderr pytest
    captures for that test, which is closed afterwards: remove what a test added, so that a later test's messages do
    not fail against a closed stream ("--- Logging error ---")."""
    loggers = [logging.getLogger(), logging.getLogger("medseg"), logging.getLogger("training")]
    before = [list(logger.handlers) for logger in loggers]
    yield
    for logger, handlers in zip(loggers, before):
        logger.handlers[:] = handlers
