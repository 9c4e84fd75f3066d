"""Unit tests for models/datasets.py: dataset metadata and dataset_for()."""

from __future__ import annotations

import pytest

from models.datasets import DATASETS, DatasetInfo, dataset_for, generic_palette

# The three benchmark label spaces, and the demo weights' synthetic one (checked in test_demo_weights.py).
EXPECTED_COUNTS = {"ade20k": 150, "cityscapes": 19, "coco-stuff": 171}


def test_registry_has_the_three_benchmarks_and_the_demo_label_space():
    assert set(DATASETS) == {*EXPECTED_COUNTS, "demo"}
    for key, info in DATASETS.items():
        assert info.name == key


@pytest.mark.parametrize("name,count", sorted(EXPECTED_COUNTS.items()))
def test_class_counts(name, count):
    info = DATASETS[name]
    assert info.num_classes == count
    assert len(info.class_names) == count
    assert len(info.palette) == count


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_names_unique_and_nonempty(name):
    names = DATASETS[name].class_names
    assert len(set(names)) == len(names)
    assert all(isinstance(n, str) and n.strip() for n in names)


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_palette_entries_are_rgb_bytes(name):
    for entry in DATASETS[name].palette:
        assert isinstance(entry, tuple) and len(entry) == 3
        assert all(type(c) is int and 0 <= c <= 255 for c in entry)


def test_spot_checks():
    ade = DATASETS["ade20k"]
    city = DATASETS["cityscapes"]
    coco = DATASETS["coco-stuff"]
    assert ade.class_names[0] == "wall"
    assert ade.class_names[-1] == "flag"
    assert ade.palette[0] == (120, 120, 120)
    assert city.class_names[0] == "road"
    assert city.class_names[18] == "bicycle"
    assert city.palette[0] == (128, 64, 128)
    assert city.palette[18] == (119, 11, 32)
    assert coco.class_names[0] == "person"
    assert coco.class_names[79] == "toothbrush"  # last of the 80 "things"
    assert coco.class_names[80] == "banner"  # first of the 91 "stuff"
    assert coco.class_names[-1] == "wood"


def test_test_time_settings():
    ade, city, coco = DATASETS["ade20k"], DATASETS["cityscapes"], DATASETS["coco-stuff"]
    for info in (ade, coco):
        assert info.test_mode == "whole"
        assert info.resize_scale == (2048, 512)
        assert info.align_to == 32
        assert info.slide_crop is None and info.slide_stride is None
    assert city.test_mode == "slide"
    assert city.resize_scale == (2048, 1024)
    assert city.align_to is None
    assert city.slide_crop == (1024, 1024)
    assert city.slide_stride == (768, 768)


def test_dataset_info_is_frozen():
    with pytest.raises(AttributeError):
        DATASETS["ade20k"].name = "x"  # type: ignore[misc]


def test_dataset_info_rejects_mismatched_palette():
    with pytest.raises(ValueError):
        DatasetInfo(name="bad", class_names=("a", "b"), palette=((0, 0, 0),))


@pytest.mark.parametrize("count,name", [(150, "ade20k"), (19, "cityscapes"), (171, "coco-stuff")])
def test_dataset_for_by_count(count, name):
    assert dataset_for(None, count) is DATASETS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_dataset_for_by_name(name):
    assert dataset_for(name, None) is DATASETS[name]
    assert dataset_for(name, EXPECTED_COUNTS[name]) is DATASETS[name]


def test_dataset_for_name_normalisation_and_aliases():
    assert dataset_for("ADE20K", None) is DATASETS["ade20k"]
    assert dataset_for("coco_stuff", None) is DATASETS["coco-stuff"]
    assert dataset_for("cocostuff164k", None) is DATASETS["coco-stuff"]


def test_dataset_for_name_wins_over_count_lookup():
    # name given: count is not used to pick a dataset, only checked against it
    with pytest.raises(ValueError):
        dataset_for("cityscapes", 150)


def test_dataset_for_unknown_name_lists_known():
    with pytest.raises(KeyError) as exc:
        dataset_for("pascal-voc", None)
    msg = str(exc.value)
    for known in EXPECTED_COUNTS:
        assert known in msg


def test_dataset_for_default_is_ade20k():
    assert dataset_for(None, None) is DATASETS["ade20k"]
    assert dataset_for() is DATASETS["ade20k"]


@pytest.mark.parametrize("n", [1, 2, 7, 21, 300])
def test_custom_fallback(n):
    info = dataset_for(None, n)
    assert info.name == "custom"
    assert info.num_classes == n
    assert info.class_names == tuple(f"class_{i}" for i in range(n))
    assert len(set(info.palette)) == n  # distinct colours
    for entry in info.palette:
        assert len(entry) == 3 and all(type(c) is int and 0 <= c <= 255 for c in entry)
    assert info.test_mode == "whole"
    assert info.resize_scale == (2048, 512)
    assert info.align_to == 32
    assert info.slide_crop is None and info.slide_stride is None


def test_custom_palette_is_deterministic_and_prefix_stable():
    assert dataset_for(None, 21).palette == dataset_for(None, 21).palette
    assert generic_palette(40) == generic_palette(40)
    assert generic_palette(40)[:10] == generic_palette(10)
    assert generic_palette(0) == ()


@pytest.mark.parametrize("bad", [0, -3])
def test_dataset_for_rejects_nonpositive_count(bad):
    with pytest.raises(ValueError):
        dataset_for(None, bad)
