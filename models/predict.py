"""Prediction as the official test pipelines do it.

1. Resize keep-ratio to fit the dataset's scale (ADE20K / COCO-Stuff (2048, 512), Cityscapes (2048, 1024)),
   with OpenCV's bilinear resize as mmcv does; ADE20K and COCO-Stuff then resize each side up to a
   multiple of 32 (AlignedResize).
2. Normalize RGB on the 0-255 scale with the pipeline's mean/std (ImageNet's unless the family says otherwise).
3. Whole-image inference, or Cityscapes' sliding window (1024 crops, stride 768, logits averaged).
4. Logits resized bilinearly to the network input, then to the original size; argmax.

Families differ in steps 1 and 3 (LRFormer aligns to 32 on every dataset, DoViT slides 512 crops): the
model's `ModelSpec.pipelines` override the dataset's reference pipeline (`pipeline_for`). Serving at a
smaller input scale multiplies the keep-ratio scale by a factor; the mask keeps the original size.

`Predictor` runs any callable with the model's call shape `run(images, **knob) -> logits` (the torch
model, or the ONNX Runtime runner), so the service's backends reuse it. Callables that also have
`forward_with_stats` (DoViT's kept-token fractions) report those statistics with the prediction.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from models.datasets import DatasetInfo
from models.postprocess import labels_from_logits, resize_logits
from models.spec import Level, ModelSpec

MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)

LogitsFn = Callable[..., torch.Tensor]  # run(images, **knob) -> logits
Stats = dict[str, torch.Tensor]


def pipeline_for(spec: ModelSpec, dataset: DatasetInfo) -> DatasetInfo:
    """The dataset's test pipeline as this model family runs it (its spec's overrides applied)."""
    overrides = spec.pipeline_overrides(dataset.name)
    return dataclasses.replace(dataset, **overrides) if overrides else dataset


def scaled(scale_pair: tuple[int, int], factor: float) -> tuple[int, int]:
    """A keep-ratio scale (long, short) multiplied by an input-scale factor (1.0 = the reference scale)."""
    return max(1, int(scale_pair[0] * factor + 0.5)), max(1, int(scale_pair[1] * factor + 0.5))


def keep_ratio_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv `rescale_size`: the largest size with the same aspect that fits (long, short) = scale."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def network_input_size(height: int, width: int, dataset: DatasetInfo, scale: float = 1.0) -> tuple[int, int]:
    """The (H, W) the network sees for an image of this size under the test pipeline, at an input scale."""
    resize_scale = dataset.resize_scale if scale == 1.0 else scaled(dataset.resize_scale, scale)
    new_h, new_w = keep_ratio_size(height, width, resize_scale)
    if dataset.align_to:
        align = dataset.align_to
        new_h, new_w = math.ceil(new_h / align) * align, math.ceil(new_w / align) * align
    return new_h, new_w


def preprocess(
    image: np.ndarray,
    input_size: tuple[int, int],
    mean: tuple[float, ...] = MEAN_RGB,
    std: tuple[float, ...] = STD_RGB,
) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalized float (1, 3, h, w) at `input_size` ((x - mean) / std on the 0-255 scale)."""
    if image.shape[:2] != input_size:
        # mmcv resizes with cv2 INTER_LINEAR on uint8; doing the same keeps inputs bit-identical.
        image = cv2.resize(image, (input_size[1], input_size[0]), interpolation=cv2.INTER_LINEAR)
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()  # 3, h, w
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    return ((pixels - mean_t) / std_t).unsqueeze(0)


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


def run_with_stats(run: LogitsFn, images: torch.Tensor, **knob: Any) -> tuple[torch.Tensor, Stats]:
    """`run`'s logits, with its per-image statistics when it reports any."""
    with_stats = getattr(run, "forward_with_stats", None)
    if callable(with_stats):
        return with_stats(images, **knob)
    return run(images, **knob), {}


def slide_logits_with_stats(
    run: LogitsFn, images: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int], **knob: Any
) -> tuple[torch.Tensor, Stats]:
    """Sliding-window logits at the input resolution (each crop's logits resized to the crop, averaged),
    and the statistics averaged over the windows."""
    B, _, height, width = images.shape
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width)
    stats_sum: Stats = {}
    windows = slide_windows(height, width, crop, stride)
    for y1, y2, x1, x2 in windows:
        logits, stats = run_with_stats(run, images[:, :, y1:y2, x1:x2], **knob)
        crop_logits = resize_logits(logits, (y2 - y1, x2 - x1))
        if total is None:
            total = torch.zeros(B, crop_logits.shape[1], height, width)
        total[:, :, y1:y2, x1:x2] += crop_logits
        count[:, :, y1:y2, x1:x2] += 1
        for key, value in stats.items():
            stats_sum[key] = stats_sum[key] + value if key in stats_sum else value.clone()
    assert total is not None  # at least one window always exists
    return total / count, {key: value / len(windows) for key, value in stats_sum.items()}


def slide_logits(
    run: LogitsFn, images: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int], **knob: Any
) -> torch.Tensor:
    """Sliding-window logits at the input resolution: each crop's logits resized to the crop, averaged."""
    return slide_logits_with_stats(run, images, crop, stride, **knob)[0]


def network_logits(
    run: LogitsFn, images: torch.Tensor, pipeline: DatasetInfo, **knob: Any
) -> tuple[torch.Tensor, Stats]:
    """Logits at the input resolution's head stride (whole) or at the input resolution (slide), with stats."""
    if pipeline.test_mode == "slide" and pipeline.slide_crop and pipeline.slide_stride:
        return slide_logits_with_stats(run, images, pipeline.slide_crop, pipeline.slide_stride, **knob)
    return run_with_stats(run, images, **knob)


@dataclass
class Prediction:
    labels: np.ndarray  # (H, W) class ids at the original size
    input_size: tuple[int, int]  # what the network saw
    stats: dict[str, list[float]] = field(default_factory=dict)  # e.g. DoViT's kept-token fraction per tap


class Predictor:
    """Image in, label map out, for one model and test pipeline; reusable and thread-safe.

    Args:
        run: `run(images, **knob) -> logits`, e.g. a registered model in eval mode or an `OnnxRunner`.
        dataset: the test pipeline and classes (see `models.datasets`; `pipeline_for` applies a family's
            overrides).
    """

    def __init__(self, run: LogitsFn, dataset: DatasetInfo) -> None:
        self.run = run
        self.dataset = dataset

    def input_size(self, height: int, width: int, scale: float = 1.0) -> tuple[int, int]:
        return network_input_size(height, width, self.dataset, scale)

    def predict(self, image: np.ndarray, level: Level | None = None, *, scale: float = 1.0, **knob: Any) -> Prediction:
        """RGB uint8 (H, W, 3) -> labels (H, W), at a knob `level` (or keyword knob values) and input scale."""
        if level is not None:
            knob = {**level.kwargs, **knob}
        height, width = image.shape[:2]
        size = self.input_size(height, width, scale)
        batch = preprocess(image, size, self.dataset.mean, self.dataset.std)
        with torch.inference_mode():
            logits, stats = network_logits(self.run, batch, self.dataset, **knob)
            labels = labels_from_logits(logits, size, (height, width))
        summary = {key: [float(v) for v in value[0].reshape(-1)] for key, value in stats.items()}
        return Prediction(labels=labels[0], input_size=size, stats=summary)
