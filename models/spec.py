"""The model contract: what every registered family tells the rest of segserve about itself.

A registry entry is a builder plus a `ModelSpec`. Everything downstream (prediction, export, GMAC counting,
the service's operating points) reads the spec instead of assuming one family:

- the compute knob (`Knob`): the forward keyword, its training value, the values offered by default (a
  ladder of named `Level`s, best first) and which values a given input size admits;
- the head's output stride;
- the test pipeline per dataset (keep-ratio scale, alignment, whole or sliding-window inference), as
  overrides of the dataset's reference pipeline;
- the checkpoint rules: where the class count is read, keys that exist but are never used, and a converter
  from other layouts (e.g. Hugging Face) into ours;
- the published quality per dataset (the planner's prior when nothing was measured).

Forward contract of every model: `model(images, **level.kwargs)` takes normalized `(B, 3, H, W)` and returns
the decode head's logits `(B, K, h, w)` before any final resize; without a keyword it runs the training
setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Level:
    """One named value of a model's compute knob. `rank` 0 is the training setting; larger is cheaper.

    `kwargs` is what the forward takes: `model(images, **level.kwargs)`. Knob-less families have one level,
    `Level("base", 0, None, None)`, whose kwargs are empty.
    """

    name: str
    rank: int
    knob: str | None = None
    value: Hashable | None = None
    code: str = ""  # the value as its family's tools write it ("2211/222", "16", "0.96"); "" without a knob

    @property
    def kwargs(self) -> dict[str, Any]:
        return {} if self.knob is None else {self.knob: self.value}

    @property
    def isr(self) -> Any:
        """The IsrConfig of an ISR level (EDAFormer, SegFormer); an AttributeError for other knobs."""
        if self.knob != "isr":
            raise AttributeError(f"level {self.name} is a {self.knob or 'knob-less'} level, not an ISR level")
        return self.value


BASE_LEVEL = Level("base", 0)


class Knob:
    """A family's inference-time compute knob. Subclasses say how values are parsed, named and checked.

    Args:
        name: the forward keyword ("isr", "pooled_size", "exit_threshold").
        training: the value the weights were trained with (full quality).
        ladder: the values offered by default, best (most compute) first; the training value first.
        runtime_input: the value is an input of the exported ONNX graph (one graph serves every value)
            rather than baked into it (one graph per value).
    """

    def __init__(self, name: str, training: Hashable, ladder: Sequence[Hashable], *, runtime_input: bool = False):
        if not ladder or ladder[0] != training:
            raise ValueError(f"knob {name}: the ladder must start at the training value {training!r}")
        self.name = name
        self.training = training
        self.runtime_input = runtime_input
        self._ladder = tuple(ladder)

    def parse(self, text: str) -> Hashable:
        """A value from its written form (CLI, config, query string)."""
        raise NotImplementedError

    def code(self, value: Hashable) -> str:
        """The value as the family's own tools write it."""
        return str(value)

    def level_name(self, value: Hashable) -> str:
        """A URL- and label-safe name for the value."""
        return self.code(value)

    def fits(self, value: Hashable, height: int, width: int) -> bool:
        """Whether a network input of this size can run at this value (default: any size)."""
        return True

    def level(self, value: Hashable, rank: int | None = None) -> Level:
        if rank is None:
            rank = self._ladder.index(value) if value in self._ladder else len(self._ladder)
        return Level(self.level_name(value), rank, self.name, value, self.code(value))

    def ladder(self) -> tuple[Level, ...]:
        return tuple(self.level(value, rank) for rank, value in enumerate(self._ladder))

    def lookup(self, text: str, ladder: Sequence[Level] | None = None) -> Level:
        """A level by name ('2211-222') or by written value ('2211/222'), from `ladder` (default: the knob's)."""
        ladder = tuple(ladder) if ladder is not None else self.ladder()
        wanted = text.strip()
        for level in ladder:
            if wanted in (level.name, level.code):
                return level
        try:
            value = self.parse(wanted)
        except (ValueError, TypeError):
            value = None
        for level in ladder:
            if value is not None and level.value == value:
                return level
        known = ", ".join(level.name for level in ladder)
        raise KeyError(f"unknown {self.name} level {text!r}; known: {known}")


class ChoiceKnob(Knob):
    """An integer knob with a small set of valid values, e.g. LRFormer's pooled size."""

    def __init__(self, name: str, training: int, ladder: Sequence[int], *, prefix: str = "",
                 valid: Callable[[int], bool] | None = None, runtime_input: bool = False) -> None:
        super().__init__(name, training, ladder, runtime_input=runtime_input)
        self.prefix = prefix
        self._valid = valid or (lambda value: value >= 1)

    def parse(self, text: str) -> int:
        stripped = text.strip()
        if self.prefix and stripped.startswith(self.prefix):
            stripped = stripped[len(self.prefix):]
        value = int(stripped)
        if not self._valid(value):
            raise ValueError(f"{self.name} {value} is not a valid value")
        return value

    def level_name(self, value: Hashable) -> str:
        return f"{self.prefix}{value}"


