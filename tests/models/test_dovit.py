"""DoViT: registry and spec, the exit-threshold knob, state dicts against the listings, checkpoints, GMACs and
the test pipelines.

Listings: tests/data/listings/dovit-{s,b}_state_dict.txt (209 entries each, 150 classes, copied from
/work/shared/specs/listings). GMAC figures: /work/shared/specs/dovit.md section 2 (dense ViT + 3 FCN aux heads,
counted on the official module tree [run]); they are hard-coded here, not produced by our code.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from functools import cache

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from models import CheckpointError, create_model, get_spec, list_models
from models.checkpoint import official_checkpoint
from models.datasets import DATASETS, dataset_for
from models.flops import count_gmacs, gmacs_for
from models.predict import Predictor, pipeline_for
from tests.models.listings import Entry, meta_model, parse_listing, state_dict_entries
from tests.models.reference_dovit import randomize_, structured_images
from tests.paths import DATA

LISTING_DIR = DATA / "listings"
LISTING_SHA256 = {
    "dovit-s": "532f62f8bf3ab383f4da6281be780143b1d9282e87fc9ad790e5105941ce5a85",
    "dovit-b": "6b7a61e3f6a7b8fb0b9ab3ad66fa073939038c498403dff8bbbe6369e23e3f1b",
}
CONV_SEG = ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias")
WIDTH = {"dovit-s": 384, "dovit-b": 768}
# Spec section 2 [run]: dense backbone + 3 FCN aux heads, GMACs per crop (150 classes).
SPEC_DENSE_GMACS = {"dovit-s": {512: 32.2, 768: 99.5}, "dovit-b": {512: 107.7, 768: 296.7}}
# Spec section 2: "the Segmenter decoder adds roughly 6 GMACs (S) or 21 GMACs (B) at 512^2 (formula estimate)".
SPEC_HEAD_GMACS_512 = {"dovit-s": 6.0, "dovit-b": 21.0}
NUM_CLASSES = 19
CUSTOM_NAMES = [f"thing-{i}" for i in range(NUM_CLASSES)]
CUSTOM_PALETTE = [[(7 * i) % 256, (31 * i) % 256, (101 * i) % 256] for i in range(NUM_CLASSES)]


@cache
def _listing(name: str) -> tuple[Entry, ...]:
    text = (LISTING_DIR / f"{name}_state_dict.txt").read_text()
    assert hashlib.sha256(text.encode()).hexdigest() == LISTING_SHA256[name], "the listing changed"
    entries = parse_listing(text)
    return tuple(entries)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(create_model("dovit-s", num_classes=NUM_CLASSES), seed=3, aux_scale=30.0).eval()


# --- registry, spec, knob --------------------------------------------------------------------------------


def test_registry_and_spec():
    names = list_models(family="dovit")
    assert names == ["dovit-b", "dovit-s"]
    for name in names:
        spec = get_spec(name)
        assert (spec.family, spec.output_stride, spec.stats) == ("dovit", 16, ("kept_fraction",))
        assert spec.knob.name == "exit_threshold" and spec.knob.runtime_input
        assert not spec.torchscript_export_ok  # the legacy exporter bakes kept counts in
        assert spec.published_miou == {}  # no verified figure in the spec
        assert spec.checkpoint.classifier_key == "decode_head.mask_norm.weight"
        assert spec.checkpoint.unused_prefixes == ("decode_head.conv_seg.",)
        assert spec.checkpoint.unused_in_channels == WIDTH[name]
        assert any(h % 16 for _, h, w in spec.parity_sizes) and any(b == 2 for b, _, _ in spec.parity_sizes)


def test_knob_ladder_and_dense_level():
    spec = get_spec("dovit-s")
    ladder = spec.ladder()
    assert [level.name for level in ladder] == ["t0.96", "t0.93", "t0.9"]
    assert [level.rank for level in ladder] == [0, 1, 2]
    assert spec.training_level().kwargs == {"exit_threshold": 0.96}
    assert spec.level("0.93") == ladder[1] and spec.level("t0.9") == ladder[2]
    dense = spec.level("dense", [*ladder, spec.knob.level(math.inf)])
    assert dense.name == "dense" and dense.value == math.inf
    assert spec.knob.parse("1.5") == 1.5 and spec.knob.level_name(1.5) == "dense"  # > 1: nothing stops
    assert spec.fits(ladder[0], 1, 1)  # any size runs (the patch embedding pads)


@pytest.mark.parametrize(("batch", "height", "width"), [(2, 33, 47), (1, 8, 8)])
def test_logits_and_stats_shapes(model, batch, height, width):
    images = structured_images(batch, height, width)
    with torch.inference_mode():
        logits, stats = model.forward_with_stats(images, exit_threshold=0.9)
    assert logits.shape == (batch, NUM_CLASSES, math.ceil(height / 16), math.ceil(width / 16))
    assert torch.isfinite(logits).all()
    assert stats["kept_fraction"].shape == (batch, 3) and stats["kept_fraction"].dtype == torch.float32


# --- state dict against the listings ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models(family="dovit"))
def test_state_dict_equals_listing_in_order(name):
    listing = list(_listing(name))
    assert len(listing) == 209
    assert [e for e in listing if e[0] in CONV_SEG] == [(CONV_SEG[0], (150, WIDTH[name], 1, 1)), (CONV_SEG[1], (150,))]
    assert state_dict_entries(meta_model(name)) == [e for e in listing if e[0] not in CONV_SEG]  # names, shapes, order


@pytest.mark.parametrize("name", list_models(family="dovit"))
def test_official_checkpoint_layout_has_every_listing_entry(name):
    info = dataset_for(None, 150)
    checkpoint = official_checkpoint(meta_model(name), list(info.class_names), [list(c) for c in info.palette])
    assert {key: tuple(t.shape) for key, t in checkpoint["state_dict"].items()} == dict(_listing(name))


@pytest.mark.parametrize("name", list_models(family="dovit"))
def test_only_class_tensors_depend_on_the_class_count(name):
    def class_dependent(key: str) -> bool:
        return key in ("decode_head.cls_emb", "decode_head.mask_norm.weight", "decode_head.mask_norm.bias") or (
            ".auxiliary_head." in key and ".conv_seg." in key)

    expected = []
    for key, shape in _listing(name):
        if key in CONV_SEG:
            continue
        if class_dependent(key):
            shape = tuple(NUM_CLASSES if d == 150 else d for d in shape)
        expected.append((key, shape))
    assert state_dict_entries(meta_model(name, NUM_CLASSES)) == expected


def test_backbone_parameter_count_matches_spec():
    """Spec table 1.1 [run]: DoViT-S backbone 21.99 M + 3 aux heads 0.41 M (rounded; the listing's shapes give
    21,983,616 + 412,098)."""
    backbone = meta_model("dovit-s").backbone
    aux = sum(p.numel() for p in backbone.auxiliary_head.parameters())
    assert sum(p.numel() for p in backbone.parameters()) - aux == pytest.approx(21.99e6, abs=0.01e6)
    assert aux == pytest.approx(0.41e6, abs=0.005e6)


# --- checkpoints -----------------------------------------------------------------------------------------


def _same_outputs(loaded: torch.nn.Module, model: torch.nn.Module) -> None:
    images = structured_images(1, 48, 80, seed=9)
    with torch.inference_mode():
        assert torch.equal(loaded.eval()(images, exit_threshold=0.9), model(images, exit_threshold=0.9))


def test_official_pth_and_safetensors_load_strictly(tmp_path, model):
    checkpoint = official_checkpoint(model, CUSTOM_NAMES, CUSTOM_PALETTE)
    assert CONV_SEG[0] in checkpoint["state_dict"]  # the unused head of the official files
    path = tmp_path / "dovit_s.pth"
    torch.save(checkpoint, path)
    loaded = create_model("dovit-s", checkpoint=path)  # the class count is read from mask_norm
    assert loaded.num_classes == NUM_CLASSES and loaded.meta.class_names == CUSTOM_NAMES
    _same_outputs(loaded, model)

    tensors = {key: value.contiguous() for key, value in checkpoint["state_dict"].items()}
    save_file(tensors, str(tmp_path / "dovit_s.safetensors"))
    _same_outputs(create_model("dovit-s", checkpoint=tmp_path / "dovit_s.safetensors"), model)


def test_bad_checkpoint_lists_missing_unexpected_and_mis_shaped_keys(tmp_path, model):
    state = {key: value.clone() for key, value in model.state_dict().items()}
    del state["backbone.layers.7.ffn.layers.1.bias"]
    state["backbone.auxiliary_head.3.conv_seg.weight"] = torch.zeros(NUM_CLASSES, 256, 1, 1)
    state["backbone.pos_embed"] = torch.zeros(1, 2305, 384)  # a 768-crop (Cityscapes) table
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as error:
        create_model("dovit-s", checkpoint=path)
    message = str(error.value)
    assert "missing keys (1): backbone.layers.7.ffn.layers.1.bias" in message
    assert "unexpected keys (1): backbone.auxiliary_head.3.conv_seg.weight" in message
    assert "mis-shaped keys (1): backbone.pos_embed (1, 2305, 384) != model (1, 1025, 384)" in message
    # The 768-crop table loads into a model built for that training size.
    del state["backbone.auxiliary_head.3.conv_seg.weight"]
    state["backbone.layers.7.ffn.layers.1.bias"] = torch.zeros(384)
    torch.save({"state_dict": state}, path)
    assert create_model("dovit-s", checkpoint=path, img_size=768).backbone.pos_embed.shape == (1, 2305, 384)


# --- GMACs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models(family="dovit"))
@pytest.mark.parametrize("size", [512, 768])
def test_dense_gmacs_match_spec_table(name, size):
    parts = meta_model(name).gmacs_breakdown(size, size)
    backbone_and_aux = parts["patch_embed"] + parts["blocks"] + parts["aux_heads"]
    assert backbone_and_aux == pytest.approx(SPEC_DENSE_GMACS[name][size], rel=0.002)
    if size == 512:
        assert parts["decode_head"] == pytest.approx(SPEC_HEAD_GMACS_512[name], rel=0.12)  # the spec's estimate
    total = count_gmacs(meta_model(name), size, size)  # models.flops delegates to the model's own count
    assert total == pytest.approx(sum(parts.values()), rel=1e-12)
    assert count_gmacs(meta_model(name), size, size, batch=2, exit_threshold=2.0) == pytest.approx(2 * total)


def test_token_pass_gmacs_equal_a_real_forwards_flop_count(model):
    """The formula (blocks after tap k on 1 + f_k N tokens, attention 2 n^2 C) against torch's FLOP counter
    on a real forward where tokens stop (batch 1: no padding), explicit attention so both matmuls count."""
    explicit = copy.deepcopy(model)
    for module in explicit.modules():
        if isinstance(getattr(module, "fused", None), bool):
            module.fused = False
    images = structured_images(1, 100, 130)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        _, stats = explicit.forward_with_stats(images, exit_threshold=0.9)
    kept = stats["kept_fraction"][0]
    assert (kept < 1).all()
    measured = counter.get_total_flops() / 2 / 1e9
    assert model.count_gmacs(100, 130, kept_fraction=kept) == pytest.approx(measured, rel=1e-9)
    assert model.count_gmacs(100, 130, kept_fraction=kept) < model.count_gmacs(100, 130)
    two = model.count_gmacs(100, 130, batch=2, kept_fraction=torch.stack([kept, torch.ones(3)]))
    assert two == pytest.approx(model.count_gmacs(100, 130, kept_fraction=kept) + model.count_gmacs(100, 130))


def test_planner_gets_the_dense_upper_bound_per_level():
    spec = get_spec("dovit-s")
    dense = gmacs_for("dovit-s", 150, 512, 512, spec.training_level())
    assert dense == pytest.approx(38.82, abs=0.01)
    assert all(gmacs_for("dovit-s", 150, 512, 512, level) == dense for level in spec.ladder())


# --- test pipelines and prediction -----------------------------------------------------------------------


def test_pipelines_follow_the_segmenter_configs():
    spec = get_spec("dovit-s")
    ade = pipeline_for(spec, DATASETS["ade20k"])
    assert (ade.test_mode, ade.resize_scale, ade.align_to) == ("slide", (2048, 512), None)
    assert (ade.slide_crop, ade.slide_stride) == ((512, 512), (480, 480))
    city = pipeline_for(spec, DATASETS["cityscapes"])
    assert (city.test_mode, city.resize_scale, city.slide_crop, city.slide_stride) == (
        "slide", (2048, 1024), (768, 768), (512, 512))
    for name in DATASETS:
        info = pipeline_for(spec, DATASETS[name])
        assert info.mean == info.std == (127.5, 127.5, 127.5)
    assert pipeline_for(spec, dataset_for(None, 7)).mean == (127.5, 127.5, 127.5)  # custom class counts too


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_predictor_returns_a_mask_of_the_image_size(model, mode):
    # DoViT's Cityscapes pipeline (127.5 normalization, no alignment) scaled down to stay fast: smaller crops.
    pipeline = dataclasses.replace(pipeline_for(model.spec, DATASETS["cityscapes"]), resize_scale=(150, 90),
                                   test_mode=mode, slide_crop=(64, 64), slide_stride=(48, 48))
    image = np.random.default_rng(0).integers(0, 256, size=(61, 97, 3), dtype=np.uint8)
    prediction = Predictor(model, pipeline).predict(image, model.spec.level("t0.9"))
    assert prediction.labels.shape == (61, 97)
    assert prediction.input_size == (90, 143)
    kept = prediction.stats["kept_fraction"]
    assert len(kept) == 3 and all(0 <= value <= 1 for value in kept)
