"""What `segment` returns, and what `models` returns: typed views of the server's answers."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segserve_client.images import decode_mask
from segserve_client.receipt import Receipt


@dataclass
class Result:
    """One answer: the encoded body as the server sent it, its receipt, and the mask decoded on first use.

    `mask` is decoded lazily, so that callers that only want the receipt (a load generator) spend no CPU on it.
    """

    raw: bytes
    content_type: str
    receipt: Receipt | None  # None only for servers that send no receipt (not segserve)
    format: str = "png"
    attempts: int = 1  # requests sent for this answer (retries included)

    @functools.cached_property
    def mask(self) -> np.ndarray:
        """(H, W) class ids (uint8, or uint16 above 256 classes)."""
        return decode_mask(self.raw, self.content_type, self.format)

    def json(self) -> Any:
        """The body of a `json`/`rle` answer."""
        return json.loads(self.raw)


@dataclass(frozen=True)
class PointInfo:
    """An operating point as `/v1/models` lists it."""

    name: str  # model/level@scale
    model: str
    level: str
    knob_value: str
    scale: float
    precision: str
    network_input: tuple[int, int]
    gmacs: float
    latency_ms: dict[int, float]  # batch size -> calibrated latency of a batch
    quality: float
    quality_source: str
    on_ladder: bool

    @classmethod
    def from_dict(cls, p: dict[str, Any]) -> PointInfo:
        return cls(name=p["name"], model=p["model"], level=p["level"], knob_value=p.get("knob_value", ""),
                   scale=float(p["scale"]), precision=p.get("precision", "fp32"),
                   network_input=tuple(p.get("network_input") or (0, 0)), gmacs=float(p.get("gmacs", 0.0)),
                   latency_ms={int(b): float(ms) for b, ms in (p.get("latency_ms") or {}).items()},
                   quality=float(p["quality"]), quality_source=p.get("quality_source", ""),
                   on_ladder=bool(p.get("on_ladder", False)))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    family: str
    task: str
    dataset: str | None
    num_classes: int
    classes: list[str]
    weights: str
    knob: str | None  # the knob's name ("isr", ...), None for knob-less models
    scales: list[float]
    calibration_shape: tuple[int, int]
    points: list[PointInfo]  # best quality first


@dataclass(frozen=True)
class Listing:
    """The served models, their operating points and each task's ladder (GET /v1/models, gRPC ListModels)."""

    default_model: str
    default_task: str
    tasks: dict[str, list[str]]  # task -> ladder (point names, best first)
    task_models: dict[str, list[str]]  # task -> served models of its pool
    models: list[ModelInfo]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def model(self, name: str | None = None) -> ModelInfo:
        """A served model by name (default: the default model)."""
        wanted = name or self.default_model
        for model in self.models:
            if model.name == wanted:
                return model
        raise KeyError(f"no served model {wanted!r}; served: {', '.join(m.name for m in self.models)}")

    def point(self, name: str) -> PointInfo:
        for model in self.models:
            for point in model.points:
                if point.name == name:
                    return point
        raise KeyError(f"no operating point {name!r}")

    def ladder(self, task: str | None = None) -> list[PointInfo]:
        """The task's ladder (default task by default), best first."""
        return [self.point(name) for name in self.tasks[task or self.default_task]]

    def best_point(self, model: str | None = None) -> PointInfo:
        """A model's best-quality point (default: the default model's)."""
        return self.model(model).points[0]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Listing:
        models = []
        for m in data["models"]:
            knob = m.get("knob")
            models.append(ModelInfo(
                name=m["name"], architecture=m.get("architecture", m["name"]), family=m.get("family", ""),
                task=m.get("task", ""), dataset=m.get("dataset"), num_classes=int(m.get("num_classes", 0)),
                classes=list(m.get("classes", [])), weights=m.get("weights", ""),
                knob=knob["name"] if isinstance(knob, dict) else knob or None,
                scales=[float(s) for s in m.get("scales", [])],
                calibration_shape=tuple(m.get("calibration_shape") or (0, 0)),
                points=[PointInfo.from_dict(p) for p in m.get("points", [])],
            ))
        tasks = data.get("tasks", {})
        return cls(default_model=data["default_model"], default_task=data.get("default_task", ""),
                   tasks={t: list(v.get("ladder", [])) for t, v in tasks.items()},
                   task_models={t: list(v.get("models", [])) for t, v in tasks.items()}, models=models, raw=data)

    @classmethod
    def from_message(cls, message: Any) -> Listing:
        """From the gRPC `ListModelsResponse`, through the same dictionary shape as GET /v1/models."""
        data = {
            "default_model": message.default_model, "default_task": message.default_task,
            "quality_prior": message.quality_prior,
            "tasks": {t.name: {"models": list(t.models), "ladder": list(t.ladder)} for t in message.tasks},
            "models": [{
                "name": m.name, "architecture": m.architecture, "family": m.family, "task": m.task,
                "dataset": m.dataset or None, "classes": list(m.classes), "num_classes": m.num_classes,
                "weights": m.weights, "backend": m.backend, "device": m.device, "knob": m.knob or None,
                "scales": list(m.scales), "calibration_shape": list(m.calibration_shape),
                "points": [{
                    "name": p.name, "model": p.model, "level": p.level, "knob_value": p.knob_value,
                    "scale": p.scale, "precision": p.precision, "network_input": list(p.network_input),
                    "gmacs": p.gmacs, "latency_ms": {str(b): ms for b, ms in sorted(p.latency_ms.items())},
                    "quality": p.quality, "quality_source": p.quality_source, "on_ladder": p.on_ladder,
                } for p in m.points],
            } for m in message.models],
        }
        return cls.from_json(data)
