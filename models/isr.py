"""Inference Spatial Reduction settings and the named level ladder.

`IsrConfig` holds the same numbers as the official `reduction_ratios`:

- encoder (a, b, c, d): stage i pools keys/values by `[8, 4, 2, 1][i] * ratio[i]`;
- decoder (a, b, c): the stage-2, -3 and -4 branches pool by `[4a, 2b, c]`.

`IsrConfig()` is the training setting, 1111/111. Changing it changes no weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from models.spec import Knob, Level

ENCODER_BASE_POOL = (8, 4, 2, 1)
DECODER_BASE_POOL = (4, 2, 1)  # stage-2, stage-3, stage-4 branches
ENCODER_STRIDES = (4, 8, 16, 32)
DECODER_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class IsrConfig:
    """Reduction ratios; `IsrConfig()` is full compute (the training setting)."""

    encoder: tuple[int, int, int, int] = (1, 1, 1, 1)
    decoder: tuple[int, int, int] = (1, 1, 1)

    def __post_init__(self) -> None:
        encoder, decoder = tuple(self.encoder), tuple(self.decoder)
        if len(encoder) != 4 or len(decoder) != 3:
            raise ValueError(f"ISR needs 4 encoder and 3 decoder ratios, got {encoder} / {decoder}")
        if any(not isinstance(r, int) or r < 1 for r in encoder + decoder):
            raise ValueError(f"ISR ratios must be positive integers, got {encoder} / {decoder}")
        # Accept lists from JSON or YAML, store tuples so the config stays hashable.
        object.__setattr__(self, "encoder", encoder)
        object.__setattr__(self, "decoder", decoder)

    @property
    def encoder_pools(self) -> tuple[int, ...]:
        return tuple(base * r for base, r in zip(ENCODER_BASE_POOL, self.encoder, strict=True))

    @property
    def decoder_pools(self) -> tuple[int, ...]:
        return tuple(base * r for base, r in zip(DECODER_BASE_POOL, self.decoder, strict=True))

    @property
    def code(self) -> str:
        """The compact form used by the official CLI and ours, e.g. '2211/222'."""
        return "".join(map(str, self.encoder)) + "/" + "".join(map(str, self.decoder))

    @classmethod
    def parse(cls, text: str) -> IsrConfig:
        """Parse '2211/222' (single digits, as the official tools) or '2,2,1,1/2,2,2'."""
        match = re.fullmatch(r"\s*([\d,]+)\s*[/-]\s*([\d,]+)\s*", text)
        if not match:
            raise ValueError(f"ISR setting {text!r} is not of the form '2211/222'")

        def ratios(part: str) -> tuple[int, ...]:
            return tuple(int(p) for p in (part.split(",") if "," in part else part))

        return cls(ratios(match.group(1)), ratios(match.group(2)))  # type: ignore[arg-type]

    def min_input_side(self) -> int:
        """Smallest input side (pixels) for which every pooling window fits at least once.

        A feature map smaller than its pooling kernel would leave no key/value tokens.
        """
        # Feature sides are ceil(side / stride), so side > stride * (pool - 1) leaves >= 1 window.
        return max(stride * (pool - 1) + 1 for stride, pool in self._stride_pool_pairs())

    def _stride_pool_pairs(self) -> list[tuple[int, int]]:
        pairs = list(zip(ENCODER_STRIDES, self.encoder_pools, strict=True))
        return pairs + list(zip(DECODER_STRIDES, self.decoder_pools, strict=True))

    def fits(self, height: int, width: int) -> bool:
        """Whether an input of this size leaves at least one key/value token everywhere."""
        for stride, pool in self._stride_pool_pairs():
            if math.ceil(height / stride) < pool or math.ceil(width / stride) < pool:
                return False
        return True


class IsrKnob(Knob):
    """The ISR knob (`isr=IsrConfig(...)`): EDAFormer pools encoder and decoder, SegFormer the encoder only.

    Args:
        ladder: ISR codes, best first; the first must be the training setting.
        fits: whether an input (height, width) leaves key/value tokens everywhere at a setting; each
            family pools at different places, so it says.
        encoder_only: SegFormer's all-MLP head has no attention: levels are named by the encoder ratios
            alone ('2211') and the decoder ratios must stay 1.
    """

    def __init__(self, ladder: Sequence[str], fits: Callable[[IsrConfig, int, int], bool], *,
                 encoder_only: bool = False) -> None:
        self.encoder_only = encoder_only
        self._fits = fits
        values = [self.parse(code) for code in ladder]
        super().__init__("isr", values[0], values)

    def parse(self, text: str) -> IsrConfig:
        text = text.strip()
        if self.encoder_only and re.fullmatch(r"[\d,]+", text):
            text = f"{text}/111"
        isr = IsrConfig.parse(text)
        if self.encoder_only and isr.decoder != (1, 1, 1):
            raise ValueError(f"ISR {text!r}: this model has no decoder attention, so its decoder ratios stay 111")
        return isr

    def code(self, value: Hashable) -> str:
        assert isinstance(value, IsrConfig)
        return "".join(map(str, value.encoder)) if self.encoder_only else value.code

    def level_name(self, value: Hashable) -> str:
        return self.code(value).replace("/", "-")

    def fits(self, value: Hashable, height: int, width: int) -> bool:
        assert isinstance(value, IsrConfig)
        return self._fits(value, height, width)


# Ordered from full compute to the cheapest useful setting. Every step lowers GMACs for EDAFormer-T
# and -B at 512x512 and 1024x2048 (see docs/benchmarks.md); stage-4 encoder pooling (2222) is the last
# step because it saves little and touches the coarsest, most semantic tokens.
EDAFORMER_ISR = IsrKnob(
    ["1111/111", "2111/111", "2211/111", "2211/222", "2221/222", "2222/222"],
    fits=lambda isr, height, width: isr.fits(height, width),
)
LADDER: tuple[Level, ...] = EDAFORMER_ISR.ladder()
IsrLevel = Level  # the name wave 1 used for an EDAFormer ladder level


def level_by_name(name: str, ladder: tuple[Level, ...] = LADDER) -> Level:
    """Look an EDAFormer level up by name ('2211-222') or by its ISR code ('2211/222')."""
    return EDAFORMER_ISR.lookup(name, ladder)
