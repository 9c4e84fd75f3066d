"""One cache of exported ONNX graphs, shared by the server's ONNX backend and `segserve bench`.

A graph is keyed by the model's name, class count, level, a digest of its weights, the opset and the torch
release, so a changed checkpoint or exporter never serves a stale graph. A fresh export is parity-checked at
one odd size before it enters the cache (writes are atomic), and every export shows its progress: an export
takes tens of seconds on 2 cores. An int8 graph (`models.quantize.int8_graphs`) lies next to its fp32 graph,
named after it plus the digest of its quantization recipe (`int8_graph_path`).

    paths = cached_graphs(model, model.spec.ladder()[:2])   # [Path, Path]
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from models.export import DEFAULT_OPSET, check_parity, export_onnx
from models.spec import Level

log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = Path(os.path.expanduser("~/.cache/segserve/onnx"))


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (12 hex digits) of every tensor of the state dict, with its name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def graph_levels(model: torch.nn.Module, levels: Sequence[Level]) -> list[Level | None]:
    """The graphs `levels` need: one per level, or one for all when the knob is a runtime input (None)."""
    knob = model.spec.knob
    return [None] if knob is not None and knob.runtime_input else list(levels)


def cached_graphs(
    model: torch.nn.Module, levels: Sequence[Level], cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *, progress: bool | None = None,
) -> list[Path]:
    """The ONNX files that serve `levels`, exported (and parity-checked) only where the cache lacks them."""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{weights_digest(model)}-op{DEFAULT_OPSET}-torch{torch.__version__.split('+')[0]}"
    wanted = graph_levels(model, levels)
    paths = []
    bar = tqdm(wanted, desc=f"onnx graphs {model.meta.name}", unit="graph", disable=None if progress is None
               else not progress)
    for level in bar:
        name = "knob-input" if level is None else level.name
        bar.set_postfix_str(name)
        path = cache_dir / f"{model.meta.name}-{model.num_classes}c-{name}-{tag}.onnx"
        if not path.is_file():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            log.info("exporting %s at %s to %s", model.meta.name, name, path)
            export_onnx(model, tmp, level, progress=False)
            check_parity(model, tmp, level, sizes=model.spec.parity_sizes[2:3], progress=False)
            tmp.replace(path)  # only checked graphs enter the cache
        paths.append(path)
    return paths


def int8_graph_path(fp32_path: Path, recipe_digest: str) -> Path:
    """Where the int8 graph quantized from `fp32_path` with a recipe of this digest is cached: the fp32 key
    (model, classes, level, weights, opset, torch) plus the recipe (which also covers the ORT release)."""
    return fp32_path.with_name(f"{fp32_path.stem}-int8-{recipe_digest}.onnx")
