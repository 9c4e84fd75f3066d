"""ONNX Runtime runner with the torch model's call shape: `logits = runner(images, isr)`.

Each ONNX file from `models.export` has one ISR setting baked in (read back from its metadata), so the
runner holds one InferenceSession per ISR and refuses an ISR it has no graph for:

    runner = OnnxRunner({IsrConfig(): "t_full.onnx", IsrConfig.parse("2222/222"): "t_2222.onnx"})
    logits = runner(images, IsrConfig.parse("2222/222"))

ORT's `InferenceSession.run` is thread-safe and the runner keeps no other mutable state, so one runner
serves concurrent requests, as the torch model does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from models.export import INPUT_NAME, META_ISR, META_MODEL, META_NUM_CLASSES, read_metadata
from models.isr import IsrConfig

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA}


class MissingIsrGraphError(LookupError):
    """The runner has no ONNX graph for the requested ISR setting."""


@dataclass(frozen=True)
class GraphInfo:
    """What one ONNX file says about itself (from `metadata_props`)."""

    path: Path
    isr: IsrConfig
    model_name: str | None
    num_classes: int | None


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


def read_graph_info(path: str | Path, isr: IsrConfig | None = None) -> GraphInfo:
    """Metadata of an exported file; `isr` is required only for files without segserve metadata, and
    must agree with the file's when both exist (a mismatch would serve the wrong ISR silently)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    meta = read_metadata(path)
    stored = IsrConfig.parse(meta[META_ISR]) if META_ISR in meta else None
    if stored is not None and isr is not None and stored != isr:
        raise ValueError(f"{path} was exported with ISR {stored.code}, not {isr.code}")
    if stored is None and isr is None:
        raise ValueError(f"{path} has no {META_ISR} metadata; pass the ISR it was exported with")
    num_classes = meta.get(META_NUM_CLASSES)
    return GraphInfo(
        path=path, isr=stored or isr,  # type: ignore[arg-type]  (one of them is set, checked above)
        model_name=meta.get(META_MODEL), num_classes=int(num_classes) if num_classes else None,
    )


class OnnxRunner:
    """`runner(images, isr) -> logits` over one ONNX graph per ISR setting.

    Args:
        graphs: a single ONNX path, or `{IsrConfig: path}` for several settings.
        isr: with a single path, the ISR it holds (default: read from the file's metadata).
        providers: 'cpu', 'cuda' or ORT provider names; CUDA is used when requested and available.
        intra_op_threads: ORT intra-op threads (default: all cores).
    """

    def __init__(
        self,
        graphs: str | Path | Mapping[IsrConfig, str | Path],
        isr: IsrConfig | None = None,
        *,
        providers: str | Sequence[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        if isinstance(graphs, Mapping):
            if isr is not None:
                raise TypeError("pass isr only with a single path; a mapping already names each graph's ISR")
            infos = [read_graph_info(path, key) for key, path in graphs.items()]
        else:
            infos = [read_graph_info(graphs, isr)]
        if not infos:
            raise ValueError("OnnxRunner needs at least one ONNX graph")
        names = {i.model_name for i in infos if i.model_name}
        classes = {i.num_classes for i in infos if i.num_classes}
        if len(names) > 1 or len(classes) > 1:
            raise ValueError(f"graphs come from different models: {sorted(names)} / {sorted(classes)} classes")
        self.providers = resolve_providers(providers)
        options = session_options(intra_op_threads)
        self._infos = {info.isr: info for info in infos}
        self._sessions = {
            info.isr: ort.InferenceSession(str(info.path), options, providers=self.providers) for info in infos
        }
        self.model_name: str | None = next(iter(names), None)
        self.num_classes: int | None = next(iter(classes), None)
        log.info("ONNX runner for %s: ISR %s on %s", self.model_name,
                 ", ".join(i.code for i in self._sessions), self.providers[0])

    @property
    def isr_configs(self) -> list[IsrConfig]:
        """The ISR settings this runner has graphs for."""
        return list(self._sessions)

    def info(self, isr: IsrConfig) -> GraphInfo:
        return self._infos[self._key(isr)]

    def _key(self, isr: IsrConfig | None) -> IsrConfig:
        isr = isr or IsrConfig()
        if isr not in self._sessions:
            have = ", ".join(i.code for i in self._sessions)
            raise MissingIsrGraphError(f"no ONNX graph for ISR {isr.code}; this runner has: {have}")
        return isr

    def __call__(self, images: torch.Tensor, isr: IsrConfig | None = None) -> torch.Tensor:
        """images: normalized float (B, 3, H, W) -> logits (B, K, ceil(H/8), ceil(W/8)), on images' device."""
        session = self._sessions[self._key(isr)]
        pixels = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        (logits,) = session.run(None, {INPUT_NAME: pixels})
        return torch.from_numpy(logits).to(images.device)
