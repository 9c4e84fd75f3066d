"""ONNX Runtime runner with the torch model's call shape: `logits = runner(images, **knob)`.

Each ONNX file from `models.export` holds one level of its model's knob baked in (read back from its
metadata), or takes the knob as a runtime input (DoViT's threshold: one file for every value). The runner
holds one InferenceSession per file and refuses a level it has no graph for:

    runner = OnnxRunner([t_full_path, t_2222_path])
    logits = runner(images, isr=IsrConfig.parse("2222/222"))

An int8 graph (`models.quantize`) runs the same way; its metadata says so (`precision`), and one runner
holds graphs of one precision only.

ORT's `InferenceSession.run` is thread-safe and the runner keeps no other mutable state, so one runner
serves concurrent requests, as the torch model does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from models.export import (
    INPUT_NAME,
    KNOB_INPUT_NAME,
    META_LEVEL,
    META_MODEL,
    META_NUM_CLASSES,
    META_RUNTIME_KNOB,
    STATS_PREFIX,
    read_metadata,
)
from models.spec import Level, ModelSpec

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA}
_RUNTIME = object()  # session key of a graph whose knob is an input
# Written by `models.quantize` on int8 graphs (fp32 graphs carry neither key).
META_PRECISION, META_INT8_RECIPE = "segserve.precision", "segserve.int8_recipe"


class MissingLevelGraphError(LookupError):
    """The runner has no ONNX graph for the requested level."""


@dataclass(frozen=True)
class GraphInfo:
    """What one ONNX file says about itself (from `metadata_props`)."""

    path: Path
    model_name: str
    level: Level | None  # None for a graph whose knob is a runtime input
    num_classes: int | None
    precision: str = "fp32"  # "int8" for graphs from `models.quantize`


def resolve_providers(providers: str | Sequence[str] | None) -> list[str]:
    """ORT provider names from 'cpu' / 'cuda' / full names; CUDA only when this ORT build has it.

    CPU is always appended as the fallback ORT uses for any node the first provider cannot run.
    """
    if providers is None:
        return [CPU]
    names = [providers] if isinstance(providers, str) else list(providers)
    wanted = [_ALIASES.get(n.lower(), n) for n in names]
    available = set(ort.get_available_providers())
    chosen = []
    for name in wanted:
        if name in available:
            chosen.append(name)
        else:
            log.warning("ONNX Runtime provider %s is not available here (have %s); skipping it",
                        name, ", ".join(sorted(available)))
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def session_options(intra_op_threads: int | None = None) -> ort.SessionOptions:
    """ORT_ENABLE_ALL graph optimizations (constant folding, Conv/LayerNorm/GELU fusions, NCHWc
    layouts) and `intra_op_threads` (default: all cores, as torch uses), sequential execution (this
    graph is a chain, so a parallel executor only adds contention on a small machine)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    return options


def _spec(model_name: str) -> ModelSpec:
    from models.registry import get_spec

    return get_spec(model_name)


