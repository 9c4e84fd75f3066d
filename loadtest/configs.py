"""The model configurations a load test serves: named presets, a repository file, or repeated `--model`.

- `edaformer-t` (the default): EDAFormer-T alone, its ISR levels x input scales 1, 0.75 and 0.5;
- `ade20k-pool`: an ADE20K pool of three families, EDAFormer-T + SegFormer-B0 + SeaFormer-T, each with its
  knob levels (SeaFormer has none) x the same scales; the planner may answer with any of them.

Presets use random weights (the figures are about serving, not accuracy) unless `--checkpoint` gives the
default model's weights. Every segserve target is started from one repository file (`--config FILE` as it is,
else one written into the output directory as `models.toml`), and the report keeps its text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SCALES = (1.0, 0.75, 0.5)
PRESETS: dict[str, tuple[str, ...]] = {
    "edaformer-t": ("edaformer-t",),
    "ade20k-pool": ("edaformer-t", "segformer-b0", "seaformer-t"),
}
MAX_MODELS = 8  # every model is resident in each server under test


@dataclass(frozen=True)
class ModelsConfig:
    """What the segserve targets serve: a repository file's text, and the default model's architecture."""

    name: str  # the preset's name, the file's stem, or "models"
    toml: str  # the repository file (service/repository.py format)
    default_model: str  # architecture of the first entry: the default model, and the plain endpoint's model
    default_checkpoint: str | None
    source: str  # "preset", "file" or "--model"
    path: Path | None = None  # the user's file (served in place: its relative paths stay right)

    def write(self, out_dir: Path) -> Path:
        """The file the servers read: the user's own, else `models.toml` written into `out_dir`."""
        if self.path is not None:
            return self.path.resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / "models.toml"
        target.write_text(self.toml)
        return target.resolve()


def _entry(architecture: str, checkpoint: str | None, scales: tuple[float, ...]) -> str:
    lines = ["[[models]]", f"architecture = {json.dumps(architecture)}", 'dataset = "ade20k"']
    if checkpoint:
        lines.append(f"checkpoint = {json.dumps(str(Path(checkpoint).resolve()))}")
    else:
        lines.append("random_weights = true")
    lines.append("scales = [" + ", ".join(f"{s:g}" for s in scales) + "]")
    return "\n".join(lines) + "\n"


def from_models(name: str, models: list[str], checkpoint: str | None, scales: tuple[float, ...],
                source: str) -> ModelsConfig:
    """A repository of `models` (NAME or NAME:CHECKPOINT); `checkpoint` applies to the first (default) one."""
    if not models:
        raise ValueError("no models to serve")
    if len(models) > MAX_MODELS:
        raise ValueError(f"{len(models)} models: a load test serves at most {MAX_MODELS}")
    entries, default_checkpoint = [], None
    for index, spec in enumerate(models):
        architecture, _, own = spec.partition(":")
        weights = own or (checkpoint if index == 0 else None)
        if index == 0:
            default_checkpoint = weights
        entries.append(_entry(architecture.strip(), weights, scales))
    header = f"# segserve load test: configuration {name!r} ({source})\n"
    return ModelsConfig(name, header + "\n".join(entries), models[0].partition(":")[0].strip(), default_checkpoint,
                        source)


def from_file(path: Path) -> ModelsConfig:
    """A repository file (TOML or YAML), served as it is; its first model is the default one."""
    import tomllib

    import yaml

    text = path.read_text()
    document = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    models = document.get("models") if isinstance(document, dict) else None
    if not isinstance(models, list) or not models or not isinstance(models[0], dict):
        raise ValueError(f"{path} has no `models` list")
    first = models[0]
    if len(models) > MAX_MODELS:
        raise ValueError(f"{path}: {len(models)} models; a load test serves at most {MAX_MODELS}")
    checkpoint = first.get("checkpoint")
    if checkpoint and not Path(checkpoint).is_absolute():
        checkpoint = str(path.resolve().parent / checkpoint)  # as segserve reads it: relative to the file
    return ModelsConfig(path.stem, text, str(first.get("architecture") or first.get("name")), checkpoint, "file",
                        path=path)


def resolve(config: str | None, models: list[str] | None, checkpoint: str | None,
            scales: tuple[float, ...] = DEFAULT_SCALES) -> ModelsConfig:
    """`--config PRESET|FILE`, else repeated `--model`, else the `edaformer-t` preset."""
    if config and models:
        raise ValueError("give --config or --model, not both")
    if models:
        return from_models("models", models, checkpoint, scales, "--model")
    name = config or "edaformer-t"
    if name in PRESETS:
        return from_models(name, list(PRESETS[name]), checkpoint, scales, "preset")
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"--config {name!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    return from_file(path)
