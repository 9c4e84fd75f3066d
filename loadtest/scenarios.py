"""Request mixes: which images are sent, with which budgets, and when.

A scenario is turned into a concrete, pre-built list of `RequestSpec` per load step before the step
starts, so that nothing on the sending path (image generation, random draws) competes with the
servers for the CPU while they are measured.

- Image sizes: a weighted mix of (height, width); a few base JPEGs per size, made unique per request by
  a JPEG comment segment (same pixels, different bytes, so a different cache key; see `unique_jpeg`).
- Repeats: a share of requests re-sends an image from a small hot set, the only ones the result
  cache can answer.
- Budgets: per request, uniform between `budget_low_ms` and `budget_high_ms`.
- Arrivals: open-loop Poisson at the offered rate; in a burst step the rate is raised `burst_factor`
  times for `burst_length_s` out of every `burst_every_s`, the base rate lowered so the mean stays the
  offered rate.
"""

from __future__ import annotations

import io
import itertools
import random
import struct
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

Size = tuple[int, int]  # (height, width)

# 4:3 landscape at the serving scale, the same at VGA (downscaled by the server: more decode work), a
# smaller one (upscaled) and a portrait one (a second network input shape, hence a second batch queue).
DEFAULT_SIZES: dict[Size, float] = {(256, 341): 0.4, (480, 640): 0.2, (240, 320): 0.2, (341, 256): 0.2}
BASE_IMAGES_PER_SIZE = 4


@dataclass(frozen=True)
class LoadStep:
    """One step of the sweep: offered load as a fraction of measured capacity, with or without bursts."""

    fraction: float
    burst: bool = False

    @property
    def label(self) -> str:
        return f"{self.fraction * 100:g}%" + (" +burst" if self.burst else "")

    @classmethod
    def parse_list(cls, text: str) -> list[LoadStep]:
        """'0.25,0.5,0.8,0.8b' -> steps; a trailing 'b' marks a burst step."""
        steps = []
        for part in (p.strip().lower() for p in text.split(",") if p.strip()):
            burst = part.endswith("b")
            fraction = float(part.rstrip("b"))
            if not 0 < fraction <= 10:
                raise ValueError(f"load fraction {fraction} is outside (0, 10]")
            steps.append(cls(fraction, burst))
        if not steps:
            raise ValueError("no load steps given")
        return steps


@dataclass(frozen=True)
class Scenario:
    sizes: dict[Size, float] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    repeat_share: float = 0.2
    hot_set: int = 16  # distinct images behind the repeated share
    budget_low_ms: float = 100.0
    budget_high_ms: float = 300.0
    burst_every_s: float = 10.0
    burst_length_s: float = 1.0
    burst_factor: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or any(w <= 0 for w in self.sizes.values()):
            raise ValueError("sizes need at least one size with a positive weight")
        if not 0 <= self.repeat_share <= 1:
            raise ValueError(f"repeat share {self.repeat_share} is outside [0, 1]")
        if not 0 < self.budget_low_ms <= self.budget_high_ms:
            raise ValueError(f"budget range {self.budget_low_ms}..{self.budget_high_ms} ms is not increasing")
        if not 0 < self.burst_length_s < self.burst_every_s or self.burst_factor < 1:
            raise ValueError("bursts need 0 < length < period and a factor >= 1")

    def describe(self) -> dict:
        return {
            "sizes": {f"{h}x{w}": weight for (h, w), weight in self.sizes.items()},
            "repeat_share": self.repeat_share, "hot_set": self.hot_set,
            "budget_ms": [round(self.budget_low_ms, 1), round(self.budget_high_ms, 1)],
            "bursts": {"every_s": self.burst_every_s, "length_s": self.burst_length_s, "factor": self.burst_factor},
            "seed": self.seed,
        }


