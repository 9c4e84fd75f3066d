"""ONNX Runtime backend: one exported graph per ISR level (pools are static kernels in the graph).

Graphs are exported once per (model, weights, level) into a cache directory and reused on restart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from models.datasets import DatasetInfo
from models.isr import IsrConfig, IsrLevel
from service.workers.backends.base import Backend

log = logging.getLogger(__name__)


def export_levels(model: torch.nn.Module, levels: Sequence[IsrLevel], cache_dir: Path, weights_id: str) -> dict:
    """Export (or reuse) one ONNX file per level; returns {IsrConfig: path}."""
    from models.export import export_onnx

    cache_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[IsrConfig, Path] = {}
    for level in levels:
        path = cache_dir / f"{model.meta.name}-{weights_id[:16]}-{level.name}.onnx"
        if not path.exists():
            log.info("exporting %s at level %s to %s", model.meta.name, level.name, path)
            tmp = path.with_suffix(".tmp.onnx")
            export_onnx(model, tmp, level)
            tmp.replace(path)
        paths[level.isr] = path
    return paths


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, paths: dict, dataset: DatasetInfo, device: str = "cpu", threads: int | None = None) -> None:
        from models.onnx_runner import OnnxRunner

        super().__init__(dataset)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else None
        self.runner = OnnxRunner(list(paths.values()), providers=providers, intra_op_threads=threads)

    def logits(self, images: torch.Tensor, isr: IsrConfig) -> torch.Tensor:
        return self.runner(images, isr=isr)
