"""Building served models and their backends: the torch side of start-up, kept in `service/workers/`.

`load_model` creates the network (checkpoint, demo weights or seeded random weights), `backend_factory`
returns what each worker calls to build its own backend, and `gmacs` counts GMACs on the meta device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from models import SegmentationModel, create_model
from models.datasets import DatasetInfo
from models.demo_scenes import demo_weights_path
from models.flops import gmacs_for
from models.spec import Level
from service.workers.backends.base import Backend

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    module: SegmentationModel
    weights: str  # "checkpoint", "demo" or "random"
    weights_id: str  # the checkpoint's sha256, or "random"


def load_model(architecture: str, checkpoint: str | None, dataset: str | None, random_weights: bool) -> LoadedModel:
    """The network in eval mode with its weights: the checkpoint, else demo weights, else seeded random ones."""
    kind = "checkpoint"
    if checkpoint is None and not random_weights:
        demo = demo_weights_path(architecture)
        if demo is not None:
            checkpoint, kind = str(demo), "demo"
            dataset = dataset or "demo"
    if checkpoint is None:
        kind = "random"
        # Same random weights in every replica, so that replicas sharing a Redis cache under the
        # weights id "random" also share the same masks.
        torch.manual_seed(0)
    module = create_model(architecture, checkpoint=checkpoint, dataset=dataset).eval()
    if kind == "demo":
        module.meta.weights = "demo"
    return LoadedModel(module, kind, module.meta.checkpoint_sha256 or "random")


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def versions() -> tuple[str, str]:
    import onnxruntime

    return torch.__version__, onnxruntime.__version__


def gmacs(architecture: str, num_classes: int, shape: tuple[int, int], level: Level) -> float:
    """GMACs of one image at a network input shape (cached; counted on the meta device)."""
    return gmacs_for(architecture, num_classes, shape[0], shape[1], level)


def backend_factory(
    loaded: LoadedModel, pipeline: DatasetInfo, levels: Sequence[Level], *, backend: str, device: str,
    threads: int, onnx_cache_dir: str,
) -> Callable[[], Backend]:
    """What each worker calls to build its backend for this model (ONNX graphs are exported once, here)."""
    if backend == "onnx":
        from models.onnx_cache import cached_graphs
        from service.workers.backends.onnx_backend import OnnxBackend

        paths = cached_graphs(loaded.module, levels, Path(os.path.expanduser(onnx_cache_dir)))
        return lambda: OnnxBackend(paths, pipeline, device, threads)
    from service.workers.backends.torch_backend import TorchBackend

    return lambda: TorchBackend(loaded.module, pipeline, device)
