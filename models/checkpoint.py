"""Checkpoint loading: official mmseg `.pth`, plain state dicts and safetensors, always safely.

`.pth` files are read with `torch.load(..., weights_only=True)`: a pickle that carries code (or any
object that is not plain data and tensors) is refused with `CheckpointError`. Loading is strict:
missing, unexpected or mis-shaped keys fail with an error that lists them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.spec import CheckpointRules

log = logging.getLogger(__name__)

# mmseg's BaseDecodeHead creates `conv_seg`; heads that classify with another layer never use it, but their
# official checkpoints carry it. Families list it in their `CheckpointRules.unused_prefixes`.
MMSEG_CONV_SEG = "decode_head.conv_seg."
_MAX_LISTED_KEYS = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the reason (and offending keys) in the message."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint file's tensors (DataParallel's `module.` stripped) and class metadata, in its own layout."""

    state_dict: dict[str, torch.Tensor]
    class_names: list[str] | None = None
    palette: list[list[int]] | None = None
    sha256: str = ""
    path: str = ""


@dataclass
class PreparedCheckpoint:
    """A checkpoint in the model's layout: converted, unused keys dropped, the class count read."""

    state_dict: dict[str, torch.Tensor]
    num_classes: int
    source: LoadedCheckpoint
    dropped_keys: list[str] = field(default_factory=list)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-data checkpoint (weights_only=True rejected it: "
            f"{str(exc).splitlines()[0]}). Convert it to safetensors or a state dict of tensors."
        ) from exc
    except Exception as exc:  # torch's legacy (non-zip) reader raises KeyError/IndexError on garbage
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    return tensors, metadata


def load_checkpoint_file(path: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint into plain tensors and its class metadata, without touching a model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    class_names: list[str] | None = None
    palette: list[list[int]] | None = None
    if path.suffix == ".safetensors":
        raw, metadata = _read_safetensors(path)
        if "classes" in metadata:
            class_names = list(json.loads(metadata["classes"]))
        if "palette" in metadata:
            palette = [list(map(int, c)) for c in json.loads(metadata["palette"])]
    else:
        obj = _safe_torch_load(path)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
        meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
        if meta.get("CLASSES") is not None:
            class_names = [str(c) for c in meta["CLASSES"]]
        if meta.get("PALETTE") is not None:
            palette = [[int(v) for v in c] for c in meta["PALETTE"]]
        raw = obj.get("state_dict", obj)
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"checkpoint {path}: 'state_dict' is a {type(raw).__name__}, not a dict")
    return LoadedCheckpoint(_tensors(raw), class_names, palette, file_sha256(path), str(path))


def _tensors(raw: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Every entry must be a tensor; DataParallel's `module.` prefix is stripped."""
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        state_dict[key[len("module.") :] if key.startswith("module.") else key] = value
    return state_dict


def prepare_state_dict(loaded: LoadedCheckpoint, rules: CheckpointRules) -> PreparedCheckpoint:
    """Bring a loaded checkpoint into the model's layout: convert, drop unused keys, read the class count."""
    state_dict = dict(loaded.state_dict)
    if rules.convert is not None:
        try:
            state_dict = rules.convert(state_dict)
        except ValueError as exc:  # a layout the converter recognizes and refuses
            raise CheckpointError(f"checkpoint {loaded.path}: {exc}") from exc
    dropped = sorted(key for key in state_dict if key.startswith(rules.unused_prefixes))
    for key in dropped:
        del state_dict[key]
    classifier = state_dict.get(rules.classifier_key)
    if classifier is None:
        raise CheckpointError(f"checkpoint {loaded.path} has no {rules.classifier_key}; is it for this model family?")
    return PreparedCheckpoint(state_dict, int(classifier.shape[0]), loaded, dropped)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f" (+{more} more)" if more > 0 else "")


def apply_state_dict(model: nn.Module, prepared: PreparedCheckpoint) -> None:
    """Load strictly; on any mismatch raise one error naming every problem."""
    loaded = prepared.source
    loaded_state = prepared.state_dict
    expected = model.state_dict()
    missing = sorted(set(expected) - set(loaded_state))
    unexpected = sorted(set(loaded_state) - set(expected))
    mis_shaped = sorted(
        f"{k} {tuple(loaded_state[k].shape)} != model {tuple(expected[k].shape)}"
        for k in set(expected) & set(loaded_state)
        if loaded_state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped keys ({len(mis_shaped)}): {_listing(mis_shaped)}")
    if problems:
        raise CheckpointError(f"checkpoint {loaded.path} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(loaded_state, strict=True)
    meta = getattr(model, "meta", None)
    if meta is not None:
        meta.weights = "checkpoint"
        meta.checkpoint_sha256 = loaded.sha256
        if loaded.class_names is not None:
            if len(loaded.class_names) != meta.num_classes:
                raise CheckpointError(
                    f"checkpoint meta lists {len(loaded.class_names)} classes but the head has {meta.num_classes}"
                )
            meta.class_names = loaded.class_names
        if loaded.palette is not None:
            meta.palette = loaded.palette
    log.info("loaded checkpoint %s (sha256 %s…)", loaded.path, loaded.sha256[:12])


def official_checkpoint(model: nn.Module, class_names: list[str], palette: list[list[int]]) -> dict:
    """The model's weights in the official mmseg layout (with the unused `conv_seg`, if any, and meta).

    Useful to hand weights to mmseg tooling, and for tests that need a file shaped like the official ones.
    """
    rules: CheckpointRules = model.spec.checkpoint
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    num_classes = state_dict[rules.classifier_key].shape[0]
    if MMSEG_CONV_SEG in rules.unused_prefixes and rules.unused_in_channels:
        state_dict[MMSEG_CONV_SEG + "weight"] = torch.zeros(num_classes, rules.unused_in_channels, 1, 1)
        state_dict[MMSEG_CONV_SEG + "bias"] = torch.zeros(num_classes)
    return {"meta": {"CLASSES": tuple(class_names), "PALETTE": palette}, "state_dict": state_dict}
