"""From stride-8 logits to a label map at the original image size.

The reference (mmseg) resizes logits bilinearly (align_corners=False) to the network input size, then
again to the original size, then takes the argmax. A resize to the same size is the identity and is
skipped.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=False; the identity when the size already matches."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def labels_from_logits(logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """(B, K, h, w) logits -> (B, H, W) labels (uint8 when K <= 256, else int32), as the reference."""
    full = resize_logits(resize_logits(logits, input_size), original_size)
    labels = full.argmax(dim=1).numpy()
    return labels.astype(np.uint8 if logits.shape[1] <= 256 else np.int32)
