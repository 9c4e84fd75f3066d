"""Prediction as the official test pipelines do it.

1. Resize keep-ratio to fit the dataset's scale (ADE20K / COCO-Stuff (2048, 512), Cityscapes (2048, 1024)),
   with OpenCV's bilinear resize as mmcv does; ADE20K and COCO-Stuff then resize each side up to a
   multiple of 32 (AlignedResize).
2. Normalize RGB with the ImageNet mean/std on the 0-255 scale.
3. Whole-image inference, or Cityscapes' sliding window (1024 crops, stride 768, logits averaged).
4. Logits resized bilinearly to the network input, then to the original size; argmax.

`Predictor` runs any callable with the model's call shape `run(images, isr) -> logits` (the torch
model, or the ONNX Runtime runner), so the service's backends reuse it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from models.datasets import DatasetInfo
from models.isr import IsrConfig
from models.postprocess import labels_from_logits, resize_logits

MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)

LogitsFn = Callable[[torch.Tensor, IsrConfig], torch.Tensor]


def keep_ratio_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv `rescale_size`: the largest size with the same aspect that fits (long, short) = scale."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def network_input_size(height: int, width: int, dataset: DatasetInfo) -> tuple[int, int]:
    """The (H, W) the network sees for an image of this size under the dataset's test pipeline."""
    new_h, new_w = keep_ratio_size(height, width, dataset.resize_scale)
    if dataset.align_to:
        align = dataset.align_to
        new_h, new_w = math.ceil(new_h / align) * align, math.ceil(new_w / align) * align
    return new_h, new_w


def preprocess(image: np.ndarray, input_size: tuple[int, int]) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalized float (1, 3, h, w) at `input_size`."""
    if image.shape[:2] != input_size:
        # mmcv resizes with cv2 INTER_LINEAR on uint8; doing the same keeps inputs bit-identical.
        image = cv2.resize(image, (input_size[1], input_size[0]), interpolation=cv2.INTER_LINEAR)
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()  # 3, h, w
    mean = torch.tensor(MEAN_RGB).view(3, 1, 1)
    std = torch.tensor(STD_RGB).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


def slide_windows(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """mmseg's slide grid: (y1, y2, x1, x2) per window; the last window clamps to the far edge."""
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def slide_logits(
    run: LogitsFn, images: torch.Tensor, isr: IsrConfig, crop: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """Sliding-window logits at the input resolution: each crop's logits resized to the crop, averaged."""
    B, _, height, width = images.shape
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width)
    for y1, y2, x1, x2 in slide_windows(height, width, crop, stride):
        crop_logits = resize_logits(run(images[:, :, y1:y2, x1:x2], isr), (y2 - y1, x2 - x1))
        if total is None:
            total = torch.zeros(B, crop_logits.shape[1], height, width)
        total[:, :, y1:y2, x1:x2] += crop_logits
        count[:, :, y1:y2, x1:x2] += 1
    assert total is not None  # at least one window always exists
    return total / count


@dataclass
class Prediction:
    labels: np.ndarray  # (H, W) class ids at the original size
    input_size: tuple[int, int]  # what the network saw


class Predictor:
    """Image in, label map out, for one model and dataset pipeline; reusable and thread-safe.

    Args:
        run: `run(images, isr) -> logits` at stride 8, e.g. an `EdaFormer` in eval mode.
        dataset: the test pipeline and classes (see `models.datasets`).
    """

    def __init__(self, run: LogitsFn, dataset: DatasetInfo) -> None:
        self.run = run
        self.dataset = dataset

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return network_input_size(height, width, self.dataset)

    def predict(self, image: np.ndarray, isr: IsrConfig | None = None) -> Prediction:
        """RGB uint8 (H, W, 3) -> labels (H, W)."""
        isr = isr or IsrConfig()
        height, width = image.shape[:2]
        size = self.input_size(height, width)
        batch = preprocess(image, size)
        with torch.inference_mode():
            if self.dataset.test_mode == "slide":
                assert self.dataset.slide_crop and self.dataset.slide_stride
                logits = slide_logits(self.run, batch, isr, self.dataset.slide_crop, self.dataset.slide_stride)
            else:
                logits = self.run(batch, isr)
            labels = labels_from_logits(logits, size, (height, width))
        return Prediction(labels=labels[0], input_size=size)