def parse_sizes(text: str) -> dict[Size, float]:
    """'256x341:0.4,480x640:0.2' (HxW[:weight]) -> {(256, 341): 0.4, (480, 640): 0.2}."""
    sizes: dict[Size, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        shape, _, weight = part.partition(":")
        height, width = (int(v) for v in shape.lower().split("x"))
        sizes[(height, width)] = float(weight) if weight else 1.0
    return sizes


@dataclass(frozen=True)
class RequestSpec:
    at_s: float  # send time, relative to the step start
    image: bytes
    size: Size
    budget_ms: float
    repeated: bool


def synthetic_jpeg(size: Size, seed: int) -> bytes:
    """A photo-like JPEG (gradients, waves, noise): real decode work, compressible like a photo."""
    height, width = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([
        xx * 255 / max(1, width - 1),
        yy * 255 / max(1, height - 1),
        128 + 100 * np.sin(xx / (5 + seed % 7)) * np.cos(yy / (7 + seed % 5)),
    ], axis=-1) + rng.normal(0, 8, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def unique_jpeg(base: bytes, tag: int) -> bytes:
    """`base` with a COM segment after SOI: identical pixels, distinct bytes (so a distinct cache key).

    Re-encoding an image per request would cost the sender milliseconds of CPU per request.
    """
    payload = f"segserve-loadtest {tag}".encode()
    return base[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + base[2:]


def poisson_arrivals(rate: float, duration_s: float, rng: random.Random, *, burst: Scenario | None = None,
                     max_requests: int | None = None) -> list[float]:
    """Send times in [0, duration) of a Poisson process at mean `rate`/s, optionally with periodic bursts."""
    if rate <= 0:
        return []
    base, high = rate, rate
    if burst is not None:
        share = burst.burst_length_s / burst.burst_every_s
        base = rate / (1 + share * (burst.burst_factor - 1))  # keeps the mean rate at `rate`
        high = base * burst.burst_factor
    times: list[float] = []
    now = 0.0
    while now < duration_s and (max_requests is None or len(times) < max_requests):
        in_burst = burst is not None and (now % burst.burst_every_s) >= burst.burst_every_s - burst.burst_length_s
        current = high if in_burst else base
        gap = rng.expovariate(current)
        if burst is not None:
            # The process is memoryless: an arrival that would cross a rate boundary restarts from it.
            phase = now % burst.burst_every_s
            edge = burst.burst_every_s - burst.burst_length_s
            boundary = now + ((burst.burst_every_s - phase) if in_burst else (edge - phase))
            if now + gap >= boundary:
                now = boundary
                continue
        now += gap
        if now < duration_s:
            times.append(now)
    return times


class RequestFactory:
    """Builds request lists for one server; unique images never repeat across that server's steps."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.rng = random.Random(scenario.seed)
        self._sizes = list(scenario.sizes)
        self._weights = [scenario.sizes[s] for s in self._sizes]
        self._bases = {
            size: [synthetic_jpeg(size, seed=scenario.seed * 1000 + i * 17 + size[0])
                   for i in range(BASE_IMAGES_PER_SIZE)]
            for size in self._sizes
        }
        self._tags = itertools.count()
        # The hot set: fixed images (with their sizes) that the repeated share draws from.
        self._hot = [self._fresh() for _ in range(max(1, scenario.hot_set))]

    def _fresh(self) -> tuple[bytes, Size]:
        size = self.rng.choices(self._sizes, self._weights)[0]
        base = self.rng.choice(self._bases[size])
        return unique_jpeg(base, next(self._tags)), size

    def budget_ms(self) -> float:
        return self.rng.uniform(self.scenario.budget_low_ms, self.scenario.budget_high_ms)

    def one(self, at_s: float = 0.0) -> RequestSpec:
        repeated = self.rng.random() < self.scenario.repeat_share
        image, size = self.rng.choice(self._hot) if repeated else self._fresh()
        return RequestSpec(at_s, image, size, self.budget_ms(), repeated)

    def fresh(self) -> RequestSpec:
        """A never-seen image (capacity probes must not be cache hits)."""
        image, size = self._fresh()
        return RequestSpec(0.0, image, size, self.budget_ms(), False)

    def step(self, rate: float, duration_s: float, burst: bool, max_requests: int) -> list[RequestSpec]:
        times = poisson_arrivals(rate, duration_s, self.rng, burst=self.scenario if burst else None,
                                 max_requests=max_requests)
        return [self.one(at) for at in times]
