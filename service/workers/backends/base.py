"""What a worker asks of a backend: decoded images in, label maps at the original sizes out.

The shared code here preprocesses (resize to the network input, normalize), runs the model's test pipeline
(whole image, or sliding windows) through the backend's forward, and postprocesses (two bilinear resizes and
the argmax) in the worker thread, where the logits already are: the event loop only ever sees uint8 label maps.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.datasets import DatasetInfo
from models.postprocess import labels_from_logits
from models.predict import network_logits, preprocess
from models.spec import Level

Shape = tuple[int, int]


@dataclass
class BatchOutput:
    labels: list[np.ndarray]  # one (H, W) map per item, at its original size
    preprocess_s: float  # resize + normalize of every item
    forward_s: float  # the model itself
    postprocess_s: float  # resize to input and original size + argmax
    stats: dict[str, list[list[float]]] = field(default_factory=dict)  # key -> per item -> values

    @property
    def compute_s(self) -> float:
        return self.preprocess_s + self.forward_s + self.postprocess_s


class Backend(ABC):
    """Runs one model's `forward_with_stats(images, **knob)` somewhere; the shared code does the rest."""

    name = "base"

    def __init__(self, pipeline: DatasetInfo) -> None:
        self.pipeline = pipeline

    precisions: tuple[str, ...] = ("fp32",)  # what this backend can run

    @abstractmethod
    def forward_with_stats(self, images: torch.Tensor, **knob: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, 3, H, W) normalized float -> logits (B, K, h, w) on the CPU, and per-image statistics."""

    def precision_context(self, precision: str) -> contextlib.AbstractContextManager:
        """What makes the forward run at `precision` (fp32: nothing)."""
        if precision not in self.precisions:
            raise ValueError(f"the {self.name} backend cannot run {precision}; it runs {', '.join(self.precisions)}")
        return contextlib.nullcontext()

    def run(self, pixels: Sequence[np.ndarray], shape: Shape, level: Level,
            original_sizes: Sequence[Shape], precision: str = "fp32") -> BatchOutput:
        start = time.perf_counter()
        pipeline = self.pipeline
        images = torch.cat([preprocess(p, shape, pipeline.mean, pipeline.std) for p in pixels])
        prepared = time.perf_counter()
        with torch.inference_mode(), self.precision_context(precision):
            logits, stats = network_logits(self, images, pipeline, **level.kwargs)
            forward_done = time.perf_counter()
            labels = [labels_from_logits(logits[i : i + 1], shape, size)[0] for i, size in enumerate(original_sizes)]
        end = time.perf_counter()
        per_item = {key: [[float(v) for v in value[i].reshape(-1)] for i in range(len(pixels))]
                    for key, value in stats.items()}
        return BatchOutput(labels, prepared - start, forward_done - prepared, end - forward_done, per_item)
