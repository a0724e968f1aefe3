"""The model and its data: 8x8 images with one bright bar, labelled by its direction."""

import torch
from torch import nn

SIZE = 8


class TinyCNN(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, kernel_size=3, padding=1)
        self.head = nn.Linear(channels, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(images))
        return self.head(features.mean(dim=(2, 3)))


def batch(generator: torch.Generator, size: int, *, augment: bool):
    """`size` images with one bar each (label 0: horizontal, 1: vertical), plus a little noise."""
    labels = torch.randint(0, 2, (size,), generator=generator)
    where = torch.randint(0, SIZE, (size,), generator=generator)
    images = 0.1 * torch.rand(size, 1, SIZE, SIZE, generator=generator)
    for i in range(size):
        if labels[i] == 0:
            images[i, 0, where[i], :] = 1.0
        else:
            images[i, 0, :, where[i]] = 1.0
    if augment:
        shift = int(torch.randint(-1, 2, (1,), generator=generator))
        images = torch.roll(
            images, shifts=shift, dims=2 + int(torch.randint(0, 2, (1,), generator=generator))
        )
    return images, labels
