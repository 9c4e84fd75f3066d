"""One served model: what it is, how it reads images, which operating points it offers, how to run it.

Built once at start-up from a `ModelEntry`; holds no torch objects itself (the backend factory does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from models.base import ModelMeta
from models.datasets import DATASETS, DatasetInfo, dataset_for
from models.predict import network_input_size, pipeline_for
from models.spec import Level, ModelSpec
from service.points import Point, QualityLookup, model_points
from service.repository import ConfigError, ModelEntry
from service.settings import Settings
from service.workers.backends.base import Backend
from service.workers.loader import LoadedModel, backend_factory

log = logging.getLogger(__name__)
Shape = tuple[int, int]


@dataclass
class ServedModel:
    name: str  # the served name requests use
    entry: ModelEntry
    spec: ModelSpec
    meta: ModelMeta
    pipeline: DatasetInfo  # the dataset's test pipeline as this family runs it (+ the server's scale override)
    levels: list[Level]  # knob levels offered, best first
    task: str  # the label space: models with the same task form a pool
    weights: str  # "checkpoint", "demo" or "random"
    weights_id: str
    make_backend: Callable[[], Backend]
    points: list[Point] = dataclasses.field(default_factory=list)
    quality_table: str | None = None

    def shape_of(self, point: Point, image_size: Shape) -> Shape:
        """The network input for an image of `image_size` (H, W) at the point's scale."""
        return network_input_size(image_size[0], image_size[1], self.pipeline, point.scale)

    def fits(self, point: Point, shape: Shape) -> bool:
        return self.spec.fits(point.level, *shape)

    @property
    def cache_options(self) -> str:
        """Everything besides image, model, weights and format that changes this model's masks."""
        p = self.pipeline
        return f"{p.name}:{p.resize_scale}:{p.align_to}:{p.test_mode}:{p.mean}:{p.std}"


def task_name(meta: ModelMeta) -> str:
    """The label space: the dataset's name when the classes are the dataset's, else name + classes digest."""
    dataset = meta.dataset or "custom"
    known = DATASETS.get(dataset)
    if known is not None and list(known.class_names) == list(meta.class_names):
        return dataset
    digest = hashlib.sha256("\n".join(meta.class_names).encode()).hexdigest()[:8]
    return f"{dataset}-{digest}"


def _levels(spec: ModelSpec, entry: ModelEntry) -> list[Level]:
    if entry.levels is None:
        return list(spec.ladder())
    try:
        chosen = [spec.level(name) for name in entry.levels]
    except KeyError as exc:
        raise ConfigError(f"model {entry.name}: {exc.args[0]}") from None
    return sorted(dict.fromkeys(chosen), key=lambda level: level.rank)  # ladder order whatever the listed order


def build_served_model(entry: ModelEntry, loaded: LoadedModel, settings: Settings, threads: int) -> ServedModel:
    module = loaded.module
    spec, meta = module.spec, module.meta
    pipeline = pipeline_for(spec, dataset_for(meta.dataset, meta.num_classes))
    if settings.resize_scale is not None:
        pipeline = dataclasses.replace(pipeline, resize_scale=tuple(settings.resize_scale))
    levels = _levels(spec, entry)
    factory = backend_factory(loaded, pipeline, levels, backend=settings.backend, device=settings.device,
                              threads=threads, onnx_cache_dir=settings.onnx_cache_dir)
    return ServedModel(
        name=entry.name, entry=entry, spec=spec, meta=meta, pipeline=pipeline, levels=levels, task=task_name(meta),
        weights=loaded.weights, weights_id=loaded.weights_id, make_backend=factory,
        quality_table=entry.quality_table,
    )


def quality_lookup(served: ServedModel) -> QualityLookup | None:
    """Measured quality for this model's points: its configured table, else the demo weights' own table."""
    from models.demo_scenes import demo_quality_table_path

    path = served.quality_table
    if path is None and served.weights == "demo":
        demo = demo_quality_table_path(served.spec.name)
        path = str(demo) if demo is not None else None
    if path is None:
        return None
    from models.evaluate import load_quality_table

    table = load_quality_table(path)
    lookup = QualityLookup(path=path)
    for row in table.points:
        # A table is keyed by the architecture's name; the served name may differ (two copies of a model).
        name = row.point.replace(f"{table.model}/", f"{served.name}/", 1)
        if row.miou is not None:
            lookup.values[name] = row.miou
        elif row.agreement_miou is not None:
            lookup.agreement[name] = row.agreement_miou
    return lookup


def assign_points(served: ServedModel, base: float | None, precisions: tuple[str, ...] = ("fp32",)) -> None:
    """Every (level, scale, precision) point of the model with its quality value (measured, else the prior)."""
    served.points = model_points(served.name, served.spec, served.meta.dataset or "", served.levels,
                                 served.entry.scales, quality_lookup(served), base, precisions)
