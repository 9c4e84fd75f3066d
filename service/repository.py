"""The model repository: which models one server serves, from a config file, the CLI or the defaults.

A config file (TOML or YAML) lists the models; every one is resident, and models that share a label space
(the same dataset classes) form a pool the planner chooses from:

    # models.toml
    [[models]]
    name = "edaformer-t"                 # the name requests use; defaults to the architecture
    architecture = "edaformer-t"         # a registered model (models.list_models())
    checkpoint = "/models/edaformer_t_ade20k.pth"
    dataset = "ade20k"
    levels = ["1111-111", "2211-222", "2222-222"]   # knob levels offered (default: the model's ladder)
    scales = [1.0, 0.75, 0.5]            # input scales offered (default: the server's `scales`)
    quality_table = "t_quality.json"     # measured quality per point (segserve evaluate)

    [[models]]
    architecture = "seaformer-t"
    checkpoint = "/models/seaformer_t_ade20k.pth"

Without a file, `--model NAME[:CHECKPOINT]` (repeatable) names the models; without either, the single
`model`/`checkpoint`/`dataset`/`levels` settings do, as in wave 1. Relative paths in a file are relative to it.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from service.settings import Settings

_ENTRY_FIELDS = {"name", "architecture", "checkpoint", "dataset", "levels", "scales", "quality_table", "random_weights"}
MAX_MODELS = 32  # every model is resident: a bound on what one config can ask the process to hold


class ConfigError(ValueError):
    """A repository config that cannot be served, with the reason (one line, for the start-up error)."""


@dataclass(frozen=True)
class ModelEntry:
    """One served model as configured; `name` is what requests and metrics use."""

    name: str
    architecture: str
    checkpoint: str | None = None
    dataset: str | None = None
    levels: tuple[str, ...] | None = None
    scales: tuple[float, ...] = (1.0,)
    quality_table: str | None = None
    random_weights: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _as_tuple(value: Any, where: str, kind: type) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, str) and kind is str:
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{where}: expected a non-empty list")
    try:
        return tuple(kind(item) for item in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a list of {kind.__name__}s, got {value!r}") from None


def _resolve(path: Any, base: Path | None, where: str) -> str | None:
    if path is None or path == "":
        return None
    if not isinstance(path, str):
        raise ConfigError(f"{where}: expected a path, got {path!r}")
    candidate = Path(path).expanduser()
    if base is not None and not candidate.is_absolute():
        candidate = base / candidate
    return str(candidate)


def _entry(raw: Any, index: int, settings: Settings, base: Path | None) -> ModelEntry:
    where = f"models[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _ENTRY_FIELDS)
    if unknown:
        known = ", ".join(sorted(_ENTRY_FIELDS))
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {known}")
    architecture = raw.get("architecture") or raw.get("name")
    if not isinstance(architecture, str) or not architecture:
        raise ConfigError(f"{where}: needs an architecture (a registered model name)")
    name = raw.get("name") or architecture
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"{where}: name {name!r} must be letters, digits, '-', '_' or '.'")
    scales = _as_tuple(raw.get("scales"), f"{where}.scales", float) or settings.scales
    if any(not 0 < s <= 4 for s in scales):
        raise ConfigError(f"{where}.scales: every scale must be in (0, 4], got {scales}")
    return ModelEntry(
        name=name,
        architecture=architecture,
        checkpoint=_resolve(raw.get("checkpoint"), base, f"{where}.checkpoint"),
        dataset=raw.get("dataset"),
        levels=_as_tuple(raw.get("levels"), f"{where}.levels", str),
        scales=tuple(sorted(set(scales), reverse=True)),
        quality_table=_resolve(raw.get("quality_table"), base, f"{where}.quality_table"),
        random_weights=bool(raw.get("random_weights", settings.random_weights)),
    )


def read_config_file(path: str | Path) -> list[Any]:
    """The raw `models` list of a TOML (.toml) or YAML (.yaml/.yml/anything else) file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model config {path} does not exist")
    text = path.read_text()
    try:
        document = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"model config {path} cannot be parsed: {first}") from None
    models = document.get("models") if isinstance(document, dict) else None
    if not isinstance(models, list) or not models:
        raise ConfigError(f"model config {path} has no `models` list")
    return models


def entries_from_settings(settings: Settings) -> list[ModelEntry]:
    """The models to serve, from the config file, else the `models` list, else the single model."""
    if settings.config:
        base = Path(settings.config).expanduser().resolve().parent
        raw = read_config_file(settings.config)
        entries = [_entry(item, index, settings, base) for index, item in enumerate(raw)]
    elif settings.models:
        entries = []
        for index, spec in enumerate(settings.models):
            name, _, checkpoint = spec.partition(":")
            entries.append(_entry({"architecture": name.strip(), "checkpoint": checkpoint.strip() or None,
                                   "dataset": settings.dataset}, index, settings, None))
    else:
        levels = tuple(n.strip() for n in settings.levels.split(",") if n.strip()) if settings.levels else None
        entries = [ModelEntry(
            name=settings.model, architecture=settings.model, checkpoint=settings.checkpoint, dataset=settings.dataset,
            levels=levels, scales=settings.scales, quality_table=settings.quality_table,
            random_weights=settings.random_weights,
        )]
    if len(entries) > MAX_MODELS:
        raise ConfigError(f"{len(entries)} models configured; at most {MAX_MODELS} can be resident")
    names = [entry.name for entry in entries]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ConfigError(f"model name(s) configured twice: {', '.join(duplicated)} (give each a distinct `name`)")
    return entries


def describe_entries(entries: list[ModelEntry]) -> str:
    """One line per entry, for the start-up log."""
    return "; ".join(json.dumps({k: v for k, v in entry.__dict__.items() if v not in (None, {}, ())})
                     for entry in entries)
