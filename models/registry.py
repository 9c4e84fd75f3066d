"""Model registry: variants are registered by small builders with their `ModelSpec`, created by name.

    model = create_model("edaformer-t", num_classes=150, checkpoint="edaformer_t_ade20k.pth")
    spec = get_spec("segformer-b0")          # knob, output stride, pipelines, checkpoint rules
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from models.base import SegmentationModel
from models.spec import ModelSpec

Builder = Callable[..., SegmentationModel]
_BUILDERS: dict[str, Builder] = {}
_SPECS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> Callable[[Builder], Builder]:
    """Decorator that registers a builder `fn(num_classes, **kwargs) -> SegmentationModel` under `spec.name`."""

    def decorate(builder: Builder) -> Builder:
        if spec.name in _BUILDERS:
            raise ValueError(f"model {spec.name!r} is registered twice")
        _BUILDERS[spec.name] = builder
        _SPECS[spec.name] = spec
        return builder

    return decorate


def list_models(family: str | None = None) -> list[str]:
    """Names accepted by `create_model`, sorted; optionally one family's."""
    return sorted(name for name, spec in _SPECS.items() if family is None or spec.family == family)


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model; `KeyError` listing the known names otherwise."""
    if name not in _SPECS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _SPECS[name]


def create_model(
    name: str,
    num_classes: int | None = None,
    checkpoint: str | Path | None = None,
    *,
    dataset: str | None = None,
    **kwargs: object,
) -> SegmentationModel:
    """Build a registered model, optionally loading a checkpoint strictly.

    Args:
        name: a name from `list_models()`, e.g. "edaformer-t".
        num_classes: classes of the head. With a checkpoint it is read from the weights when omitted;
            without one it defaults to the dataset's class count (ADE20K: 150).
        checkpoint: official mmseg `.pth`, a plain state dict, or `.safetensors` (other layouts the family
            knows, such as Hugging Face's, are converted on load).
        dataset: "ade20k", "cityscapes" or "coco-stuff": class names and palette when the checkpoint
            carries none (default: guessed from the class count, else ADE20K).
    """
    # Imported here so that `models.registry` has no import cycle with the variant modules.
    from models.checkpoint import apply_state_dict, load_checkpoint_file, prepare_state_dict
    from models.datasets import dataset_for, dataset_named_by_classes

    spec = get_spec(name)
    loaded = load_checkpoint_file(checkpoint) if checkpoint is not None else None
    prepared = prepare_state_dict(loaded, spec.checkpoint) if loaded is not None else None
    if num_classes is None:
        num_classes = prepared.num_classes if prepared else dataset_for(dataset, None).num_classes
    if dataset is None and loaded is not None and loaded.class_names:
        dataset = dataset_named_by_classes(loaded.class_names)  # e.g. the demo weights carry the demo classes
    info = dataset_for(dataset, num_classes)  # ValueError when the named dataset has another class count
    model = _BUILDERS[name](num_classes=num_classes, **kwargs)
    model.meta.dataset = info.name
    model.meta.class_names = list(info.class_names)
    model.meta.palette = [list(color) for color in info.palette]
    if prepared is not None:
        apply_state_dict(model, prepared)  # checkpoint meta (CLASSES, PALETTE) overrides the dataset's
    return model