class ThresholdKnob(Knob):
    """A float knob where a larger value means more compute, e.g. DoViT's exit threshold (> 1: dense)."""

    def __init__(self, name: str, training: float, ladder: Sequence[float], *, prefix: str = "t",
                 runtime_input: bool = False) -> None:
        super().__init__(name, training, ladder, runtime_input=runtime_input)
        self.prefix = prefix

    def parse(self, text: str) -> float:
        stripped = text.strip()
        if stripped == "dense":
            return math.inf
        if stripped.startswith(self.prefix):
            stripped = stripped[len(self.prefix):]
        value = float(stripped)
        if math.isnan(value) or value <= 0:
            raise ValueError(f"{self.name} must be a positive number, got {text!r}")
        return value

    def code(self, value: Hashable) -> str:
        return "dense" if float(value) > 1 else f"{float(value):g}"  # type: ignore[arg-type]

    def level_name(self, value: Hashable) -> str:
        code = self.code(value)
        return code if code == "dense" else f"{self.prefix}{code}"


@dataclass(frozen=True)
class CheckpointRules:
    """How a family's checkpoints are read.

    Args:
        classifier_key: the tensor whose first dimension is the class count (after `convert`).
        unused_prefixes: keys official checkpoints carry but the forward never uses (dropped on load).
        convert: maps other layouts (e.g. Hugging Face names) into ours; returns the dict unchanged when it
            is ours already. It may raise `ValueError` for a layout it recognizes and refuses.
        unused_in_channels: input channels of an unused module (`conv_seg` of mmseg heads), so that
            `official_checkpoint` can write a file shaped like the official ones.
    """

    classifier_key: str
    unused_prefixes: tuple[str, ...] = ()
    convert: Callable[[StateDict], StateDict] | None = None
    unused_in_channels: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of segserve needs to know about one registered variant."""

    name: str  # registry name, e.g. "segformer-b0"
    family: str  # "edaformer", "segformer", "seaformer", "lrformer", "dovit"
    output_stride: int  # logits are (ceil(H / stride), ceil(W / stride)), up to a family's own rounding
    checkpoint: CheckpointRules
    knob: Knob | None = None
    # Published single-scale mIoU per dataset, from the specs (the planner's quality prior).
    published_miou: Mapping[str, float] = field(default_factory=dict)
    # Per dataset: overrides of the dataset's reference test pipeline (fields of `DatasetInfo`).
    pipelines: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Reference GMACs at 512x512 with 150 classes (spec tables), for documentation and tests.
    reference_gmacs_512: float | None = None
    # Per-image statistics `forward_with_stats` reports (DoViT: "kept_fraction", (B, taps)); ONNX outputs too.
    stats: tuple[str, ...] = ()
    # (batch, height, width) inputs the family can take, for ONNX parity checks: square, non-square, sizes that
    # are not multiples of 32 where the family allows them, and a batch of 2.
    parity_sizes: tuple[tuple[int, int, int], ...] = ((1, 512, 512), (1, 384, 640), (1, 200, 328), (2, 256, 256))
    # False where the legacy TorchScript exporter is known to export silently wrong (data-dependent shapes).
    torchscript_export_ok: bool = True
    description: str = ""

    def ladder(self) -> tuple[Level, ...]:
        """The levels offered by default, best first (a single `base` level for knob-less families)."""
        return self.knob.ladder() if self.knob is not None else (BASE_LEVEL,)

    def training_level(self) -> Level:
        return self.ladder()[0]

    def level(self, text: str, ladder: Sequence[Level] | None = None) -> Level:
        """A level by name or written value; `KeyError` naming the known ones otherwise."""
        if self.knob is None:
            if text.strip() in ("base", ""):
                return BASE_LEVEL
            raise KeyError(f"{self.name} has no compute knob; its only level is 'base'")
        return self.knob.lookup(text, ladder)

    def fits(self, level: Level, height: int, width: int) -> bool:
        return self.knob is None or level.knob is None or self.knob.fits(level.value, height, width)

    def pipeline_overrides(self, dataset: str) -> Mapping[str, Any]:
        return self.pipelines.get(dataset, {})


@dataclass(frozen=True)
class OperatingPoint:
    """One way to run a request: a model, a level of its knob, an input scale and a numeric precision.

    `scale` multiplies the dataset's reference test scale (1.0 = the reference pipeline); the mask is always
    returned at the image's size. Named `model/level@scale` (plus `:precision` when not fp32), e.g.
    `edaformer-t/2211-222@0.75` or `segformer-b0/1111@1:int8`.
    """

    model: str
    level: Level
    scale: float = 1.0
    precision: str = "fp32"  # "fp32", "fp16", "bf16" or "int8"

    @property
    def name(self) -> str:
        suffix = "" if self.precision == "fp32" else f":{self.precision}"
        return f"{self.model}/{self.level.name}@{self.scale:g}{suffix}"

    @staticmethod
    def split(text: str) -> tuple[str, str, float, str]:
        """'model/level@scale[:precision]' -> (model, level text, scale, precision); level and scale optional."""
        rest, _, precision = text.strip().partition(":")
        rest, _, scale = rest.partition("@")
        model, _, level = rest.partition("/")
        if not model:
            raise ValueError(f"operating point {text!r} names no model")
        try:
            factor = float(scale) if scale else 1.0
        except ValueError:
            raise ValueError(f"operating point {text!r}: scale {scale!r} is not a number") from None
        if not 0 < factor <= 4:
            raise ValueError(f"operating point {text!r}: scale must be in (0, 4]")
        return model, level, factor, precision or "fp32"
