"""Dataset metadata (class names, colour palettes, test-time settings) for the supported checkpoints.

The class names and palettes are the ones used by mmsegmentation (and therefore by the official
EDAFormer repository, an MMSeg 0.13 fork) so that predictions map onto the same labels and colours as
the published results. They are reproduced verbatim, quirks included: ADE20K's class 7 is spelled
``"bed "`` (trailing space) and a few palette entries repeat (one in ADE20K, several in COCO-Stuff).

Test-time settings follow the official EDAFormer configs:

* ADE20K / COCO-Stuff-164k: whole-image inference, keep-ratio resize into (2048, 512) followed by an
  ``AlignedResize`` to multiples of 32.
* Cityscapes: keep-ratio resize into (2048, 1024), sliding-window inference with 1024x1024 crops and
  a 768x768 stride.
"""

from __future__ import annotations

import colorsys
import functools
import random
from dataclasses import dataclass

__all__ = ["DATASETS", "DatasetInfo", "dataset_for", "dataset_named_by_classes", "generic_palette"]

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a segmentation dataset's label space and evaluation pipeline."""

    name: str
    class_names: tuple[str, ...]
    palette: tuple[RGB, ...]
    test_mode: str = "whole"
    resize_scale: tuple[int, int] = (2048, 512)  # mmseg-style (w_max, h_max) keep-ratio scale
    align_to: int | None = 32
    slide_crop: tuple[int, int] | None = None
    slide_stride: tuple[int, int] | None = None
    # Input normalization on the 0-255 RGB scale; ImageNet's unless a family's pipeline says otherwise
    # (Segmenter/DoViT: mean = std = 127.5).
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.palette):
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names but {len(self.palette)} palette entries"
            )
        if self.test_mode not in ("whole", "slide"):
            raise ValueError(f"{self.name}: unknown test_mode {self.test_mode!r}")
        if self.test_mode == "slide" and (self.slide_crop is None or self.slide_stride is None):
            raise ValueError(f"{self.name}: slide mode needs slide_crop and slide_stride")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --- data: class names and palettes, as in mmseg/datasets/{ade,cityscapes,cocostuff}.py ---------------

# fmt: off
_ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

_ADE20K_PALETTE: tuple[RGB, ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255), (8, 255, 214),
    (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255), (224, 255, 8),
    (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153),
    (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0),
    (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255),
    (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255),
    (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255),
    (71, 255, 0), (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0),
    (255, 0, 235), (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255),
    (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

_CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)

