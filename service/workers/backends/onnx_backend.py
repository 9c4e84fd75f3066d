"""ONNX Runtime backend: one exported graph per knob level (or one taking the knob as an input).

Graphs are exported once per (model, weights, level) into the shared ONNX cache directory and reused on
restart and by `segserve export-onnx`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.datasets import DatasetInfo
from models.spec import Level
from service.workers.backends.base import Backend

log = logging.getLogger(__name__)


def export_levels(model: torch.nn.Module, levels: Sequence[Level], cache_dir: Path, weights_id: str) -> list[Path]:
    """Export (or reuse) the graphs that serve `levels`; a runtime-input knob needs one graph for all."""
    from models.export import export_onnx

    cache_dir.mkdir(parents=True, exist_ok=True)
    knob = model.spec.knob
    wanted = [None] if knob is not None and knob.runtime_input else list(levels)
    paths = []
    for level in wanted:
        tag = "knob-input" if level is None else level.name
        path = cache_dir / f"{model.meta.name}-{model.num_classes}c-{weights_id[:16]}-{tag}.onnx"
        if not path.exists():
            log.info("exporting %s at %s to %s", model.meta.name, tag, path)
            tmp = path.with_suffix(".tmp.onnx")
            export_onnx(model, tmp, level)
            tmp.replace(path)
        paths.append(path)
    return paths


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, paths: list[Path], pipeline: DatasetInfo, device: str = "cpu", threads: int | None = None):
        from models.onnx_runner import OnnxRunner

        super().__init__(pipeline)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else None
        self.runner = OnnxRunner(paths, providers=providers, intra_op_threads=threads)

    def forward_with_stats(self, images: torch.Tensor, **knob: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.runner.forward_with_stats(images, **knob)
