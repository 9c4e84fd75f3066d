"""The hierarchical stage loop of the Mix-Transformer encoders (SegFormer's MiT and EDAFormer's encoder).

Both official encoders run four stages the same way: `patch_embed{i}` (overlapping, strided), the stage's
blocks (each told the token grid and the stage's knob value: ISR's pooling ratio or EDAFormer's pool), then
`norm{i}` and back to a (B, C, H, W) map. Only the blocks differ, so the loop lives here once; the attribute
names are the official ones, which the checkpoints use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def run_stages(encoder: nn.Module, images: torch.Tensor, per_stage: Sequence[int]) -> list[torch.Tensor]:
    """images: (B, 3, H, W) -> one feature map (B, C_i, ceil(H/s_i), ceil(W/s_i)) per stage, s_i = 4, 8, 16, 32.

    `per_stage[i - 1]` is passed to every block of stage i with the token grid: `block(tokens, h, w, value)`.
    """
    batch = images.shape[0]
    features = []
    x = images
    for stage, value in enumerate(per_stage, start=1):
        tokens, height, width = getattr(encoder, f"patch_embed{stage}")(x)
        for block in getattr(encoder, f"block{stage}"):
            tokens = block(tokens, height, width, value)
        tokens = getattr(encoder, f"norm{stage}")(tokens)
        x = tokens.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()  # B, C, H, W
        features.append(x)
    return features
