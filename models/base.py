"""What every segserve model is besides its layers: its spec, its meta, and the forward contract.

    logits = model(images, **level.kwargs)                     # (B, 3, H, W) -> (B, K, h, w), before any resize
    logits, stats = model.forward_with_stats(images, **level.kwargs)

`stats` carries per-image figures a family wants the service to show (DoViT: the kept-token fraction per
tap, `(B, taps)`); most families return an empty dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from models.spec import ModelSpec


@dataclass
class ModelMeta:
    """What a served model is: its name, classes and where its weights came from."""

    name: str
    num_classes: int
    dataset: str | None = None
    class_names: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)
    weights: str = "random"  # "random", "checkpoint" or "demo"
    checkpoint_sha256: str | None = None


class SegmentationModel(nn.Module):
    """Base of every registered model: `spec` and `meta` are set by the registry's builder."""

    spec: ModelSpec
    meta: ModelMeta

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    def forward_with_stats(self, images: torch.Tensor, **knob: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The logits and per-image statistics of this forward (none by default)."""
        return self(images, **knob), {}
