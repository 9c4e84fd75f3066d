"""Model registry: variants are registered by small builders, created by name.

    model = create_model("edaformer-t", num_classes=150, checkpoint="edaformer_t_ade20k.pth")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a builder `fn(num_classes, **kwargs) -> nn.Module` under `name`."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(_BUILDERS)


def create_model(
    name: str,
    num_classes: int | None = None,
    checkpoint: str | Path | None = None,
    *,
    dataset: str | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a registered model, optionally loading a checkpoint strictly.

    Args:
        name: a name from `list_models()`, e.g. "edaformer-t".
        num_classes: classes of the head. With a checkpoint it is read from the weights when omitted;
            without one it defaults to the dataset's class count (ADE20K: 150).
        checkpoint: official mmseg `.pth`, a plain state dict, or `.safetensors`.
        dataset: "ade20k", "cityscapes" or "coco-stuff": class names and palette when the checkpoint
            carries none (default: guessed from the class count, else ADE20K).
    """
    # Imported here so that `models.registry` has no import cycle with the variant modules.
    from models.checkpoint import apply_state_dict, load_checkpoint_file
    from models.datasets import dataset_for

    if name not in _BUILDERS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    loaded = load_checkpoint_file(checkpoint) if checkpoint is not None else None
    if num_classes is None:
        num_classes = loaded.num_classes if loaded else dataset_for(dataset, None).num_classes
    info = dataset_for(dataset, num_classes)  # ValueError when the named dataset has another class count
    model = _BUILDERS[name](num_classes=num_classes, **kwargs)
    model.meta.dataset = info.name
    model.meta.class_names = list(info.class_names)
    model.meta.palette = [list(color) for color in info.palette]
    if loaded is not None:
        apply_state_dict(model, loaded)  # checkpoint meta (CLASSES, PALETTE) overrides the dataset's
    return model
