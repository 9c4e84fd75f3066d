"""Every variant and ISR level: logit shapes, finiteness, and the state dict against the spec listings.

Spec: /work/shared/specs/edaformer.md, edaformer_t_state_dict.txt (354 entries) and
edaformer_b_state_dict.txt (564 entries), both for 150 classes, in `state_dict()` order.
"""

from __future__ import annotations

import hashlib
import math
from functools import cache

import pytest
import torch

from models import LADDER, IsrConfig, create_model, list_models
from models.checkpoint import official_checkpoint
from models.datasets import dataset_for
from tests.models.listings import Entry, meta_model, parse_listing, state_dict_entries
from tests.paths import DATA

# The official listings, copied from the spec (its edaformer_{t,b}_state_dict.txt) into the tests' data and pinned
# by their sha256, so a copy that drifted from the spec fails.
LISTINGS = {
    "edaformer-t": DATA / "listings" / "edaformer-t_state_dict.txt",
    "edaformer-b": DATA / "listings" / "edaformer-b_state_dict.txt",
}
LISTING_SHA256 = {
    "edaformer-t": "3a31211390b6af044f2b11debf96d7b94decd1ec28b67df358f264f28d41bc2e",
    "edaformer-b": "3df93a68c122a54ad3a14030a761762439e45c5a40ca6c28b3b0ab2e1cf3420d",
}
LISTING_LENGTHS = {"edaformer-t": 354, "edaformer-b": 564}
# Spec §3 "total without conv_seg" (parameters only; BatchNorm running stats are buffers).
PARAMS_WITHOUT_CONV_SEG = {"edaformer-t": 4_929_914, "edaformer-b": 29_438_166}
CONV_SEG = ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias")
VARIANTS = ["edaformer-t", "edaformer-b"]
# (batch, height, width): a square and a non-square size, both small enough for every ladder level
# (2222/222 needs a side >= 61); 70x100 is not a multiple of 8, so ceil(H/8) is exercised.
SIZES = [(2, 64, 64), (1, 70, 100)]


def _render(entries: list[Entry]) -> str:
    """The spec files' format: `name [d0,d1,...]` per line, `[]` for scalars."""
    return "".join(f"{name} [{','.join(map(str, shape))}]\n" for name, shape in entries)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _with_conv_seg(entries: list[Entry], num_classes: int = 150) -> list[Entry]:
    """mmseg's BaseDecodeHead registers conv_seg first, so it leads the decode_head entries."""
    first = next(i for i, (name, _) in enumerate(entries) if name.startswith("decode_head."))
    conv_seg = [(CONV_SEG[0], (num_classes, 128, 1, 1)), (CONV_SEG[1], (num_classes,))]
    return entries[:first] + conv_seg + entries[first:]


@pytest.fixture(scope="module")
def models_150():
    torch.manual_seed(0)
    return {name: create_model(name, num_classes=150).eval() for name in VARIANTS}


def test_registry_lists_both_variants():
    assert {"edaformer-t", "edaformer-b"} <= set(list_models())
    with pytest.raises(KeyError, match="edaformer-t"):
        create_model("edaformer-x")


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("level", LADDER, ids=[level.name for level in LADDER])
@pytest.mark.parametrize(("batch", "height", "width"), SIZES, ids=[f"{b}x{h}x{w}" for b, h, w in SIZES])
def test_logits_shape_and_finite(models_150, name, level, batch, height, width):
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height + width))
    with torch.inference_mode():
        logits = models_150[name](images, isr=level.isr)
    assert logits.shape == (batch, 150, math.ceil(height / 8), math.ceil(width / 8))
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("num_classes", [19, 171])
def test_other_class_counts(name, num_classes):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes).eval()
    assert model.num_classes == num_classes
    images = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        for isr in (IsrConfig(), LADDER[-1].isr):
            logits = model(images, isr=isr)
            assert logits.shape == (1, num_classes, 8, 12)
            assert torch.isfinite(logits).all()


def test_default_isr_is_the_training_setting(models_150):
    model = models_150["edaformer-t"]
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(images), model(images, isr=IsrConfig()))
        assert not torch.allclose(model(images), model(images, isr=LADDER[-1].isr))


@pytest.mark.parametrize("level", LADDER, ids=[level.name for level in LADDER])
def test_runs_at_the_minimum_input_side(models_150, level):
    side = level.isr.min_input_side()
    assert level.isr.fits(side, side)
    images = torch.randn(1, 3, side, side)
    with torch.inference_mode():
        logits = models_150["edaformer-t"](images, isr=level.isr)
    assert logits.shape == (1, 150, math.ceil(side / 8), math.ceil(side / 8))
    assert torch.isfinite(logits).all()


# --- state dict against the spec listings ---------------------------------------------------------------


@cache
def _spec_listing(name: str) -> tuple[Entry, ...]:
    text = LISTINGS[name].read_text()
    assert _sha256(text) == LISTING_SHA256[name], "the listing differs from the spec's (pinned by its sha256)"
    return tuple(parse_listing(text))


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_equals_spec_listing_in_order(name):
    listing = list(_spec_listing(name))
    assert len(listing) == LISTING_LENGTHS[name]
    ours = state_dict_entries(meta_model(name))
    extra = [entry for entry in listing if entry not in ours]
    assert extra == [(CONV_SEG[0], (150, 128, 1, 1)), (CONV_SEG[1], (150,))]
    assert ours == [entry for entry in listing if entry[0] not in CONV_SEG]  # names, shapes and order
    assert _sha256(_render(_with_conv_seg(ours))) == LISTING_SHA256[name]  # the same, byte for byte


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_count_matches_spec(name):
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS_WITHOUT_CONV_SEG[name]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("num_classes", [19, 171])
def test_only_linear_pred_depends_on_class_count(name, num_classes):
    expected = []
    for key, shape in _spec_listing(name):
        if key in CONV_SEG:
            continue
        if key.startswith("decode_head.linear_pred."):
            shape = (num_classes, *shape[1:])
        expected.append((key, shape))
    assert state_dict_entries(meta_model(name, num_classes)) == expected


@pytest.mark.parametrize("name", VARIANTS)
def test_official_checkpoint_layout_has_every_spec_entry(name):
    model = meta_model(name)
    info = dataset_for(None, 150)
    checkpoint = official_checkpoint(model, list(info.class_names), [list(c) for c in info.palette])
    assert set(checkpoint) >= {"state_dict", "meta"}
    got = {key: tuple(t.shape) for key, t in checkpoint["state_dict"].items()}
    assert got == dict(_spec_listing(name))
    assert list(checkpoint["meta"]["CLASSES"]) == list(info.class_names)