def read_graph_info(path: str | Path) -> GraphInfo:
    """Metadata of a file written by `models.export.export_onnx`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    meta = read_metadata(path)
    if META_MODEL not in meta:
        raise ValueError(f"{path} has no segserve metadata; export it with `segserve export-onnx`")
    spec = _spec(meta[META_MODEL])
    level = None if meta.get(META_RUNTIME_KNOB) else spec.level(meta.get(META_LEVEL, "base"))
    num_classes = meta.get(META_NUM_CLASSES)
    return GraphInfo(path, spec.name, level, int(num_classes) if num_classes else None,
                     meta.get(META_PRECISION) or "fp32")


def _scalar_knob(name: str, value: Any) -> np.ndarray:
    """The graph's scalar `knob` input. A per-tap value (DoViT's thresholds) is accepted when all are equal:
    the graph holds one value for every tap."""
    if isinstance(value, torch.Tensor):
        values = value.detach().reshape(-1).tolist()
    else:
        values = list(value) if isinstance(value, (tuple, list)) else [value]
    if not values or any(v != values[0] for v in values):
        raise ValueError(f"this ONNX graph takes one {name} value for every tap, got {value!r}")
    return np.asarray(float(values[0]), np.float32)


class OnnxRunner:
    """`runner(images, **knob) -> logits` over one ONNX graph per level (or one with the knob as an input).

    Args:
        graphs: ONNX paths written by `models.export.export_onnx`, all of one model.
        providers: 'cpu', 'cuda' or ORT provider names; CUDA is used when requested and available.
        intra_op_threads: ORT intra-op threads (default: all cores).
    """

    def __init__(
        self,
        graphs: str | Path | Iterable[str | Path],
        *,
        providers: str | Sequence[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        paths = [graphs] if isinstance(graphs, (str, Path)) else list(graphs)
        infos = [read_graph_info(path) for path in paths]
        if not infos:
            raise ValueError("OnnxRunner needs at least one ONNX graph")
        names = {i.model_name for i in infos}
        classes = {i.num_classes for i in infos if i.num_classes}
        if len(names) > 1 or len(classes) > 1:
            raise ValueError(f"graphs come from different models: {sorted(names)} / {sorted(classes)} classes")
        precisions = {i.precision for i in infos}
        if len(precisions) > 1:
            raise ValueError(f"graphs of different precisions ({', '.join(sorted(precisions))}): one runner each")
        self.precision: str = precisions.pop()
        self.model_name: str = infos[0].model_name
        self.num_classes: int | None = next(iter(classes), None)
        self.spec = _spec(self.model_name)
        self.providers = resolve_providers(providers)
        options = session_options(intra_op_threads)
        self._sessions: dict[Hashable, ort.InferenceSession] = {}
        self._levels: list[Level] = []
        for info in infos:
            key = _RUNTIME if info.level is None else info.level.value
            self._sessions[key] = ort.InferenceSession(str(info.path), options, providers=self.providers)
            if info.level is not None:
                self._levels.append(info.level)
        log.info("ONNX runner for %s (%s): %s on %s", self.model_name, self.precision,
                 ", ".join(lv.name for lv in self._levels) or "knob as input", self.providers[0])

    @property
    def levels(self) -> list[Level]:
        """The baked-in levels this runner has graphs for (empty when the knob is a runtime input)."""
        return list(self._levels)

    def _session(self, knob: dict[str, Any]) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
        spec_knob = self.spec.knob
        value = knob.get(spec_knob.name, spec_knob.training) if spec_knob is not None else None
        extra = set(knob) - ({spec_knob.name} if spec_knob is not None else set())
        if extra:
            raise TypeError(f"{self.model_name} takes no knob {', '.join(sorted(extra))}")
        if _RUNTIME in self._sessions:
            return self._sessions[_RUNTIME], {KNOB_INPUT_NAME: _scalar_knob(spec_knob.name, value)}
        if value not in self._sessions:
            have = ", ".join(level.name for level in self._levels)
            wanted = spec_knob.level_name(value) if spec_knob is not None else "base"
            raise MissingLevelGraphError(f"no ONNX graph for level {wanted}; this runner has: {have}")
        return self._sessions[value], {}

    def forward_with_stats(self, images: torch.Tensor, **knob: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images: normalized float (B, 3, H, W) -> (logits, per-image statistics), on images' device."""
        session, extra = self._session(knob)
        pixels = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        names = [output.name for output in session.get_outputs()]
        outputs = session.run(None, {INPUT_NAME: pixels, **extra})
        logits = torch.from_numpy(outputs[0]).to(images.device)
        stats = {name[len(STATS_PREFIX):]: torch.from_numpy(value) for name, value in zip(names[1:], outputs[1:],
                                                                                           strict=True)}
        return logits, stats

    def __call__(self, images: torch.Tensor, **knob: Any) -> torch.Tensor:
        """images: normalized float (B, 3, H, W) -> logits (B, K, h, w), on images' device."""
        return self.forward_with_stats(images, **knob)[0]
