"""The demo label space, the generated scenes and the shipped demo weights: loaded strictly, served in fp32,
their quality table consistent with them, and their quality pinned on a small generated held-out set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import file_sha256, load_checkpoint_file
from models.datasets import dataset_for
from models.demo_scenes import (
    CLASS_NAMES,
    DEMO_HELDOUT_SEED,
    demo_quality_table_path,
    demo_weights_path,
    generate_scene,
    write_labelled_set,
)
from models.evaluate import evaluate, find_eval_set, operating_points
from models.metrics import load_quality_table
from models.predict import network_input_size, pipeline_for
from models.registry import create_model, get_spec, list_models

SHIPPED = [name for name in list_models() if demo_weights_path(name) is not None]

# Measured with the committed weights on REGRESSION_SCENES held-out scenes (seeds from REGRESSION_SEED, 256x256,
# JPEG quality 95). A retrained or broken model moves these by far more than the tolerance; float rounding
# on another CPU or thread count flips a few boundary pixels, well inside it.
REGRESSION_SCENES = 12
REGRESSION_SEED = DEMO_HELDOUT_SEED + 5_000
TOLERANCE = 1.5  # mIoU points
PINNED: dict[str, dict[str, float]] = {
    # point -> (mIoU against labels, agreement mIoU with the training level at scale 1)
    "edaformer-t/1111-111@1": {"miou": 86.99, "agreement_miou": 100.0},
    "edaformer-t/2211-222@1": {"miou": 87.01, "agreement_miou": 98.75},
    "edaformer-t/2222-222@0.5": {"miou": 64.35, "agreement_miou": 67.77},
    "seaformer-t/base@1": {"miou": 80.69, "agreement_miou": 100.0},
    "seaformer-t/base@0.5": {"miou": 57.56, "agreement_miou": 62.78},
}


def test_scenes_are_deterministic_per_seed() -> None:
    image, labels = generate_scene(5, 96, 128)
    again, labels_again = generate_scene(5, 96, 128)
    assert image.shape == (96, 128, 3) and labels.shape == (96, 128)
    assert image.dtype == np.uint8 and labels.dtype == np.uint8
    assert np.array_equal(image, again) and np.array_equal(labels, labels_again)
    other, other_labels = generate_scene(6, 96, 128)
    assert not np.array_equal(image, other) and not np.array_equal(labels, other_labels)
    assert labels.max() < len(CLASS_NAMES)


def test_scenes_show_every_class_and_colour_alone_does_not_tell_classes_apart() -> None:
    seen = np.zeros(len(CLASS_NAMES), int)
    mean_colours: dict[int, list[np.ndarray]] = {c: [] for c in range(len(CLASS_NAMES))}
    for seed in range(40):
        image, labels = generate_scene(seed, 128, 128)
        for label in np.unique(labels):
            seen[label] += 1
            mean_colours[int(label)].append(image[labels == label].mean(axis=0))
    assert (seen >= 3).all(), dict(zip(CLASS_NAMES, seen.tolist(), strict=True))
    # Blue sky vs blue water, green grass vs green trees: each pair's mean colours overlap from scene to scene.
    for first, second in (("sky", "water"), ("grass", "tree"), ("road", "mountain")):
        a = np.array(mean_colours[CLASS_NAMES.index(first)])
        b = np.array(mean_colours[CLASS_NAMES.index(second)])
        nearest = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1).min()
        assert nearest < 25, f"{first} and {second} never look alike ({nearest:.0f} apart)"


def test_demo_dataset_runs_256_scenes_at_256() -> None:
    info = dataset_for("demo")
    assert info.name == "demo" and info.class_names == CLASS_NAMES and len(set(info.palette)) == len(CLASS_NAMES)
    assert network_input_size(256, 256, info) == (256, 256)
    assert network_input_size(240, 320, info) == (256, 352)  # keep ratio to a 256 short side, aligned to 32
    assert network_input_size(256, 256, info, scale=0.5) == (128, 128)


def test_labelled_set_is_in_the_ade20k_layout(tmp_path: Path) -> None:
    write_labelled_set(tmp_path, 2, seed=77, sizes=((40, 60),))
    found = find_eval_set(tmp_path)
    assert found.layout == "ade20k" and len(found.samples) == 2
    stored = np.asarray(Image.open(found.samples[1].label))
    assert np.array_equal(stored, generate_scene(78, 40, 60)[1] + 1)  # class id + 1; 0 would be ignored


def test_edaformer_t_demo_weights_ship() -> None:
    path = demo_weights_path("edaformer-t")
    assert path is not None, "models/weights/demo/edaformer-t.safetensors is missing: run scripts/train_demo.py"
    assert path.stat().st_size < 12e6  # fp16


@pytest.mark.parametrize("name", SHIPPED)
def test_demo_weights_load_strictly_and_serve_in_fp32(name: str) -> None:
    path = demo_weights_path(name)
    raw = load_checkpoint_file(path)
    assert {t.dtype for t in raw.state_dict.values() if t.is_floating_point()} == {torch.float16}
    assert raw.class_names == list(CLASS_NAMES)
    model = create_model(name, checkpoint=path)  # strict: a missing or extra key fails here
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.num_classes == len(CLASS_NAMES) and model.meta.dataset == "demo"
    assert model.meta.class_names == list(CLASS_NAMES)
    assert model.meta.checkpoint_sha256 == file_sha256(path)


@pytest.mark.parametrize("name", SHIPPED)
def test_quality_table_belongs_to_the_weights_and_covers_the_ladder(name: str) -> None:
    table_path = demo_quality_table_path(name)
    assert table_path is not None, f"{name} ships demo weights without a quality table: run scripts/demo_assets.py"
    table = load_quality_table(table_path)
    assert table.weights_sha256 == file_sha256(demo_weights_path(name))
    assert (table.model, table.dataset, table.source, table.metric) == (name, "demo", "labelled:ade20k", "miou")
    expected = [p.name for p in operating_points(get_spec(name))]
    assert [p.point for p in table.points] == expected
    best = table.points[0]
    assert best.agreement_miou == 100.0 and best.miou is not None and best.miou > 50


@pytest.fixture(scope="module")
def regression_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_labelled_set(tmp_path_factory.mktemp("regression"), REGRESSION_SCENES, REGRESSION_SEED)


@pytest.mark.parametrize("name", SHIPPED)
def test_demo_weights_quality_is_pinned(name: str, regression_set: Path) -> None:
    pinned = {point: values for point, values in PINNED.items() if point.startswith(f"{name}/")}
    assert pinned, f"no pinned figures for {name}"
    model = create_model(name, checkpoint=demo_weights_path(name)).eval()
    spec = get_spec(name)
    points = [p for p in operating_points(spec, None, (1.0, 0.75, 0.5)) if p.name in pinned]
    table = evaluate(model, find_eval_set(regression_set), points, pipeline_for(spec, dataset_for("demo")),
                     progress=False)
    measured = {entry.point: entry for entry in table.points}
    for point, values in pinned.items():
        assert measured[point].miou == pytest.approx(values["miou"], abs=TOLERANCE), point
        assert measured[point].agreement_miou == pytest.approx(values["agreement_miou"], abs=TOLERANCE), point
