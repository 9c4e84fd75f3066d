"""mmcv's ConvModule as the segmentation heads use it: 1x1 conv without bias, BatchNorm (eps 1e-5, eval
statistics at inference), ReLU, under mmcv's parameter names (`conv`, `bn`), so official checkpoints load."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBnRelu(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        return F.relu(self.bn(self.conv(x)))