_CITYSCAPES_PALETTE: tuple[RGB, ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

_COCO_STUFF_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch",
    "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other",
    "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt",
    "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill",
    "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
    "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other",
    "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)

_COCO_STUFF_PALETTE: tuple[RGB, ...] = (
    (0, 192, 64), (0, 192, 64), (0, 64, 96), (128, 192, 192), (0, 64, 64), (0, 192, 224), (0, 192, 192),
    (128, 192, 64), (0, 192, 96), (128, 192, 64), (128, 32, 192), (0, 0, 224), (0, 0, 64), (0, 160, 192),
    (128, 0, 96), (128, 0, 192), (0, 32, 192), (128, 128, 224), (0, 0, 192), (128, 160, 192),
    (128, 128, 0), (128, 0, 32), (128, 32, 0), (128, 0, 128), (64, 128, 32), (0, 160, 0), (0, 0, 0),
    (192, 128, 160), (0, 32, 0), (0, 128, 128), (64, 128, 160), (128, 160, 0), (0, 128, 0),
    (192, 128, 32), (128, 96, 128), (0, 0, 128), (64, 0, 32), (0, 224, 128), (128, 0, 0), (192, 0, 160),
    (0, 96, 128), (128, 128, 128), (64, 0, 160), (128, 224, 128), (128, 128, 64), (192, 0, 32),
    (128, 96, 0), (128, 0, 192), (0, 128, 32), (64, 224, 0), (0, 0, 64), (128, 128, 160), (64, 96, 0),
    (0, 128, 192), (0, 128, 160), (192, 224, 0), (0, 128, 64), (128, 128, 32), (192, 32, 128),
    (0, 64, 192), (0, 0, 32), (64, 160, 128), (128, 64, 64), (128, 0, 160), (64, 32, 128),
    (128, 192, 192), (0, 0, 160), (192, 160, 128), (128, 192, 0), (128, 0, 96), (192, 32, 0),
    (128, 64, 128), (64, 128, 96), (64, 160, 0), (0, 64, 0), (192, 128, 224), (64, 32, 0), (0, 192, 128),
    (64, 128, 224), (192, 160, 0), (0, 192, 0), (192, 128, 96), (192, 96, 128), (0, 64, 128), (64, 0, 96),
    (64, 224, 128), (128, 64, 0), (192, 0, 224), (64, 96, 128), (128, 192, 128), (64, 0, 224),
    (192, 224, 128), (128, 192, 64), (192, 0, 96), (192, 96, 0), (128, 64, 192), (0, 128, 96),
    (0, 224, 0), (64, 64, 64), (128, 128, 224), (0, 96, 0), (64, 192, 192), (0, 128, 224), (128, 224, 0),
    (64, 192, 64), (128, 128, 96), (128, 32, 128), (64, 0, 192), (0, 64, 96), (0, 160, 128), (192, 0, 64),
    (128, 64, 224), (0, 32, 128), (192, 128, 192), (0, 64, 224), (128, 160, 128), (192, 128, 0),
    (128, 64, 32), (128, 32, 64), (192, 0, 128), (64, 192, 32), (0, 160, 64), (64, 0, 0), (192, 192, 160),
    (0, 32, 64), (64, 128, 128), (64, 192, 160), (128, 160, 64), (64, 128, 0), (192, 192, 32),
    (128, 96, 192), (64, 0, 128), (64, 64, 32), (0, 224, 192), (192, 0, 0), (192, 64, 160), (0, 96, 192),
    (192, 128, 128), (64, 64, 160), (128, 224, 192), (192, 128, 64), (192, 64, 32), (128, 96, 64),
    (192, 0, 192), (0, 192, 32), (64, 224, 64), (64, 0, 64), (128, 192, 160), (64, 96, 64),
    (64, 128, 192), (0, 192, 160), (192, 224, 64), (64, 128, 64), (128, 192, 32), (192, 32, 192),
    (64, 64, 192), (0, 64, 32), (64, 160, 192), (192, 64, 64), (128, 64, 160), (64, 32, 192),
    (192, 192, 192), (0, 64, 160), (192, 160, 192), (192, 192, 0), (128, 64, 96), (192, 32, 64),
    (192, 64, 128), (64, 192, 96), (64, 160, 64), (64, 64, 0),
)

# The demo label space: procedurally generated outdoor scenes (models/demo_scenes.py), what the shipped demo
# weights were trained on.
_DEMO_CLASSES: tuple[str, ...] = (
    "sky", "grass", "water", "road", "building", "tree", "car", "person", "sand", "mountain",
)

_DEMO_PALETTE: tuple[RGB, ...] = (
    (70, 130, 180), (120, 200, 60), (20, 50, 210), (128, 64, 128), (190, 90, 60),
    (20, 100, 30), (255, 200, 0), (220, 20, 60), (235, 210, 150), (110, 90, 80),
)
# fmt: on

# --- registry ------------------------------------------------------------------------------------------

DATASETS: dict[str, DatasetInfo] = {
    "ade20k": DatasetInfo(
        name="ade20k",
        class_names=_ADE20K_CLASSES,
        palette=_ADE20K_PALETTE,
        test_mode="whole",
        resize_scale=(2048, 512),
        align_to=32,
    ),
    "cityscapes": DatasetInfo(
        name="cityscapes",
        class_names=_CITYSCAPES_CLASSES,
        palette=_CITYSCAPES_PALETTE,
        test_mode="slide",
        resize_scale=(2048, 1024),
        align_to=None,
        slide_crop=(1024, 1024),
        slide_stride=(768, 768),
    ),
    "coco-stuff": DatasetInfo(
        name="coco-stuff",
        class_names=_COCO_STUFF_CLASSES,
        palette=_COCO_STUFF_PALETTE,
        test_mode="whole",
        resize_scale=(2048, 512),
        align_to=32,
    ),
    # Scenes are generated at 256x256, so the keep-ratio scale keeps them at their size (short side 256).
    "demo": DatasetInfo(
        name="demo",
        class_names=_DEMO_CLASSES,
        palette=_DEMO_PALETTE,
        test_mode="whole",
        resize_scale=(1024, 256),
        align_to=32,
    ),
}

_ALIASES = {
    "ade": "ade20k",
    "ade20k": "ade20k",
    "city": "cityscapes",
    "cityscapes": "cityscapes",
    "coco-stuff": "coco-stuff",
    "cocostuff": "coco-stuff",
    "coco-stuff164k": "coco-stuff",
    "cocostuff164k": "coco-stuff",
    "demo": "demo",
}

_GOLDEN = 0.618033988749895


def generic_palette(n: int) -> tuple[RGB, ...]:
    """``n`` pairwise-distinct colours, deterministic in ``n`` (prefix-stable: ``p(n)[:k] == p(k)``).

    A golden-ratio walk round the hue circle, cycling through a few saturation/value levels; a colour
    that rounds onto one already used is skipped. A fixed-seed generator takes over in the (purely
    theoretical) case that the walk stops producing new colours.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    levels = ((0.65, 0.95), (0.90, 0.75), (0.45, 0.85), (0.80, 0.55))
    out: list[RGB] = []
    seen: set[RGB] = set()
    rng = random.Random(0x5E65E7)
    k = 0
    while len(out) < n:
        if k < 64 * n + 64:
            s, v = levels[k % len(levels)]
            r, g, b = colorsys.hsv_to_rgb((k * _GOLDEN) % 1.0, s, v)
            rgb = (round(r * 255), round(g * 255), round(b * 255))
        else:
            rgb = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        k += 1
        if rgb not in seen:
            seen.add(rgb)
            out.append(rgb)
    return tuple(out)


@functools.lru_cache(maxsize=32)
def _custom(num_classes: int) -> DatasetInfo:
    return DatasetInfo(
        name="custom",
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        palette=generic_palette(num_classes),
        test_mode="whole",
        resize_scale=(2048, 512),
        align_to=32,
    )


def dataset_named_by_classes(class_names: list[str]) -> str | None:
    """The known dataset whose class names are exactly these (a checkpoint's meta), if any."""
    for info in DATASETS.values():
        if list(info.class_names) == list(class_names):
            return info.name
    return None


def dataset_for(name: str | None = None, num_classes: int | None = None) -> DatasetInfo:
    """Resolve the dataset metadata for a model.

    * ``name`` given: that dataset (case-insensitive; ``_`` and ``-`` are interchangeable, a few
      aliases such as ``"cocostuff"`` are accepted). ``KeyError`` if unknown; ``ValueError`` if
      ``num_classes`` is also given and disagrees with it.
    * else ``num_classes`` given: the known dataset with that many classes (150 -> ade20k,
      19 -> cityscapes, 171 -> coco-stuff), otherwise a generic ``"custom"`` dataset with names
      ``class_0 .. class_{n-1}`` and a deterministic distinct palette.
    * neither: ade20k.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes is not None and num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if name is not None:
        key = _ALIASES.get(name.strip().lower().replace("_", "-"))
        if key is None:
            raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
        info = DATASETS[key]
        if num_classes is not None and num_classes != info.num_classes:
            raise ValueError(f"dataset {info.name!r} has {info.num_classes} classes, model has {num_classes}")
        return info
    if num_classes is None:
        return DATASETS["ade20k"]
    for info in DATASETS.values():
        # Only the benchmarks are guessed from a class count: a 10-class checkpoint is not the demo's unless named.
        if info.num_classes == num_classes and info.name != "demo":
            return info
    return _custom(num_classes)
