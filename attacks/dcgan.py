"""The nets of Ensemble Inversion: DCGAN-style generators (Radford et al. 2016, as DAFL uses), conditional G(z, c)
and unconditional G(z), and the small discriminator of the optional auxiliary-data prior."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _DCGAN(nn.Module):
    """DCGAN-style generator (Radford et al. 2016, as DAFL uses): a linear layer from the latent code (and any
    condition) to a (4w, H/4, W/4) map, two stride-2 transposed convolutions, a sigmoid: images in [0, 1]."""

    def __init__(self, input_shape: tuple[int, int, int], conditions: int, latent_dim: int, width: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.input_shape, self.latent_dim = (c, h, w), latent_dim
        self.h0, self.w0, self.width = math.ceil(h / 4), math.ceil(w / 4), width
        self.fc = nn.Linear(latent_dim + conditions, 4 * width * self.h0 * self.w0)
        self.body = nn.Sequential(
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, c, 4, stride=2, padding=1),
        )

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.body(self.fc(code).view(-1, 4 * self.width, self.h0, self.w0)))
        return x[:, :, : self.input_shape[1], : self.input_shape[2]]


class ConditionalGenerator(_DCGAN):
    """The DCGAN generator conditioned on a one-hot class: G(z, c) (fedsim's variant, not the paper's)."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, latent_dim: int = 100, width: int = 16
    ) -> None:
        super().__init__(input_shape, num_classes, latent_dim, width)
        self.num_classes = num_classes

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], dim=1))


class Generator(_DCGAN):
    """The unconditional DCGAN generator G(z) of DAFL and of the paper: the ensemble decides each image's class."""

    def __init__(self, input_shape: tuple[int, int, int], latent_dim: int = 100, width: int = 16) -> None:
        super().__init__(input_shape, 0, latent_dim, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)


class Discriminator(nn.Module):
    """A small convolutional discriminator: real auxiliary images against generated ones (the optional prior)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)
