"""What the server serves, transport-neutral: `/v1/models` renders it as JSON, gRPC `ListModels` as messages.

Each model lists its operating points best first, with GMACs and calibrated latency per batch size at the
point's reference shape (a calibration-sized image at the point's scale), its quality value and where that
value comes from, and whether the point is on its pool's ladder (not beaten on both latency and quality).
"""

from __future__ import annotations

from typing import Any

from service.points import KNOB_STEP_PENALTY, SCALE_PENALTY
from service.runtime import Runtime
from service.served_model import ServedModel

QUALITY_PRIOR_NOTE = (
    f"Without a measured quality table, a point's quality is the model's published single-scale mIoU on the dataset "
    f"minus {KNOB_STEP_PENALTY:g} per knob step and {SCALE_PENALTY:g} per unit of scale below 1 (source 'prior'); "
    "a model with no published figure ranks just below the pool's weakest published model ('prior-unknown')."
)


def describe_point(rt: Runtime, served: ServedModel, point_name: str, on_ladder: bool) -> dict[str, Any]:
    point = rt.pools[served.task].point(point_name)
    assert point is not None  # names come from the served model's own points
    shape = rt.profile.reference_shape(point)
    table = rt.profile.table(served.name).get(point.name, {})
    return {
        "name": point.name, "model": point.model, "level": point.level.name, "knob_value": point.level.code,
        "scale": point.scale, "precision": point.precision, "network_input": list(shape),
        "gmacs": round(rt.gmacs(point, shape), 3),
        "latency_ms": {str(b): round(s * 1e3, 2) for b, s in table.items()},
        "quality": point.quality, "quality_source": point.quality_source, "on_ladder": on_ladder,
    }


def describe_model(rt: Runtime, served: ServedModel) -> dict[str, Any]:
    ladder = {p.name for p in rt.ladder(served.task)}
    ordered = sorted(served.points, key=lambda p: (-p.quality, p.name))
    knob = served.spec.knob
    return {
        "name": served.name, "architecture": served.spec.name, "family": served.spec.family, "task": served.task,
        "dataset": served.meta.dataset, "classes": list(served.meta.class_names),
        "num_classes": served.meta.num_classes, "weights": served.weights,
        "backend": rt.settings.backend, "device": rt.settings.device,
        "knob": None if knob is None else {
            "name": knob.name, "training": served.levels[0].code, "levels": [lv.name for lv in served.levels],
        },
        "scales": list(served.entry.scales), "calibration_shape": list(rt.settings.calibration_shape),
        "points": [describe_point(rt, served, p.name, p.name in ladder) for p in ordered],
    }


def describe(rt: Runtime) -> dict[str, Any]:
    """The whole listing: models with their points, and each task's ladder."""
    return {
        "default_model": rt.default_model, "default_task": rt.default_task,
        "tasks": {task: {"models": pool.models, "ladder": [p.name for p in pool.ladder()]}
                  for task, pool in rt.pools.items()},
        "quality_prior": QUALITY_PRIOR_NOTE,
        "models": [describe_model(rt, served) for served in rt.models.values()],
    }
