"""Every allow-listed architecture builds from a card's arguments, keeps the input's size, and can learn.

Each one overfits a tiny synthetic case (a bright ball in noise) in a few dozen steps: a network that cannot is
wired wrong (a broken skip, a lost scale, a head that ignores its input).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from medseg.metrics import dice_per_label
from medseg.models.architectures import ARCHITECTURES, ArchitectureError, build_network

#: SwinUNETR halves the size five times: its deepest instance norm needs at least 2 voxels there.
SHAPE = {"SwinUNETR": (64, 32, 32)}
SMALL = {
    "UNet": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
    "BasicUNet": {"features": [8, 8, 16, 32, 64, 8]},
    "AttentionUnet": {"channels": [8, 16, 32], "strides": [2, 2]},
    "SEUNet": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "se_reduction": 2},
    "SegResNet": {"init_filters": 8},
    "DynUNet": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [8, 16, 32]},
    "UNETR": {"img_size": [32, 32, 32], "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4},
    "SwinUNETR": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]},
    "DeepLab3D": {"channels": [8, 16, 32, 64]},
    "FCN3D": {"channels": [8, 16, 32, 64]},
}


def test_every_allow_listed_architecture_is_covered_here():
    assert set(SMALL) == set(ARCHITECTURES)


def ball_case(shape=(32, 32, 32), seed: int = 0):
    rng = np.random.default_rng(seed)
    grid = np.indices(shape) - (np.array(shape)[:, None, None, None] - 1) / 2
    label = (np.sqrt((grid**2).sum(0)) < min(shape) / 4).astype(np.int64)
    image = label + rng.normal(0, 0.3, label.shape)
    return torch.from_numpy(image[None, None].astype(np.float32)), torch.from_numpy(label[None, None])


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(SMALL))
def test_architecture_keeps_the_size_and_overfits_a_tiny_case(architecture):
    torch.manual_seed(0)
    network = build_network(architecture, in_channels=1, out_channels=2, kwargs=SMALL[architecture])
    shape = SHAPE.get(architecture, (32, 32, 32))
    image, label = ball_case(shape)
    with torch.no_grad():
        assert network.eval()(image).shape == (1, 2, *shape)
    network.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(80):
        optimizer.zero_grad()
        loss = loss_fn(network(image), label[:, 0])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = network.eval()(image).argmax(1)[0].numpy()
    dice = dice_per_label(predicted, label[0, 0].numpy(), [1])[1]
    assert dice > 0.9, f"{architecture}: Dice {dice:.3f} after 80 steps ({time.perf_counter() - start:.1f} s)"


@pytest.mark.parametrize(
    ("architecture", "kwargs", "message"),
    [
        ("DeepLab3D", {"channels": [8, 16]}, "4 encoder widths"),
        ("FCN3D", {"channels": [8, 16, 32]}, "4 encoder widths"),
        ("SEUNet", {"channels": [8, 16], "strides": [2], "colour": 1}, "rejects the keyword arguments"),
    ],
)
def test_bad_arguments_of_the_engines_own_networks_are_clear_errors(architecture, kwargs, message):
    with pytest.raises(ArchitectureError, match=message):
        build_network(architecture, in_channels=1, out_channels=2, kwargs=kwargs)
