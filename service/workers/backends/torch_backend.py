"""Eager PyTorch backend (CPU or CUDA)."""

from __future__ import annotations

from typing import Any

import torch

from models.datasets import DatasetInfo
from service.workers.backends.base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: torch.nn.Module, pipeline: DatasetInfo, device: str = "cpu") -> None:
        super().__init__(pipeline)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        self.device = torch.device(device)
        # The module is shared between workers: its forward keeps no state (the knob is an argument).
        self.model = model.to(self.device).eval()

    def forward_with_stats(self, images: torch.Tensor, **knob: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, stats = self.model.forward_with_stats(images.to(self.device, non_blocking=True), **knob)
        return logits.float().cpu(), {key: value.cpu() for key, value in stats.items()}
