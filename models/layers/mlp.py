"""Mix-FFN: Linear -> depthwise 3x3 conv -> GELU -> Linear, over tokens on a (H, W) grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DepthwiseConv(nn.Module):
    """3x3 depthwise conv applied to tokens. Wrapped so the parameter is named `dwconv.dwconv`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        B, _, C = x.shape
        grid = x.transpose(1, 2).reshape(B, C, height, width)  # B, C, H, W
        return self.dwconv(grid).flatten(2).transpose(1, 2)  # B, N, C


class MixFFN(nn.Module):
    """The feed-forward of EDAFormer blocks.

    Args:
        dim: input and output channels.
        hidden_dim: channels after fc1.
        relu_after_fc1: the encoder's variant (inherited from PVTv2-Li `linear=True`) adds a ReLU after
            fc1, so its MLP has both ReLU and GELU; the decoder's does not.
    """

    def __init__(self, dim: int, hidden_dim: int, *, relu_after_fc1: bool) -> None:
        super().__init__()
        self.relu_after_fc1 = relu_after_fc1
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DepthwiseConv(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.fc1(x)
        if self.relu_after_fc1:
            x = F.relu(x)
        x = F.gelu(self.dwconv(x, height, width))  # exact erf GELU, as nn.GELU() upstream
        return self.fc2(x)
