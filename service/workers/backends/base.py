"""What a worker asks of a backend: one batch in, label maps at the original sizes out."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.datasets import DatasetInfo
from models.isr import IsrConfig
from models.postprocess import labels_from_logits
from models.predict import slide_logits


@dataclass
class BatchOutput:
    labels: list[np.ndarray]  # one (H, W) map per item, at its original size
    forward_s: float  # the model itself
    postprocess_s: float  # resize to input and original size + argmax


class Backend(ABC):
    """Runs `logits(images, isr)` somewhere; the shared code does slide inference and postprocessing.

    Postprocessing (two bilinear resizes and the argmax) happens here, in the worker, where the logits
    already are: the event loop only ever sees uint8 label maps.
    """

    name = "base"

    def __init__(self, dataset: DatasetInfo) -> None:
        self.dataset = dataset

    @abstractmethod
    def logits(self, images: torch.Tensor, isr: IsrConfig) -> torch.Tensor:
        """(B, 3, H, W) normalized float -> (B, K, ceil(H/8), ceil(W/8))."""

    def run(self, images: torch.Tensor, isr: IsrConfig, original_sizes: Sequence[tuple[int, int]]) -> BatchOutput:
        input_size = (int(images.shape[-2]), int(images.shape[-1]))
        start = time.perf_counter()
        with torch.inference_mode():
            if self.dataset.test_mode == "slide" and self.dataset.slide_crop and self.dataset.slide_stride:
                crop, stride = self.dataset.slide_crop, self.dataset.slide_stride
                logits = slide_logits(self.logits, images, crop, stride, isr=isr)
            else:
                logits = self.logits(images, isr)
            forward_done = time.perf_counter()
            labels = [
                labels_from_logits(logits[i : i + 1], input_size, size)[0] for i, size in enumerate(original_sizes)
            ]
        end = time.perf_counter()
        return BatchOutput(labels, forward_done - start, end - forward_done)
