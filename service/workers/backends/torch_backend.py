"""Eager PyTorch backend (CPU or CUDA)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from models.datasets import DatasetInfo
from service.workers.backends.base import Backend

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TorchBackend(Backend):
    """Eager torch. On CUDA, bf16 and fp16 points run under autocast (matmuls and convolutions in reduced
    precision, reductions and norms in fp32); the logits come back as fp32 for the shared postprocess."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, pipeline: DatasetInfo, device: str = "cpu") -> None:
        super().__init__(pipeline)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        self.device = torch.device(device)
        self.precisions = ("fp32", "bf16", "fp16") if device == "cuda" else ("fp32",)
        # The module is shared between workers: its forward keeps no state (the knob is an argument).
        self.model = model.to(self.device).eval()

    def precision_context(self, precision: str) -> contextlib.AbstractContextManager:
        super().precision_context(precision)  # refuses what this device cannot run
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AUTOCAST_DTYPES[precision])

    def forward_with_stats(self, images: torch.Tensor, **knob: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, stats = self.model.forward_with_stats(images.to(self.device, non_blocking=True), **knob)
        return logits.float().cpu(), {key: value.cpu() for key, value in stats.items()}
