"""LRFormer T/S/B/L: registry and spec, the pooled-size knob, the input-size rule, state dicts against the official
listings, checkpoints, test pipelines and GMACs.

Spec: /work/shared/specs/lrformer.md (§6 supersedes). Listings: tests/data/listings/lrformer-{t,s,b,l}_state_dict.txt
(417/589/805/911 entries, 150 classes, official segmentation-checkpoint layout; conv_seg is the classifier). Big
variants are built on the meta device only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models import CheckpointError, create_model, get_spec, list_models
from models.checkpoint import official_checkpoint
from models.datasets import DATASETS
from models.flops import count_gmacs
from models.lrformer import check_input_size
from models.predict import Predictor, pipeline_for
from tests.models.listings import meta_model, read_listing
from tests.models.reference_lrformer import randomize_

VARIANTS = list_models(family="lrformer")
LISTING_LENGTHS = {"lrformer-t": 417, "lrformer-s": 589, "lrformer-b": 805, "lrformer-l": 911}
# spec §1.4: parameters with the head, 150 classes (T 13.26 M, S 32.22 M, B 67.5 M, L 111.0 M).
PARAMS_M = {"lrformer-t": 13.26, "lrformer-s": 32.22, "lrformer-b": 67.5, "lrformer-l": 111.0}
# spec §2 (the README's tables): single-scale mIoU.
PUBLISHED = {
    "lrformer-t": {"ade20k": 46.7, "coco-stuff": 43.9, "cityscapes": 80.7},
    "lrformer-s": {"ade20k": 50.0, "coco-stuff": 46.4, "cityscapes": 81.9},
    "lrformer-b": {"ade20k": 51.0, "coco-stuff": 47.2, "cityscapes": 83.0},
    "lrformer-l": {"ade20k": 52.6, "coco-stuff": 47.9, "cityscapes": 83.2},
}
# spec §3.3 [run]: LRFormer-T backbone GMACs per pooled size.
BACKBONE_T = {(512, 512): {8: 8.15, 12: 8.48, 16: 9.07, 24: 11.58, 32: 16.72},
              (1024, 2048): {8: 63.8, 12: 64.6, 16: 66.3, 24: 74.3, 32: 92.1}}
# spec §2 (README, rounded to whole G): totals at s = 16. ADE20K at 512 (L: 640), COCO-Stuff L at 512, Cityscapes.
README_TOTALS = {
    ("lrformer-t", 512, 512): 17, ("lrformer-s", 512, 512): 40, ("lrformer-b", 512, 512): 75,
    ("lrformer-l", 512, 512): 122, ("lrformer-l", 640, 640): 183,
}
README_CITYSCAPES = {"lrformer-t": 122, "lrformer-s": 295, "lrformer-b": 555, "lrformer-l": 908}


@pytest.fixture(scope="module")
def model_t() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(create_model("lrformer-t", num_classes=19), seed=3).eval()


# --- registry, spec, knob ----------------------------------------------------------------------------------


def test_the_four_variants_are_registered():
    assert VARIANTS == ["lrformer-b", "lrformer-l", "lrformer-s", "lrformer-t"]


@pytest.mark.parametrize("name", VARIANTS)
def test_spec(name):
    spec = get_spec(name)
    assert spec.family == "lrformer"
    assert spec.output_stride == 8
    assert spec.checkpoint.classifier_key == "decode_head.conv_seg.weight"
    assert spec.checkpoint.unused_prefixes == ()  # spec §6: no key of the official files is unused
    assert dict(spec.published_miou) == PUBLISHED[name]
    assert [level.name for level in spec.ladder()] == ["s16", "s12", "s8"]
    assert spec.knob.runtime_input  # one ONNX graph serves every pooled size
    assert [level.kwargs for level in spec.ladder()] == [{"pooled_size": 16}, {"pooled_size": 12}, {"pooled_size": 8}]
    assert spec.level("s8") == spec.level("8") == spec.ladder()[2]
    for _, height, width in spec.parity_sizes:
        check_input_size(height, width)  # every parity size is one the model takes
    assert any(h % 32 or w % 32 for _, h, w in spec.parity_sizes)
    assert any(b == 2 for b, _, _ in spec.parity_sizes) and any(h != w for _, h, w in spec.parity_sizes)


@pytest.mark.parametrize("text", ["s1", "0", "s65", "x"])
def test_invalid_pooled_sizes_are_refused(text):
    with pytest.raises(KeyError):
        get_spec("lrformer-t").level(text)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("dataset", ["ade20k", "coco-stuff", "cityscapes"])
def test_pipelines_align_to_32_and_run_whole(name, dataset):
    pipeline = pipeline_for(get_spec(name), DATASETS[dataset])
    assert pipeline.align_to == 32
    assert pipeline.test_mode == "whole"
    expected = {"ade20k": (2560, 640) if name == "lrformer-l" else (2048, 512), "coco-stuff": (2048, 512),
                "cityscapes": (2048, 1024)}
    assert pipeline.resize_scale == expected[dataset]


@pytest.mark.parametrize(("height", "width"), [(64, 64), (61, 94), (350, 478), (509, 509), (510, 702), (29, 31)])
def test_sizes_the_official_backbone_takes(height, width):
    check_input_size(height, width)


@pytest.mark.parametrize(("height", "width"), [(64, 65), (520, 520), (500, 700), (508, 508), (60, 64), (28, 32)])
def test_other_sizes_raise_a_value_error_naming_the_rule(model_t, height, width):
    with pytest.raises(ValueError, match=r"ceil\(H/4\) and ceil\(W/4\) must be multiples of 8"):
        model_t(torch.zeros(1, 3, height, width))


def test_bad_pooled_size_raises(model_t):
    for value in (1, 0, 16.0, True):
        with pytest.raises(ValueError, match="pooled_size"):
            model_t(torch.zeros(1, 3, 64, 64), pooled_size=value)


# --- state dicts against the official listings ----------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_equals_the_official_listing_in_order(name):
    listing = read_listing(name)
    assert len(listing) == LISTING_LENGTHS[name]
    model = meta_model(name)
    assert [(key, tuple(t.shape)) for key, t in model.state_dict().items()] == listing
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(PARAMS_M[name], rel=5e-4)


@pytest.mark.parametrize("name", VARIANTS)
def test_only_conv_seg_depends_on_the_class_count(name):
    expected = [(k, (19, *s[1:]) if k.startswith("decode_head.conv_seg.") else s) for k, s in read_listing(name)]
    model = meta_model(name, 19)
    assert [(key, tuple(t.shape)) for key, t in model.state_dict().items()] == expected


# --- checkpoints ---------------------------------------------------------------------------------------------


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(a.eval()(images, pooled_size=8), b(images, pooled_size=8))


def test_official_layout_loads_strictly(tmp_path, model_t):
    names = [f"c{i}" for i in range(19)]
    checkpoint = official_checkpoint(model_t, names, [[i, i, i] for i in range(19)])
    assert len(checkpoint["state_dict"]) == LISTING_LENGTHS["lrformer-t"]
    checkpoint["state_dict"] = {"module." + k: v for k, v in checkpoint["state_dict"].items()}  # DataParallel
    torch.save(checkpoint, tmp_path / "lrformer_t.pth")
    loaded = create_model("lrformer-t", checkpoint=tmp_path / "lrformer_t.pth")
    assert loaded.num_classes == 19 and loaded.meta.class_names == names
    _same_outputs(loaded, model_t)


def test_safetensors_loads_strictly(tmp_path, model_t):
    tensors = {k: v.detach().clone().contiguous() for k, v in model_t.state_dict().items()}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"classes": json.dumps([str(i) for i in range(19)])})
    loaded = create_model("lrformer-t", checkpoint=tmp_path / "t.safetensors")
    _same_outputs(loaded, model_t)


def test_missing_unexpected_and_mis_shaped_keys_are_listed(tmp_path, model_t):
    state = {k: v.clone() for k, v in model_t.state_dict().items()}
    del state["backbone.d_convs3.2.weight"]
    state["backbone.block3.0.pre_norm.weight"] = torch.ones(240)  # XL-only key
    state["decode_head.fuse_block1.attn.kv.weight"] = torch.zeros(256, 256)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        create_model("lrformer-t", checkpoint=tmp_path / "bad.pth")
    message = str(info.value)
    assert "missing keys (1): backbone.d_convs3.2.weight" in message
    assert "unexpected keys (1): backbone.block3.0.pre_norm.weight" in message
    assert "mis-shaped keys (1): decode_head.fuse_block1.attn.kv.weight (256, 256) != model (512, 256)" in message


# --- prediction through the test pipeline ------------------------------------------------------------------


@pytest.mark.parametrize(("dataset", "scale", "level"), [("ade20k", 0.25, "s16"), ("cityscapes", 0.125, "s8")])
def test_predictor_returns_a_mask_of_the_images_size(model_t, dataset, scale, level):
    """Whole-image inference (the only mode LRFormer tests with) on an odd-sized image, at a reduced scale."""
    image = np.random.default_rng(0).integers(0, 256, size=(45, 53, 3), dtype=np.uint8)
    predictor = Predictor(model_t, pipeline_for(model_t.spec, DATASETS[dataset]))
    prediction = predictor.predict(image, model_t.spec.level(level), scale=scale)
    assert prediction.labels.shape == (45, 53)
    assert prediction.input_size == (128, 160)  # 128x151 resized up to multiples of 32
    assert len(np.unique(prediction.labels)) > 1


# --- GMACs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", list(BACKBONE_T), ids=lambda s: f"{s[0]}x{s[1]}")
def test_backbone_gmacs_match_the_spec_pooled_size_table(size):
    backbone = meta_model("lrformer-t").backbone
    for pooled_size, expected in BACKBONE_T[size].items():
        got = count_gmacs(backbone, *size, pooled_size=pooled_size)
        assert got == pytest.approx(expected, abs=0.051), (size, pooled_size, got)


@pytest.mark.parametrize(("name", "height", "width"), list(README_TOTALS))
def test_total_gmacs_match_the_readme_at_512_and_640(name, height, width):
    """Ours counts convs, linears and the attention matmuls; the README rounds to whole G and its counter also
    charges norms, pooling and upsampling (~0.5%), so ours sits up to 3% below it (T: 16.55 vs 17)."""
    got = count_gmacs(meta_model(name), height, width)
    expected = README_TOTALS[(name, height, width)]
    assert 0.97 * expected <= got <= expected + 0.5, got


@pytest.mark.parametrize("name", VARIANTS)
def test_cityscapes_gmacs_sit_2_to_4_percent_below_the_readme(name):
    """At 1024x2048 ours is 2.4-3.3% below the README; fvcore-style counting of norms, pooling and bilinear
    resizes explains ~0.9 points of it, the rest is not reproducible from the released code (see the report)."""
    got = count_gmacs(meta_model(name, 19), 1024, 2048)
    assert 0.96 <= got / README_CITYSCAPES[name] <= 0.98, got


def test_reference_gmacs_512_is_the_readme_figure():
    for name in VARIANTS:
        assert get_spec(name).reference_gmacs_512 == README_TOTALS[(name, 512, 512)]


def test_cheaper_levels_cost_less():
    model = meta_model("lrformer-t")
    values = [count_gmacs(model, 512, 512, **level.kwargs) for level in model.spec.ladder()]
    assert values[0] > values[1] > values[2]
