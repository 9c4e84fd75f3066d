"""Prediction as the official test pipelines do it, and the ISR settings / ladder helpers.

Expected sizes are worked out by hand from mmcv's rules (spec §5): keep-ratio `rescale_size` with
factor = min(long_max / long, short_max / short), new = int(x * factor + 0.5); then AlignedResize
(ADE20K, COCO-Stuff) rounds each side up to a multiple of 32.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import LADDER, IsrConfig, create_model, level_by_name
from models.datasets import DATASETS
from models.predict import (
    MEAN_RGB,
    STD_RGB,
    Predictor,
    network_input_size,
    preprocess,
    slide_logits,
    slide_windows,
)
from tests.models.reference_edaformer import randomize_

# --- network input size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "size", "expected"),
    [
        # 500 wide x 375 high: factor = min(2048/500, 512/375) = 1.36533; 375 -> 512, 500 -> int(683.17) = 683 -> 704
        ("ade20k", (375, 500), (512, 704)),
        ("ade20k", (500, 375), (704, 512)),  # portrait
        # smaller than 512: factor = min(2048/300, 512/200) = 2.56 -> upscaled to 512 x 768 (both multiples of 32)
        ("ade20k", (200, 300), (512, 768)),
        # 517 * 512/333 = 794.91 -> int(795.41) = 795 -> 800
        ("ade20k", (333, 517), (512, 800)),
        # the +0.5 rounding shows through the alignment: 516 * 512/375 = 704.51 -> int(705.01) = 705 -> 736
        ("ade20k", (375, 516), (512, 736)),
        # the long side binds: factor = 2048/2600; 256 -> int(201.65 + 0.5) = 202 -> 224
        ("ade20k", (256, 2600), (224, 2048)),
        ("ade20k", (512, 683), (512, 704)),  # factor 1, alignment only
        ("coco-stuff", (480, 640), (512, 704)),  # factor = 512/480; 640 -> int(683.17) = 683 -> 704
        ("cityscapes", (1024, 2048), (1024, 2048)),  # native size, no alignment
        ("cityscapes", (512, 1024), (1024, 2048)),  # factor = min(2048/1024, 1024/512) = 2
        ("cityscapes", (333, 500), (1024, 1538)),  # factor = 1024/333; 500 -> int(1537.54 + 0.5) = 1538
    ],
)
def test_network_input_size(dataset, size, expected):
    assert network_input_size(*size, DATASETS[dataset]) == expected


def test_cityscapes_slide_windows_at_1024x2048():
    info = DATASETS["cityscapes"]
    assert (info.slide_crop, info.slide_stride) == ((1024, 1024), (768, 768))
    assert slide_windows(1024, 2048, info.slide_crop, info.slide_stride) == [
        (0, 1024, 0, 1024),
        (0, 1024, 768, 1792),
        (0, 1024, 1024, 2048),  # the last window clamps to the right edge
    ]


def test_slide_windows_smaller_than_the_crop():
    assert slide_windows(512, 600, (1024, 1024), (768, 768)) == [(0, 512, 0, 600)]


def test_preprocess_normalizes_rgb():
    assert MEAN_RGB == (123.675, 116.28, 103.53)
    assert STD_RGB == (58.395, 57.12, 57.375)
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[..., 0] = 255  # pure red, in RGB order
    batch = preprocess(image, (4, 6))
    assert batch.shape == (1, 3, 4, 6) and batch.dtype == torch.float32
    expected = [(255 - 123.675) / 58.395, (0 - 116.28) / 57.12, (0 - 103.53) / 57.375]
    for channel, value in enumerate(expected):
        assert torch.allclose(batch[0, channel], torch.full((4, 6), value))


# --- reference predictions, written out by hand ----------------------------------------------------------


def _normalize(image: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


def _bilinear(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def model_19():
    torch.manual_seed(0)
    return randomize_(create_model("edaformer-t", num_classes=19), seed=4).eval()


# Cityscapes' slide pipeline shrunk so it runs in well under a second: crops 128, stride 96.
SMALL_SLIDE = dataclasses.replace(
    DATASETS["cityscapes"], resize_scale=(300, 160), slide_crop=(128, 128), slide_stride=(96, 96)
)
# Windows over a 160x300 network input, worked out by hand: rows (300-128)/96 -> 3 columns, 2 rows.
SLIDE_WINDOWS_160x300 = [
    (0, 128, 0, 128), (0, 128, 96, 224), (0, 128, 172, 300),
    (32, 160, 0, 128), (32, 160, 96, 224), (32, 160, 172, 300),
]  # fmt: skip


def _reference_slide(model, image: np.ndarray, isr: IsrConfig, input_size: tuple[int, int]):
    """Averaged logits at the network input size, and labels at the original size."""
    height, width = image.shape[:2]
    if (height, width) != input_size:
        image = cv2.resize(image, (input_size[1], input_size[0]), interpolation=cv2.INTER_LINEAR)
    x = _normalize(image)
    total = torch.zeros(1, 19, *input_size)
    count = torch.zeros(1, 1, *input_size)
    with torch.inference_mode():
        for y1, y2, x1, x2 in SLIDE_WINDOWS_160x300:
            logits = model(x[:, :, y1:y2, x1:x2], isr)
            total[:, :, y1:y2, x1:x2] += _bilinear(logits, (y2 - y1, x2 - x1))
            count[:, :, y1:y2, x1:x2] += 1
    assert count.min() >= 1 and count.max() == 4
    averaged = total / count
    labels = _bilinear(averaged, (height, width)).argmax(dim=1)[0].numpy()
    return averaged, labels


@pytest.mark.parametrize("image_size", [(160, 300), (80, 150)], ids=["native", "upscaled-x2"])
@pytest.mark.parametrize("code", ["1111/111", "2211/222"])
def test_slide_inference_on_a_non_square_image(model_19, image_size, code):
    isr = IsrConfig.parse(code)
    image = np.random.default_rng(1).integers(0, 256, size=(*image_size, 3), dtype=np.uint8)
    assert network_input_size(*image_size, SMALL_SLIDE) == (160, 300)
    assert slide_windows(160, 300, SMALL_SLIDE.slide_crop, SMALL_SLIDE.slide_stride) == SLIDE_WINDOWS_160x300

    seen = []

    def run(images, isr):
        seen.append((tuple(images.shape), isr))
        return model_19(images, isr=isr)

    prediction = Predictor(run, SMALL_SLIDE).predict(image, isr=isr)
    assert prediction.input_size == (160, 300)
    assert prediction.labels.shape == image_size
    assert seen == [((1, 3, 128, 128), isr)] * len(SLIDE_WINDOWS_160x300)  # one call per window, with the ISR
    expected_logits, expected_labels = _reference_slide(model_19, image, isr, (160, 300))
    assert np.array_equal(prediction.labels, expected_labels)
    assert len(np.unique(expected_labels)) > 1  # a non-degenerate map, so the comparison means something

    # The averaged logits themselves (labels alone would not see a missing division by the window count).
    with torch.inference_mode():
        logits = slide_logits(model_19, preprocess(image, (160, 300)), (128, 128), (96, 96), isr=isr)
    assert logits.shape == (1, 19, 160, 300)
    assert torch.allclose(logits, expected_logits, rtol=0, atol=1e-6 * float(expected_logits.abs().max()))


def test_whole_image_inference_with_aligned_resize():
    torch.manual_seed(0)
    model = randomize_(create_model("edaformer-t", num_classes=150), seed=5).eval()
    # ADE20K's pipeline at a quarter of the scale: factor = min(256/77, 128/50) = 2.56;
    # 50 -> 128, 77 -> int(197.12 + 0.5) = 197 -> 224.
    pipeline = dataclasses.replace(DATASETS["ade20k"], resize_scale=(256, 128))
    image = np.random.default_rng(2).integers(0, 256, size=(50, 77, 3), dtype=np.uint8)
    isr = IsrConfig.parse("2211/222")
    prediction = Predictor(model, pipeline).predict(image, isr=isr)
    assert prediction.input_size == (128, 224)
    assert prediction.labels.shape == (50, 77)

    x = _normalize(cv2.resize(image, (224, 128), interpolation=cv2.INTER_LINEAR))
    with torch.inference_mode():
        logits = model(x, isr=isr)
    assert logits.shape == (1, 150, 16, 28)
    expected = _bilinear(_bilinear(logits, (128, 224)), (50, 77)).argmax(dim=1)[0].numpy()
    assert np.array_equal(prediction.labels, expected)


# --- ISR settings and the ladder -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["2211/222", "2,2,1,1/2,2,2", " 2211 / 222 ", "2211-222"])
def test_isr_parse(text):
    isr = IsrConfig.parse(text)
    assert isr == IsrConfig(encoder=(2, 2, 1, 1), decoder=(2, 2, 2))
    assert isr.code == "2211/222"
    assert isr.encoder_pools == (16, 8, 2, 1)
    assert isr.decoder_pools == (8, 4, 2)  # stage-2, -3, -4 branches: 4a, 2b, c


def test_isr_defaults_and_multi_digit_ratios():
    assert IsrConfig() == IsrConfig.parse("1111/111")
    assert IsrConfig().encoder_pools == (8, 4, 2, 1) and IsrConfig().decoder_pools == (4, 2, 1)
    assert IsrConfig.parse("12,1,1,1/1,1,3").encoder_pools == (96, 4, 2, 1)
    assert IsrConfig.parse("12,1,1,1/1,1,3").decoder_pools == (4, 2, 3)
    from_lists = IsrConfig(encoder=[2, 2, 1, 1], decoder=[2, 2, 2])  # e.g. from JSON
    assert from_lists == IsrConfig.parse("2211/222") and hash(from_lists) == hash(IsrConfig.parse("2211/222"))


@pytest.mark.parametrize("text", ["", "2211", "221/222", "22111/222", "2211/22", "0111/111", "abc/def", "2211/2x2"])
def test_isr_parse_rejects(text):
    with pytest.raises(ValueError):
        IsrConfig.parse(text)


@pytest.mark.parametrize(
    ("encoder", "decoder"),
    [((1, 1, 1), (1, 1, 1)), ((1, 1, 1, 1), (1, 1)), ((1, 0, 1, 1), (1, 1, 1)), ((1, 1, 1, 1), (1, -1, 1))],
)
def test_isr_constructor_rejects(encoder, decoder):
    with pytest.raises(ValueError):
        IsrConfig(encoder=encoder, decoder=decoder)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        # side > stride * (pool - 1) for every (stride, pool); stage 1 has stride 4 and pool 8 * a.
        ("1111/111", 29),  # 4 * 7 + 1
        ("2211/222", 61),  # 4 * 15 + 1
        ("4211/222", 125),  # 4 * 31 + 1
        ("1111/411", 121),  # decoder stage-2 branch: pool 16 at stride 8 -> 8 * 15 + 1
        ("1114/111", 97),  # encoder stage 4: pool 4 at stride 32 -> 32 * 3 + 1
    ],
)
def test_min_input_side_and_fits(code, expected):
    isr = IsrConfig.parse(code)
    side = isr.min_input_side()
    assert side == expected
    assert isr.fits(side, side)
    assert isr.fits(side, 4 * side)
    assert not isr.fits(side - 1, side)
    assert not isr.fits(side, side - 1)
    assert not isr.fits(side - 1, 4096)


def test_fits_agrees_with_the_model_at_the_boundary():
    torch.manual_seed(0)
    model = create_model("edaformer-t", num_classes=19).eval()
    isr = IsrConfig.parse("2211/222")
    with torch.inference_mode():
        assert torch.isfinite(model(torch.randn(1, 3, 61, 80), isr)).all()
        with pytest.raises((RuntimeError, ValueError)):  # a pooling window larger than the feature map
            model(torch.randn(1, 3, 60, 80), isr)


def test_ladder_structure():
    assert LADDER[0].isr == IsrConfig()
    assert [level.rank for level in LADDER] == list(range(len(LADDER)))
    assert len({level.name for level in LADDER}) == len(LADDER)
    assert len({level.isr for level in LADDER}) == len(LADDER)
    for level in LADDER:
        assert level.name == level.isr.code.replace("/", "-")


@pytest.mark.parametrize("name", ["2211-222", "2211/222", " 2211-222 "])
def test_level_by_name(name):
    level = level_by_name(name)
    assert level.isr == IsrConfig.parse("2211/222")
    assert level in LADDER


@pytest.mark.parametrize("name", ["3333-333", "4211/222", "", "fast"])
def test_level_by_name_unknown(name):
    with pytest.raises(KeyError) as excinfo:
        level_by_name(name)
    message = str(excinfo.value)
    assert all(level.name in message for level in LADDER)  # the error lists the known levels
