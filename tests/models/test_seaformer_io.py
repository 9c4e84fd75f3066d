"""SeaFormer checkpoints (official mmseg 0.x layout with torch.save, safetensors; strictness) and prediction through
the official test pipelines (ADE20K whole + align to 32; Cityscapes whole at 2048x1024, no sliding window)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models import CheckpointError, create_model, get_spec, load_checkpoint_file
from models.checkpoint import official_checkpoint, prepare_state_dict
from models.datasets import DATASETS
from models.predict import Predictor, pipeline_for
from tests.models.reference_seaformer import calibrate_batchnorm_, randomize_, structured_images

NUM_CLASSES = 19
NAMES = [f"thing-{i}" for i in range(NUM_CLASSES)]
PALETTE = [[(7 * i) % 256, (31 * i) % 256, (101 * i) % 256] for i in range(NUM_CLASSES)]
MISSING = "backbone.trans2.transformer_blocks.1.attn.pos_emb_columnk.pos_embed"
UNEXPECTED = "decode_head.aux_head.weight"
MIS_SHAPED = "backbone.smb2.layer1.conv.2.c.weight"  # a 5x5 depthwise kernel


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_(create_model("seaformer-t", num_classes=NUM_CLASSES), seed=1)
    return calibrate_batchnorm_(model, structured_images(2, 128, 128, seed=2))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return structured_images(1, 65, 97, seed=3)


@pytest.fixture(scope="module")
def rgb_image() -> np.ndarray:
    """A 61x87 RGB image with regions (odd size, so every resize is exercised)."""
    rgb = np.zeros((61, 87, 3), dtype=np.uint8)
    rgb[:30, :40] = (200, 30, 30)
    rgb[30:, 40:] = (20, 180, 60)
    rgb[:, 60:] += np.arange(27, dtype=np.uint8)[None, :, None] * 3
    return rgb


def _assert_same(loaded: torch.nn.Module, model: torch.nn.Module, images: torch.Tensor) -> None:
    loaded.eval()
    with torch.inference_mode():
        assert torch.equal(loaded(images), model(images))


def test_official_layout_loads_strictly(tmp_path, model, images):
    checkpoint = official_checkpoint(model, NAMES, PALETTE)
    assert list(checkpoint["state_dict"]) == list(model.state_dict())  # nothing added: conv_seg is used
    path = tmp_path / "seaformer_t_city.pth"
    torch.save(checkpoint, path)
    loaded = create_model("seaformer-t", checkpoint=path)  # class count read from decode_head.conv_seg.weight
    assert loaded.num_classes == NUM_CLASSES
    assert (loaded.meta.weights, loaded.meta.class_names) == ("checkpoint", NAMES)
    prepared = prepare_state_dict(load_checkpoint_file(path), get_spec("seaformer-t").checkpoint)
    assert prepared.dropped_keys == []
    _assert_same(loaded, model, images)


def test_safetensors_loads_strictly(tmp_path, model, images):
    path = tmp_path / "seaformer_t.safetensors"
    tensors = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"classes": json.dumps(NAMES), "palette": json.dumps(PALETTE)})
    loaded = create_model("seaformer-t", checkpoint=path)
    assert loaded.meta.class_names == NAMES
    _assert_same(loaded, model, images)


@pytest.mark.parametrize(
    ("missing", "unexpected", "mis_shaped"),
    [(True, False, False), (False, True, False), (False, False, True), (True, True, True)],
    ids=["missing", "unexpected", "mis-shaped", "all-three"],
)
def test_bad_keys_fail_with_the_keys_listed(tmp_path, model, missing, unexpected, mis_shaped):
    checkpoint = official_checkpoint(model, NAMES, PALETTE)
    state_dict = checkpoint["state_dict"]
    if missing:
        del state_dict[MISSING]
    if unexpected:
        state_dict[UNEXPECTED] = torch.zeros(3)
    if mis_shaped:
        state_dict[MIS_SHAPED] = torch.zeros(96, 1, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError) as excinfo:
        create_model("seaformer-t", checkpoint=path)
    message = str(excinfo.value)
    for wanted, key in ((missing, MISSING), (unexpected, UNEXPECTED), (mis_shaped, MIS_SHAPED)):
        assert (key in message) == wanted, message


def test_t_checkpoint_into_s_is_refused(tmp_path, model):
    path = tmp_path / "t.pth"
    torch.save(official_checkpoint(model, NAMES, PALETTE), path)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys .*backbone\.smb1\.layer2"), torch.device("meta"):
        create_model("seaformer-s", checkpoint=path)


# --- prediction ------------------------------------------------------------------------------------------


def test_ade20k_pipeline_predicts_at_the_image_size(model, rgb_image):
    pipeline = pipeline_for(get_spec("seaformer-t"), DATASETS["ade20k"])
    assert (pipeline.test_mode, pipeline.align_to, pipeline.resize_scale) == ("whole", 32, (2048, 512))
    predictor = Predictor(model, pipeline)
    assert predictor.input_size(61, 87, scale=0.25) == (128, 192)  # keep ratio into (512, 128): 128x183; up to 32
    prediction = predictor.predict(rgb_image, scale=0.25)
    assert prediction.labels.shape == (61, 87)
    assert len(np.unique(prediction.labels)) >= 2


def test_cityscapes_pipeline_is_whole_image_at_2048x1024(model, rgb_image):
    pipeline = pipeline_for(get_spec("seaformer-t"), DATASETS["cityscapes"])
    assert (pipeline.test_mode, pipeline.align_to, pipeline.resize_scale) == ("whole", None, (2048, 1024))
    calls = []

    def run(batch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(batch.shape))
        return model(batch)

    prediction = Predictor(run, pipeline).predict(rgb_image, scale=0.1)
    assert calls == [(1, 3, 102, 145)]  # one whole-image call, keep ratio into (205, 102), no alignment
    assert prediction.labels.shape == (61, 87)
