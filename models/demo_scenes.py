"""Procedurally generated outdoor scenes with exact label maps: the data the demo weights learn from.

Ten classes, each defined by a shape AND a texture, with colours that overlap between classes on purpose
(blue sky and blue water, green grass and green trees, grey road and grey mountains, cars of any colour), so
that a network has to learn ripples from clouds and blades from foliage, not a colour lookup.

    image, labels = generate_scene(seed=7, height=256, width=256)   # RGB uint8 (H, W, 3), uint8 (H, W)
    write_labelled_set("heldout/", count=64, seed=DEMO_HELDOUT_SEED)  # ADE20K layout, for `segserve evaluate`

A scene is a function of its seed and size alone (numpy's PCG64 and OpenCV's deterministic drawing), so
training and the held-out set are reproducible anywhere. Layout: a horizon, sky above it, mountains and
buildings standing on it, a grass or sand ground with lakes and a road below it, then trees, cars and people
painted far to near with sizes that grow towards the bottom of the image (a cheap perspective).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from models.datasets import DATASETS, DatasetInfo

DEMO: DatasetInfo = DATASETS["demo"]  # class names, palette and the test pipeline (256 short side)
CLASS_NAMES, PALETTE = DEMO.class_names, DEMO.palette
SKY, GRASS, WATER, ROAD, BUILDING, TREE, CAR, PERSON, SAND, MOUNTAIN = range(len(CLASS_NAMES))
# Seeds: training draws scene seeds from TRAIN_SEED upwards, the held-out set from DEMO_HELDOUT_SEED upwards
# (far apart, so the sets never share a scene); examples/ use their own seeds.
TRAIN_SEED = 0
DEMO_HELDOUT_SEED = 10_000_000

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "demo"

Texture = Callable[[np.random.Generator, int, int], np.ndarray]  # (rng, h, w) -> float32 (h, w, 3) on 0-255


# --- textures --------------------------------------------------------------------------------------------

def _noise(rng: np.random.Generator, height: int, width: int, cell_y: float, cell_x: float | None = None) -> np.ndarray:
    """Smooth value noise in [0, 1]: random values on a coarse grid (cells of cell_y x cell_x), upsampled."""
    cell_x = cell_y if cell_x is None else cell_x
    coarse = rng.random((max(2, int(height / cell_y) + 2), max(2, int(width / cell_x) + 2)), dtype=np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _fractal(rng: np.random.Generator, height: int, width: int, cell: float, octaves: int = 3) -> np.ndarray:
    total, weight = np.zeros((height, width), np.float32), 0.0
    for octave in range(octaves):
        amplitude = 0.5**octave
        total += amplitude * _noise(rng, height, width, max(1.0, cell / 2**octave))
        weight += amplitude
    return total / weight


def _tint(base: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """A colour (3,) modulated by a shade map (h, w) around 1."""
    return shade[..., None] * base[None, None, :].astype(np.float32)


def _jitter(rng: np.random.Generator, color: tuple[int, int, int], spread: float = 25) -> np.ndarray:
    return np.clip(np.asarray(color, np.float32) + rng.normal(0, spread, 3), 0, 255)


def _sky(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    top, low = [((40, 90, 200), (170, 200, 235)), ((110, 110, 120), (190, 190, 195)), ((60, 60, 140), (240, 150, 90))][
        rng.choice(3, p=[0.6, 0.25, 0.15])]
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None] ** 0.7
    image = (1 - ramp) * _jitter(rng, top, 15) + ramp * _jitter(rng, low, 15)
    clouds = np.clip((_fractal(rng, h, w, 48) - 0.5) * 3, 0, 1)[..., None] * rng.uniform(0.3, 0.9)
    return np.broadcast_to(image, (h, w, 3)) * (1 - clouds) + 245 * clouds


def _grass(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _jitter(rng, [(70, 140, 40), (110, 150, 50), (40, 100, 30), (150, 150, 70)][rng.integers(4)], 15)
    blades = _noise(rng, h, w, 6, 1.2)  # tall thin cells: vertical blades
    return _tint(base, 0.6 + 0.8 * blades) * (0.85 + 0.3 * _noise(rng, h, w, 40))[..., None]


def _water(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _jitter(rng, [(30, 80, 160), (40, 110, 130), (70, 90, 110), (20, 60, 90)][rng.integers(4)], 15)
    ripples = _noise(rng, h, w, 1.5, 24)  # wide flat cells: horizontal ripples
    glints = (ripples > 0.85).astype(np.float32)[..., None] * 70
    return _tint(base, 0.75 + 0.5 * ripples) + glints


def _road(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _jitter(rng, (95, 95, 100), 20)
    speckle = rng.normal(1.0, 0.12, (h, w)).astype(np.float32)
    return _tint(base, speckle * (0.9 + 0.2 * _noise(rng, h, w, 30)))


def _sand(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _jitter(rng, [(220, 195, 140), (200, 170, 120), (235, 220, 180)][rng.integers(3)], 12)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dunes = np.sin((yy * rng.uniform(0.2, 0.5) + xx * rng.uniform(-0.2, 0.2)) + 6 * _noise(rng, h, w, 30))
    grain = rng.normal(1.0, 0.05, (h, w)).astype(np.float32)
    return _tint(base, (0.9 + 0.08 * dunes) * grain)


def _mountain(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _jitter(rng, [(110, 110, 115), (120, 100, 85), (90, 95, 110)][rng.integers(3)], 15)
    ridges = 1 - np.abs(2 * _fractal(rng, h, w, 20) - 1)  # sharp ridged noise, unlike any other class
    return _tint(base, 0.55 + 0.7 * ridges**2)


def _tree(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    greens = [(40, 110, 40), (30, 80, 35), (90, 130, 40), (170, 100, 30)]  # and an autumn orange, now and then
    base = _jitter(rng, greens[rng.choice(4, p=[0.4, 0.3, 0.2, 0.1])], 12)
    leaves = _noise(rng, h, w, 3.5)
    clumps = _noise(rng, h, w, 12)
    return _tint(base, 0.35 + 0.9 * leaves * (0.5 + clumps))


def _plain(color: tuple[int, int, int], spread: float = 30) -> Texture:
    def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
        shade = 0.85 + 0.15 * np.linspace(1, 0, h, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)
        return _tint(_jitter(rng, color, spread), shade)

    return texture


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(20, 236, 3))  # type: ignore[return-value]


# --- painting --------------------------------------------------------------------------------------------

class _Canvas:
    def __init__(self, height: int, width: int) -> None:
        self.image = np.zeros((height, width, 3), np.float32)
        self.labels = np.zeros((height, width), np.uint8)

    def paint(self, mask: np.ndarray, texture: Texture | np.ndarray, label: int | None,
              rng: np.random.Generator) -> None:
        """Fill `mask` with a texture (generated over the mask's bounding box only) and, unless None, a label."""
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if rows.size == 0:
            return
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        local = mask[y0:y1, x0:x1]
        size = (y1 - y0, x1 - x0)
        pixels = texture(rng, *size) if callable(texture) else np.broadcast_to(texture, (*size, 3))
        self.image[y0:y1, x0:x1][local] = pixels[local]
        if label is not None:
            self.labels[y0:y1, x0:x1][local] = label


def _mask(height: int, width: int) -> np.ndarray:
    return np.zeros((height, width), np.uint8)


def _polygon(height: int, width: int, points: list[tuple[float, float]]) -> np.ndarray:
    mask = _mask(height, width)
    cv2.fillPoly(mask, [np.round(np.asarray(points)).astype(np.int32)], 1)
    return mask.astype(bool)


def _draw_mountains(canvas: _Canvas, rng: np.random.Generator, horizon: int) -> None:
    height, width = canvas.labels.shape
    peaks = rng.integers(2, 6)
    xs = np.sort(np.concatenate([[0, width], rng.uniform(0, width, peaks * 2)]))
    # Alternate peaks and saddles.
    tops = [horizon - (rng.uniform(0.05, 0.35) * (i % 2) + rng.uniform(0, 0.05)) * height for i in range(len(xs))]
    points = [(0.0, horizon + 1.0), *zip(xs, tops, strict=True), (float(width), horizon + 1.0)]
    canvas.paint(_polygon(height, width, points), _mountain, MOUNTAIN, rng)


def _draw_buildings(canvas: _Canvas, rng: np.random.Generator, horizon: int) -> None:
    height, width = canvas.labels.shape
    x = rng.uniform(-0.1, 0.3) * width
    while x < width and rng.random() < 0.85:
        bw, bh = rng.uniform(0.08, 0.25) * width, rng.uniform(0.1, 0.45) * height
        x0, x1, y0, y1 = int(x), int(x + bw), int(horizon - bh), int(horizon + 0.02 * height)
        mask = _mask(height, width)
        cv2.rectangle(mask, (x0, y0), (x1, y1), 1, -1)
        if rng.random() < 0.3:  # a pitched roof
            cv2.fillPoly(mask, [np.array([[x0, y0], [x1, y0], [(x0 + x1) // 2, int(y0 - 0.4 * bw)]], np.int32)], 1)
        facade = _jitter(rng, [(150, 70, 50), (160, 160, 160), (210, 195, 160), (90, 110, 140), (235, 235, 225)][
            rng.integers(5)], 15)
        canvas.paint(mask.astype(bool), _windows(facade, rng), BUILDING, rng)
        x += bw * rng.uniform(0.7, 1.6)


def _windows(facade: np.ndarray, rng: np.random.Generator) -> Texture:
    """A facade with a regular grid of windows: the building's signature texture."""
    step_x, step_y = int(rng.integers(6, 14)), int(rng.integers(7, 16))
    glass = _jitter(rng, (60, 70, 90), 25) if rng.random() < 0.7 else _jitter(rng, (230, 220, 150), 20)

    def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
        yy, xx = np.mgrid[0:h, 0:w]
        window = ((xx % step_x) >= step_x * 0.45) & ((yy % step_y) >= step_y * 0.4)
        image = _tint(facade, 0.9 + 0.2 * _noise(rng, h, w, 20))
        image[window] = glass * rng.uniform(0.8, 1.1)
        return image

    return texture


def _ground_patch(canvas: _Canvas, rng: np.random.Generator, horizon: int, texture: Texture, label: int) -> None:
    """A lake or field: an irregular blob below the horizon (clipped at it)."""
    height, width = canvas.labels.shape
    cy = rng.uniform(horizon, height)
    cx, ry, rx = rng.uniform(0, width), rng.uniform(0.08, 0.3) * height, rng.uniform(0.15, 0.5) * width
    angles = np.sort(rng.uniform(0, 2 * np.pi, 10))
    radius = rng.uniform(0.6, 1.0, 10)
    points = [(cx + rx * r * np.cos(a), max(cy + ry * r * np.sin(a), horizon + 1)) for a, r in zip(angles, radius,
                                                                                                    strict=True)]
    canvas.paint(_polygon(height, width, points), texture, label, rng)


def _draw_road(canvas: _Canvas, rng: np.random.Generator, horizon: int) -> tuple[np.ndarray, float]:
    """A perspective road to a vanishing point, or a band across the ground; returns its mask and centre x."""
    height, width = canvas.labels.shape
    if rng.random() < 0.6:
        vanish = rng.uniform(0.2, 0.8) * width
        half = rng.uniform(0.3, 0.7) * width
        bottom = vanish + rng.uniform(-0.3, 0.3) * width
        points = [(vanish - 2, horizon + 1), (vanish + 2, horizon + 1), (bottom + half, height),
                  (bottom - half, height)]
        line = [(vanish, horizon + 1), (bottom, height)]
    else:
        top = rng.uniform(horizon + 0.05 * height, height * 0.85)
        thick = rng.uniform(0.08, 0.2) * height
        points = [(0, top), (width, top + rng.uniform(-0.05, 0.05) * height), (width, top + thick), (0, top + thick)]
        line = [(0, top + thick / 2), (width, top + thick / 2)]
        bottom = width / 2
    mask = _polygon(height, width, points)
    canvas.paint(mask, _road, ROAD, rng)
    markings = _mask(height, width)
    cv2.line(markings, tuple(map(int, line[0])), tuple(map(int, line[1])), 1, max(1, height // 120))
    dashes = (np.arange(height)[:, None] // max(2, height // 25) + np.arange(width)[None, :] // max(2, width // 12)) % 2
    canvas.paint(markings.astype(bool) & (dashes == 0) & mask, _jitter(rng, (235, 235, 220), 10), ROAD, rng)
    return mask, bottom


def _draw_tree(canvas: _Canvas, rng: np.random.Generator, x: float, base: float, size: float) -> None:
    height, width = canvas.labels.shape
    mask = _mask(height, width)
    trunk_w, trunk_h = max(1, int(size * 0.12)), size * 0.45
    cv2.rectangle(mask, (int(x - trunk_w / 2), int(base - trunk_h)), (int(x + trunk_w / 2), int(base)), 1, -1)
    canvas.paint(mask.astype(bool), _plain((90, 60, 35), 15), TREE, rng)
    crown = _mask(height, width)
    for _ in range(rng.integers(3, 7)):
        cx, cy = x + rng.uniform(-0.3, 0.3) * size, base - trunk_h - rng.uniform(0.1, 0.5) * size
        cv2.circle(crown, (int(cx), int(cy)), max(1, int(size * rng.uniform(0.2, 0.4))), 1, -1)
    canvas.paint(crown.astype(bool), _tree, TREE, rng)


def _draw_car(canvas: _Canvas, rng: np.random.Generator, x: float, base: float, size: float) -> None:
    height, width = canvas.labels.shape
    length, body_h = size, size * 0.3
    x0, x1, y1 = int(x - length / 2), int(x + length / 2), int(base - size * 0.08)
    body = _mask(height, width)
    cv2.rectangle(body, (x0, int(y1 - body_h)), (x1, y1), 1, -1)
    cabin = np.array([[x0 + length * 0.2, y1 - body_h], [x0 + length * 0.3, y1 - body_h * 1.9],
                      [x0 + length * 0.7, y1 - body_h * 1.9], [x0 + length * 0.85, y1 - body_h]], np.int32)
    cv2.fillPoly(body, [cabin], 1)
    canvas.paint(body.astype(bool), _plain(_random_color(rng), 5), CAR, rng)
    glass = _mask(height, width)
    cv2.fillPoly(glass, [np.round(cabin * 0.8 + cabin.mean(axis=0) * 0.2).astype(np.int32)], 1)
    canvas.paint(glass.astype(bool), _jitter(rng, (150, 180, 200), 20), CAR, rng)
    wheels = _mask(height, width)
    for wheel_x in (x0 + length * 0.22, x0 + length * 0.78):
        cv2.circle(wheels, (int(wheel_x), y1), max(1, int(size * 0.12)), 1, -1)
    canvas.paint(wheels.astype(bool), _jitter(rng, (25, 25, 25), 5), CAR, rng)


def _draw_person(canvas: _Canvas, rng: np.random.Generator, x: float, base: float, size: float) -> None:
    height, width = canvas.labels.shape
    unit = size / 8  # a person is about 8 heads tall
    legs, torso = _mask(height, width), _mask(height, width)
    stride = unit * rng.uniform(0.2, 0.9)
    for side in (-1, 1):
        cv2.line(legs, (int(x + side * unit * 0.3), int(base - 4 * unit)), (int(x + side * stride), int(base)), 1,
                 max(1, int(unit * 0.7)))
    cv2.rectangle(torso, (int(x - unit), int(base - 7 * unit)), (int(x + unit), int(base - 3.8 * unit)), 1, -1)
    for side in (-1, 1):
        cv2.line(torso, (int(x + side * unit), int(base - 6.7 * unit)),
                 (int(x + side * unit * rng.uniform(1.2, 2.2)), int(base - 4 * unit)), 1, max(1, int(unit * 0.5)))
    canvas.paint(legs.astype(bool), _plain(_random_color(rng), 10), PERSON, rng)
    canvas.paint(torso.astype(bool), _plain(_random_color(rng), 10), PERSON, rng)
    head = _mask(height, width)
    cv2.circle(head, (int(x), int(base - 7.5 * unit)), max(1, int(unit * 0.6)), 1, -1)
    skin = [(240, 200, 170), (200, 150, 110), (140, 95, 65), (90, 60, 45)][rng.integers(4)]
    canvas.paint(head.astype(bool), _jitter(rng, skin, 10), PERSON, rng)


def generate_scene(seed: int, height: int = 256, width: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A scene and its exact label map: RGB uint8 (H, W, 3) and class ids uint8 (H, W) in [0, 10)."""
    rng = np.random.default_rng([seed, height, width])
    canvas = _Canvas(height, width)
    horizon = int(rng.uniform(0.28, 0.6) * height)
    canvas.paint(np.ones((height, width), bool), _sky, SKY, rng)
    if rng.random() < 0.5:
        _draw_mountains(canvas, rng, horizon)
    if rng.random() < 0.6:
        _draw_buildings(canvas, rng, horizon)
    ground = np.zeros((height, width), bool)
    ground[horizon + 1:] = True
    sandy = rng.random() < 0.3
    canvas.paint(ground, _sand if sandy else _grass, SAND if sandy else GRASS, rng)
    if rng.random() < 0.25:  # a sea or lake shore along the horizon
        shore = ground.copy()
        shore[int(horizon + rng.uniform(0.1, 0.5) * (height - horizon)):] = False
        canvas.paint(shore, _water, WATER, rng)
    for _ in range(rng.integers(0, 4)):
        texture, label = [(_water, WATER), (_grass, GRASS), (_sand, SAND)][rng.choice(3, p=[0.6, 0.2, 0.2])]
        _ground_patch(canvas, rng, horizon, texture, label)
    road, road_x = (_draw_road(canvas, rng, horizon) if rng.random() < 0.7 else (None, width / 2))
    _draw_objects(canvas, rng, horizon, road, road_x)
    return _finish(canvas, rng), canvas.labels


def _draw_objects(canvas: _Canvas, rng: np.random.Generator, horizon: int, road: np.ndarray | None,
                  road_x: float) -> None:
    """Trees, cars and people, far (near the horizon) to near, sized by their distance below the horizon."""
    height, width = canvas.labels.shape
    objects: list[tuple[float, float, str]] = []
    for _ in range(rng.integers(0, 5)):
        objects.append((rng.uniform(horizon + 2, height + 0.1 * height), rng.uniform(0, width), "tree"))
    for _ in range(rng.integers(0, 5)):
        objects.append((rng.uniform(horizon + 2, height * 1.05), rng.uniform(0, width), "person"))
    if road is not None:
        road_rows, road_cols = np.nonzero(road)
        for _ in range(rng.integers(0, 4)):
            pick = rng.integers(len(road_rows)) if len(road_rows) else None
            if pick is not None:
                objects.append((float(road_rows[pick]), float(road_cols[pick]), "car"))
    depth_span = max(1.0, height - horizon)
    for base, x, kind in sorted(objects):
        nearness = 0.15 + 0.85 * (base - horizon) / depth_span  # 0.15 at the horizon, 1 at the bottom
        if kind == "tree":
            _draw_tree(canvas, rng, x, base, nearness * rng.uniform(0.25, 0.55) * height)
        elif kind == "car":
            _draw_car(canvas, rng, x, base, nearness * rng.uniform(0.3, 0.5) * width)
        else:
            _draw_person(canvas, rng, x, base, nearness * rng.uniform(0.25, 0.45) * height)


def _finish(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Global lighting, a little blur and sensor noise: the same class looks different from scene to scene."""
    image = canvas.image * rng.uniform(0.75, 1.2) + rng.uniform(-20, 20)
    if rng.random() < 0.5:
        image = cv2.GaussianBlur(image, (3, 3), rng.uniform(0.3, 1.0))
    image = image + rng.normal(0, rng.uniform(1, 6), image.shape).astype(np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def write_labelled_set(folder: str | Path, count: int, seed: int = DEMO_HELDOUT_SEED,
                       sizes: tuple[tuple[int, int], ...] = ((256, 256),), jpeg_quality: int = 95) -> Path:
    """Write `count` scenes in the ADE20K layout: images/NNNN.jpg and annotations/NNNN.png (class id + 1,
    0 = ignore, as ADE20K stores them, so `segserve evaluate` reads them with reduce_zero_label).

    `sizes` (H, W) are used in turn, so a set can mix square and non-square images.
    """
    from PIL import Image

    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        height, width = sizes[index % len(sizes)]
        image, labels = generate_scene(seed + index, height, width)
        Image.fromarray(image).save(root / "images" / f"{index:05d}.jpg", quality=jpeg_quality)
        Image.fromarray(labels + 1).save(root / "annotations" / f"{index:05d}.png")
    return root


def demo_weights_path(model: str) -> Path | None:
    """The shipped demo weights of a model (fp16 safetensors, demo label space), or None when none ship."""
    path = WEIGHTS_DIR / f"{model}.safetensors"
    return path if path.is_file() else None


def demo_quality_table_path(model: str) -> Path | None:
    """The quality table measured for a model's demo weights on the held-out demo set, or None."""
    path = WEIGHTS_DIR / f"{model}.quality.json"
    return path if path.is_file() else None
