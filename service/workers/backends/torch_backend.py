"""Eager PyTorch backend (CPU or CUDA)."""

from __future__ import annotations

import torch

from models.datasets import DatasetInfo
from models.isr import IsrConfig
from service.workers.backends.base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: torch.nn.Module, dataset: DatasetInfo, device: str = "cpu") -> None:
        super().__init__(dataset)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        self.device = torch.device(device)
        # The module is shared between workers: its forward keeps no state (ISR is an argument).
        self.model = model.to(self.device).eval()

    def logits(self, images: torch.Tensor, isr: IsrConfig) -> torch.Tensor:
        return self.model(images.to(self.device, non_blocking=True), isr).float().cpu()
