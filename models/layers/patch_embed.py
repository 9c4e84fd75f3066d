"""Overlapping patch embedding: a strided conv, then LayerNorm over the flattened tokens."""

from __future__ import annotations

import torch
from torch import nn


class OverlapPatchEmbed(nn.Module):
    """Conv2d(k, stride, padding k//2) + LayerNorm (default eps 1e-5, as upstream).

    Output size is ceil(H / stride) x ceil(W / stride) for the kernel/stride pairs used (7/4, 3/2).
    """

    def __init__(self, in_channels: int, dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """x: (B, C_in, H, W) -> tokens (B, H'*W', dim), H', W'."""
        x = self.proj(x)
        _, _, height, width = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), height, width
