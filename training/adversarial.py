"""Optional adversarial training: a patch discriminator judges (image, segmentation) pairs.

The segmentation network's loss gains ``adversarial_weight`` times a least-squares GAN term that rewards
segmentations the discriminator takes for manual ones. The discriminator (MONAI's ``PatchDiscriminator``, with
instance norm so that every sample is judged alone, as data parallelism needs) learns to tell the network's
softmax from the one-hot reference, each paired with its image. This pushes the network towards shapes that
look like the references, beyond what per-voxel losses see.
"""

from __future__ import annotations

import math

import torch


class Adversary:
    def __init__(
        self, *, weight: float, learning_rate: float, image_channels: int, num_classes: int, patch, device, world
    ):
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        self.weight = weight
        self.num_classes = num_classes
        # each layer halves the patch; keep at least 2 voxels per axis where the last norm sees them
        layers = int(min(3, max(1, math.floor(math.log2(min(patch))) - 3)))
        self.network = PatchDiscriminator(
            spatial_dims=3, channels=16, in_channels=image_channels + num_classes, num_layers_d=layers, norm="INSTANCE"
        ).to(device)
        self.model = self.network
        if world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=learning_rate, betas=(0.5, 0.999))
        self.criterion = PatchAdversarialLoss(criterion="least_squares")

    def generator_loss(self, images: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's adversarial term, and the (image, softmax) pair for the discriminator's step."""
        fake = torch.cat([images, torch.softmax(logits.float(), dim=1)], dim=1)
        self.network.requires_grad_(False)  # the generator's step must not touch the discriminator
        try:
            judged = self.network(fake)[-1]
        finally:
            self.network.requires_grad_(True)
        return self.criterion(judged, target_is_real=True, for_discriminator=False), fake.detach()

    def discriminator_step(self, images: torch.Tensor, labels: torch.Tensor, fake: torch.Tensor) -> float:
        """One step of the discriminator on the network's pairs (fake) and the reference pairs (real)."""
        one_hot = torch.nn.functional.one_hot(labels[:, 0], self.num_classes).permute(0, 4, 1, 2, 3).float()
        real = torch.cat([images, one_hot], dim=1)
        self.optimizer.zero_grad(set_to_none=True)
        judged = self.model(torch.cat([fake, real]))[-1]
        n = fake.shape[0]
        loss = 0.5 * (
            self.criterion(judged[:n], target_is_real=False, for_discriminator=True)
            + self.criterion(judged[n:], target_is_real=True, for_discriminator=True)
        )
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
