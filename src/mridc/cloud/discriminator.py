"""Patch discriminator for adversarial training of the tokenizer decoder (and its feature-matching loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN-style: 4 stride-2 stages, one real/fake logit per ~70x70 patch.

    Returns the logits and the intermediate feature maps, which the generator matches (a feature loss of
    our own: the MobileNetV2 used for evaluation never sees training).
    """

    def __init__(self, width: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2))]
        ch = width
        for i in range(1, n_layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers.append(nn.Sequential(nn.Conv2d(ch, out, 4, stride, 1), nn.GroupNorm(8, out), nn.LeakyReLU(0.2)))
            ch = out
        self.features = nn.ModuleList(layers)
        self.head = nn.Conv2d(ch, 1, 4, 1, 1)

    def forward(self, x):
        feats = []
        for layer in self.features:
            x = layer(x)
            feats.append(x)
        return self.head(x), feats


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """Gradient penalty on real data (Mescheder et al. 2018): keeps the discriminator smooth.

    The penalty is on each image's mean patch logit: summing the patch logits instead would scale it by the
    square of the patch count (~900x900 at 256 px) and flatten the discriminator to a constant.
    """
    per_image = real_logits.flatten(1).mean(1).sum()
    (grad,) = torch.autograd.grad(per_image, real_images, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
