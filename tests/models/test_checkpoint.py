"""Checkpoint loading: official mmseg layout, `module.` prefix, safetensors, plain state dicts; strictness
(missing / unexpected / mis-shaped keys listed in the error); refusal of pickles that carry code."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models import CheckpointError, IsrConfig, create_model, get_spec, load_checkpoint_file
from models.checkpoint import official_checkpoint, prepare_state_dict
from models.datasets import DATASETS
from models.predict import Predictor
from tests.models.reference_edaformer import randomize_

NUM_CLASSES = 19  # a built-in class count (Cityscapes), so the dataset's names exist and can be overridden
CUSTOM_NAMES = [f"thing-{i}" for i in range(NUM_CLASSES)]
CUSTOM_PALETTE = [[(7 * i) % 256, (31 * i) % 256, (101 * i) % 256] for i in range(NUM_CLASSES)]
ISR = IsrConfig.parse("2211/222")
# A whole-image pipeline at a small scale keeps the Predictor comparison fast.
SMALL_PIPELINE = dataclasses.replace(
    DATASETS["cityscapes"], test_mode="whole", resize_scale=(128, 96), align_to=32, slide_crop=None, slide_stride=None
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(create_model("edaformer-t", num_classes=NUM_CLASSES), seed=3).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(1, 3, 72, 100, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def rgb_image():
    return np.random.default_rng(0).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)


def _official(model) -> dict:
    return official_checkpoint(model, CUSTOM_NAMES, CUSTOM_PALETTE)


def _assert_same_predictions(loaded, model, images, rgb_image):
    loaded.eval()
    with torch.inference_mode():
        for isr in (IsrConfig(), ISR):
            assert torch.equal(loaded(images, isr=isr), model(images, isr=isr))
    expected = Predictor(model, SMALL_PIPELINE).predict(rgb_image, isr=ISR)
    got = Predictor(loaded, SMALL_PIPELINE).predict(rgb_image, isr=ISR)
    assert expected.labels.shape == (60, 90)
    assert np.array_equal(got.labels, expected.labels)


# --- formats that load -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_layout_loads_strictly_and_predicts_the_same(tmp_path, model, images, rgb_image, prefix):
    checkpoint = _official(model)
    assert "decode_head.conv_seg.weight" in checkpoint["state_dict"]  # the unused head of the official files
    checkpoint["state_dict"] = {prefix + key: value for key, value in checkpoint["state_dict"].items()}
    path = tmp_path / "edaformer_t_cityscapes.pth"
    torch.save(checkpoint, path)

    loaded = create_model("edaformer-t", checkpoint=path)  # num_classes read from the weights
    assert loaded.num_classes == NUM_CLASSES
    assert loaded.meta.weights == "checkpoint"
    # The checkpoint's meta wins over the built-in Cityscapes names and palette.
    assert loaded.meta.class_names == CUSTOM_NAMES
    assert [list(c) for c in loaded.meta.palette] == CUSTOM_PALETTE
    assert loaded.meta.class_names != list(DATASETS["cityscapes"].class_names)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    _assert_same_predictions(loaded, model, images, rgb_image)


def test_explicit_num_classes_and_dataset_are_accepted(tmp_path, model):
    path = tmp_path / "ckpt.pth"
    torch.save(_official(model), path)
    loaded = create_model("edaformer-t", num_classes=NUM_CLASSES, checkpoint=path, dataset="cityscapes")
    assert loaded.meta.class_names == CUSTOM_NAMES


def test_safetensors_with_class_metadata(tmp_path, model, images, rgb_image):
    path = tmp_path / "edaformer_t.safetensors"
    tensors = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"classes": json.dumps(CUSTOM_NAMES), "palette": json.dumps(CUSTOM_PALETTE)})
    loaded = create_model("edaformer-t", checkpoint=path)
    assert loaded.num_classes == NUM_CLASSES
    assert loaded.meta.class_names == CUSTOM_NAMES
    assert [list(c) for c in loaded.meta.palette] == CUSTOM_PALETTE
    _assert_same_predictions(loaded, model, images, rgb_image)


def test_plain_state_dict_keeps_the_datasets_classes(tmp_path, model, images, rgb_image):
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    loaded = create_model("edaformer-t", checkpoint=path)
    assert loaded.num_classes == NUM_CLASSES
    assert loaded.meta.class_names == list(DATASETS["cityscapes"].class_names)
    _assert_same_predictions(loaded, model, images, rgb_image)


def test_load_checkpoint_file_reads_meta(tmp_path, model):
    path = tmp_path / "ckpt.pth"
    torch.save(_official(model), path)
    loaded = load_checkpoint_file(path)
    assert loaded.class_names == CUSTOM_NAMES
    assert "decode_head.conv_seg.weight" in loaded.state_dict  # the file as it is
    prepared = prepare_state_dict(loaded, get_spec("edaformer-t").checkpoint)
    assert prepared.num_classes == NUM_CLASSES
    assert prepared.dropped_keys == ["decode_head.conv_seg.bias", "decode_head.conv_seg.weight"]
    assert "decode_head.conv_seg.weight" not in prepared.state_dict


# --- strictness ------------------------------------------------------------------------------------------

MISSING = "backbone.block3.7.mlp.fc1.bias"
UNEXPECTED = "decode_head.aux_head.weight"
MIS_SHAPED = "backbone.block1.0.attn.sr.weight"


def _corrupt(state_dict: dict, missing: bool, unexpected: bool, mis_shaped: bool) -> dict:
    state_dict = dict(state_dict)
    if missing:
        del state_dict[MISSING]
    if unexpected:
        state_dict[UNEXPECTED] = torch.zeros(3)
    if mis_shaped:
        state_dict[MIS_SHAPED] = torch.zeros(32, 32, 3, 3)
    return state_dict


@pytest.mark.parametrize(
    ("missing", "unexpected", "mis_shaped"),
    [(True, False, False), (False, True, False), (False, False, True), (True, True, True)],
    ids=["missing", "unexpected", "mis-shaped", "all-three"],
)
def test_bad_keys_fail_with_the_keys_listed(tmp_path, model, missing, unexpected, mis_shaped):
    checkpoint = _official(model)
    checkpoint["state_dict"] = _corrupt(checkpoint["state_dict"], missing, unexpected, mis_shaped)
    path = tmp_path / "bad.pth"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError) as excinfo:
        create_model("edaformer-t", checkpoint=path)
    message = str(excinfo.value)
    for wanted, key in ((missing, MISSING), (unexpected, UNEXPECTED), (mis_shaped, MIS_SHAPED)):
        assert (key in message) == wanted, message


def test_wrong_class_count_is_a_mis_shaped_key(tmp_path, model):
    path = tmp_path / "ckpt.pth"
    torch.save(_official(model), path)
    with pytest.raises(CheckpointError, match=r"decode_head\.linear_pred\.weight"):
        create_model("edaformer-t", num_classes=150, checkpoint=path)


def test_meta_with_the_wrong_number_of_classes_is_refused(tmp_path, model):
    path = tmp_path / "ckpt.pth"
    torch.save(official_checkpoint(model, CUSTOM_NAMES[:5], CUSTOM_PALETTE[:5]), path)
    with pytest.raises(CheckpointError):
        create_model("edaformer-t", checkpoint=path)


def test_t_checkpoint_into_b_lists_mismatches(tmp_path, model):
    path = tmp_path / "t.pth"
    torch.save(_official(model), path)
    with pytest.raises(CheckpointError, match=r"missing keys .*backbone\.block1\.2\."), torch.device("meta"):
        create_model("edaformer-b", checkpoint=path)


# --- unsafe or unreadable files --------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle", "top-level"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, model, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state_dict = {k: v for k, v in list(model.state_dict().items())[:4]}
    if container == "torch-zip":
        torch.save({"state_dict": state_dict, "meta": {"CLASSES": _Payload(marker)}}, path)
    elif container == "raw-pickle":
        with path.open("wb") as handle:
            pickle.dump({"state_dict": {}, "payload": _Payload(marker)}, handle, protocol=2)
    else:
        torch.save(_Payload(marker), path)

    with pytest.raises(CheckpointError) as excinfo:
        create_model("edaformer-t", checkpoint=path)
    assert str(path) in str(excinfo.value)
    with pytest.raises(CheckpointError):
        load_checkpoint_file(path)
    assert not marker.exists()

    # The payload is live: an unsafe load would have run it (proves the test can fail).
    with contextlib.suppress(Exception):  # whatever the unsafe load does after running the payload
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_file_fails_clearly(tmp_path):
    path = tmp_path / "nope" / "edaformer_t.pth"
    with pytest.raises(CheckpointError, match="does not exist") as excinfo:
        create_model("edaformer-t", checkpoint=path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    ("suffix", "content"),
    [
        (".pth", b""),
        (".pth", b"this is not a checkpoint at all" * 10),  # not a zip: torch's legacy unpickler path
        (".pth", b"hello\n"),
        (".safetensors", b"this is not a checkpoint at all" * 10),
    ],
    ids=["empty", "garbage", "text", "garbage-safetensors"],
)
def test_unreadable_file_fails_with_checkpoint_error(tmp_path, model, suffix, content):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as excinfo:
        create_model("edaformer-t", checkpoint=path)
    assert str(path) in str(excinfo.value)


def test_truncated_checkpoint_fails_with_checkpoint_error(tmp_path, model):
    full = tmp_path / "full.pth"
    torch.save(_official(model), full)
    path = tmp_path / "truncated.pth"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])  # an interrupted download
    with pytest.raises(CheckpointError, match=r"truncated\.pth"):
        create_model("edaformer-t", checkpoint=path)


def test_non_tensor_entries_are_refused(tmp_path, model):
    path = tmp_path / "odd.pth"
    state_dict = dict(model.state_dict())
    state_dict["backbone.norm1.weight"] = [1.0, 2.0]
    torch.save({"state_dict": state_dict}, path)
    with pytest.raises(CheckpointError, match=r"backbone\.norm1\.weight"):
        create_model("edaformer-t", checkpoint=path)
