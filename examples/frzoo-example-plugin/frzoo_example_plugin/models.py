"""``example_tinynet``: a residual CNN small enough to train on a CPU in seconds.

What frzoo's partitioner needs from an architecture (docs/plugins.md):
* the root's ``forward`` is exactly its children applied in registration order;
* containers whose children may be cut between are ``nn.Sequential`` (``stage1.1`` is then a
  valid split point) and each of their children is self-contained (a residual block keeps its
  shortcut inside itself);
* the root owns no parameters of its own (everything lives in the children).
frzoo checks the first point on every run: the chained parts must compute exactly what the
whole model computes, or the run is refused.
"""
from __future__ import annotations

import torch
from torch import nn

from frzoo import register_architecture

__all__ = ["Block", "TinyChainNet", "example_tinynet"]


class Block(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels else
                         nn.Conv2d(in_channels, out_channels, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyChainNet(nn.Module):
    """stem -> stage1 (2 blocks) -> stage2 (2 blocks, stride 2) -> pool -> fc."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(Block(width, width), Block(width, width))
        self.stage2 = nn.Sequential(Block(width, 2 * width, stride=2),
                                    Block(2 * width, 2 * width))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exactly the chain of children in registration order: what frzoo's partitioner cuts.
        for module in self.children():
            x = module(x)
        return x


# split_presets: K -> the K-1 modules that start parts 2..K. They are used when a recipe gives
# no split but asks for K parts (split.k, or one device per part in `devices`).
@register_architecture("example_tinynet", split_presets={
    2: ["stage2"],
    3: ["stage1.1", "stage2"],
    4: ["stage1", "stage2", "stage2.1"],
})
def example_tinynet(num_classes: int = 10, in_chans: int = 3, width: int = 8) -> TinyChainNet:
    """Tiny residual CNN (about 11k parameters at width 8); kwargs: num_classes, in_chans, width."""
    return TinyChainNet(num_classes=num_classes, in_chans=in_chans, width=width)
