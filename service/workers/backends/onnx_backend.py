"""ONNX Runtime backend: one exported graph per knob level (or one taking the knob as an input).

Graphs come from `models.onnx_cache` (exported once per model, weights and level, parity-checked, and reused
on restart and by `segserve bench`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from models.datasets import DatasetInfo
from service.workers.backends.base import Backend

log = logging.getLogger(__name__)


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, paths: list[Path], pipeline: DatasetInfo, device: str = "cpu", threads: int | None = None):
        from models.onnx_runner import OnnxRunner

        super().__init__(pipeline)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else None
        self.runner = OnnxRunner(paths, providers=providers, intra_op_threads=threads)

    def forward_with_stats(self, images: torch.Tensor, **knob: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.runner.forward_with_stats(images, **knob)
