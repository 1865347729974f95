"""nnU-Net-style DynUNet planning from a dataset's headers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from medseg.models.architectures import build_network
from medseg.segmenter import Segmenter
from test_training import make_dataset, write_config

from training.plan import plan_dynunet, plan_layers
from training.train import load_config, train


def _headers(tmp_path, size, spacing, n=3):
    paths = []
    for i in range(n):
        image = sitk.Image(list(size), sitk.sitkUInt8)
        image.SetSpacing(spacing)
        path = tmp_path / f"h{i}.nii.gz"
        sitk.WriteImage(image, str(path))
        paths.append(path)
    return paths


def test_isotropic_data_pools_every_axis_down_to_a_few_voxels():
    kernels, strides = plan_layers((1.0, 1.0, 1.0), (128, 128, 128))
    assert strides == [[1, 1, 1]] + [[2, 2, 2]] * 5  # 128 -> 4
    assert all(k == [3, 3, 3] for k in kernels) and len(kernels) == len(strides)


def test_anisotropic_data_pools_in_plane_first_with_flat_kernels():
    kernels, strides = plan_layers((0.8, 0.8, 3.0), (160, 160, 40))
    assert kernels[0] == [3, 3, 1] and strides[1] == [2, 2, 1], "z (3 mm) is too coarse to pool at first"
    assert [2, 2, 2] in strides, "once in-plane spacing reaches z's, all axes pool"
    total = np.prod(np.array(strides), axis=0)
    assert 40 / total[2] >= 4 and 160 / total[0] >= 4, "no feature map below 4 voxels"


def test_plan_from_headers_fits_the_budget_and_builds_a_working_network(tmp_path):
    paths = _headers(tmp_path, (200, 180, 40), (0.7, 0.7, 3.5))
    plan = plan_dynunet(paths, max_patch_voxels=96 * 96 * 32)
    assert plan["spacing"] == [0.7, 0.7, 3.5] and plan["median_shape"] == [200.0, 180.0, 40.0]
    assert np.prod(plan["patch_size"]) <= 96 * 96 * 32
    total = np.prod(np.array(plan["kwargs"]["strides"]), axis=0)
    assert all(p % t == 0 for p, t in zip(plan["patch_size"], total))
    network = build_network("DynUNet", in_channels=1, out_channels=3, kwargs=plan["kwargs"])
    with torch.no_grad():
        out = network(torch.zeros(1, 1, *plan["patch_size"]))
    assert tuple(out.shape) == (1, 3, *plan["patch_size"])


def test_hippocampus_like_crops_get_nnunets_patch(tmp_path):
    paths = _headers(tmp_path, (36, 50, 35), (1.0, 1.0, 1.0))
    plan = plan_dynunet(paths, max_patch_voxels=48 * 64 * 48)
    assert plan["patch_size"] == [40, 56, 40]  # nnU-Net's 3d_fullres patch for MSD Task04


def test_a_card_spacing_overrides_the_median(tmp_path):
    paths = _headers(tmp_path, (100, 100, 50), (1.0, 1.0, 2.0))
    plan = plan_dynunet(paths, spacing=(2.0, 2.0, 2.0), max_patch_voxels=64**3)
    assert plan["spacing"] == [2.0, 2.0, 2.0] and plan["median_shape"] == [50.0, 50.0, 50.0]
    assert plan["kwargs"]["kernel_size"][0] == [3, 3, 3]


@pytest.mark.slow
def test_training_with_the_dynunet_plan_writes_a_card_the_engine_runs(tmp_path):
    dataset = make_dataset(tmp_path / "toy")
    config = load_config(write_config(tmp_path, dataset, plan="dynunet", epochs=2, patch_size=[16, 16, 16]))
    folder = train(config)
    card = json.loads((folder / "model.json").read_text())
    assert card["network"]["architecture"] == "DynUNet"
    assert card["inference"]["roi_size"] == card["training"]["plan"]["patch_size"]
    assert card["training"]["config"]["patch_size"] == card["training"]["plan"]["patch_size"]
    image = sitk.ReadImage(str(dataset / "imagesTr" / "case_000.nii.gz"))
    assert Segmenter(folder, device="cpu").segment(image).labelmap.GetSize() == image.GetSize()


@pytest.mark.slow
def test_deep_supervision_trains_extra_outputs_and_the_engine_uses_the_full_resolution_one(tmp_path):
    import torch
    from medseg.models.folder import load_model_folder

    dataset = make_dataset(tmp_path / "toy")
    common = {"plan": "dynunet", "epochs": 8, "patch_size": [16, 16, 16], "plan_filters": [8, 32]}
    folders = {
        heads: train(
            load_config(
                write_config(
                    tmp_path, dataset, output=str(tmp_path / f"ds{heads}" / "m"), **common, deep_supervision=heads
                )
            )
        )
        for heads in (0, 1)
    }
    cards = {heads: json.loads((folder / "model.json").read_text()) for heads, folder in folders.items()}
    kwargs = cards[1]["network"]["kwargs"]
    assert kwargs["deep_supervision"] is True and kwargs["deep_supr_num"] == 1
    assert "deep_supervision" not in cards[0]["network"]["kwargs"]
    network = load_model_folder(folders[1]).network
    assert any(name.startswith("heads.") or "deep_supervision" in name for name in network.state_dict())
    with torch.no_grad():
        assert network(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16), "eval: one output"
    dice = {heads: card["training"]["validation"]["mean"] for heads, card in cards.items()}
    for label in ("Bright", "Other"):  # 0.79 / 0.76 with the extra output, 0.57 / 0.69 without, after 8 epochs
        assert dice[1][label] > 0.7, dice
    with pytest.raises(ValueError, match=r"deep_supervision 2: the planned DynUNet has 2 upsamplings"):
        train(load_config(write_config(tmp_path, dataset, **common, deep_supervision=2)))
    with pytest.raises(ValueError, match="deep_supervision needs plan dynunet"):
        load_config(write_config(tmp_path, dataset, deep_supervision=1))


class _Deadline:
    """Fail the block after ``seconds`` (SIGALRM) instead of hanging the suite."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def expire(signum, frame):
            raise TimeoutError(f"still running after {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def test_a_patch_budget_below_the_smallest_patch_is_a_clear_error_not_a_hang(tmp_path):
    paths = _headers(tmp_path, (40, 40, 40), (1.0, 1.0, 1.0))
    with _Deadline(20), pytest.raises(ValueError, match=r"patch budget of 300 voxels .* below .* 8\^3 = 512 voxels"):
        plan_dynunet(paths, max_patch_voxels=300)
    with pytest.raises(ValueError, match=r"config.json: plan dynunet .* voxel budget, and 343 is below"):
        load_config(write_config(tmp_path, tmp_path, plan="dynunet", patch_size=[7, 7, 7]))


def test_a_coarse_axis_at_the_smallest_size_lets_the_others_shrink(tmp_path):
    """10 mm slices, 8 of them: the longest physical axis cannot shrink below 8 voxels, so the others must."""
    paths = _headers(tmp_path, (100, 100, 8), (1.0, 1.0, 10.0))
    with _Deadline(20):
        plan = plan_dynunet(paths, max_patch_voxels=20_000)
    assert np.prod(plan["patch_size"]) <= 20_000 and plan["patch_size"][2] == 8
