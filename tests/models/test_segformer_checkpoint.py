"""SegFormer checkpoints: the NVlabs mmseg layout (torch.save and safetensors), strictness, the Hugging Face
layouts (4.x names in hub files / `save_pretrained`, 5.x in-memory names in a raw `torch.save`), refusal of the
OpenMMLab layout, and parity with Hugging Face `transformers`' SegformerForSemanticSegmentation as an
independent implementation (spec /work/shared/specs/segformer.md §1.8, §3, §6).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import CheckpointError, create_model
from models.checkpoint import official_checkpoint
from models.segformer_checkpoint import convert_segformer_state_dict, segformer_layout
from tests.models.reference_segformer import mmseg_to_hf, randomize_
from tests.paths import DATA

transformers = pytest.importorskip("transformers")

LISTINGS = DATA / "listings"
NUM_CLASSES = 19
CLASS_NAMES = [f"thing-{i}" for i in range(NUM_CLASSES)]
PALETTE = [[(7 * i) % 256, (31 * i) % 256, (101 * i) % 256] for i in range(NUM_CLASSES)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(create_model("segformer-b0", num_classes=NUM_CLASSES), seed=4).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 127, 131, generator=torch.Generator().manual_seed(7))  # fits 4421 (>= 125)


@pytest.fixture(scope="module")
def levels(model):
    ladder = model.spec.ladder()
    return [ladder[0], ladder[-1]]


@pytest.fixture(scope="module")
def hf_model(model, tmp_path_factory):
    """transformers' own model, loaded by `from_pretrained` from a hub-style folder holding our weights under the
    legacy (4.x) names: transformers 5 renames them itself, so this checks our mapping against its loader."""
    folder = tmp_path_factory.mktemp("hf_b0")
    config = transformers.SegformerConfig(
        num_labels=NUM_CLASSES, hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256,
        num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
        mlp_ratios=[4, 4, 4, 4], hidden_act="gelu",
    )
    config.save_pretrained(folder)
    legacy = {key: tensor.contiguous() for key, tensor in mmseg_to_hf(model.state_dict()).items()}
    save_file(legacy, str(folder / "model.safetensors"))
    # Eager attention: the explicit softmax(q k^T * d**-0.5) v of the official code (5.x defaults to SDPA).
    hf, info = transformers.SegformerForSemanticSegmentation.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    return hf.eval()


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    diff = (actual - expected).abs()
    scale = float(expected.std())
    return float(diff.max()) / scale, float(diff.mean()) / scale


def _hf_logits(hf_model, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(pixel_values=images).logits


def _set_block_and_stage_eps(hf_model, eps: float) -> None:
    for stage in hf_model.segformer.stages:
        for block in stage.blocks:
            block.layernorm_before.eps = block.layernorm_after.eps = eps
        stage.layer_norm.eps = eps


# --- the mmseg layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_layout_loads_strictly(tmp_path, model, images, levels, suffix):
    checkpoint = official_checkpoint(model, CLASS_NAMES, PALETTE)
    assert "decode_head.conv_seg.weight" in checkpoint["state_dict"]  # the unused head of the official files
    path = tmp_path / f"segformer_b0{suffix}"
    if suffix == ".pth":
        torch.save(checkpoint, path)
    else:
        save_file({k: v.contiguous() for k, v in checkpoint["state_dict"].items()}, str(path))
    loaded = create_model("segformer-b0", checkpoint=path).eval()  # class count read from the weights
    assert loaded.num_classes == NUM_CLASSES and loaded.meta.weights == "checkpoint"
    if suffix == ".pth":
        assert loaded.meta.class_names == CLASS_NAMES
    with torch.inference_mode():
        for level in levels:
            assert torch.equal(loaded(images, **level.kwargs), model(images, **level.kwargs))


def test_missing_unexpected_and_mis_shaped_keys_are_listed(tmp_path, model):
    state = official_checkpoint(model, CLASS_NAMES, PALETTE)["state_dict"]
    del state["backbone.block2.1.attn.kv.bias"]
    state["backbone.block4.0.attn.sr.weight"] = torch.zeros(256, 256, 1, 1)  # stage 4 has no sr
    state["backbone.norm3.weight"] = torch.ones(161)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        create_model("segformer-b0", checkpoint=path)
    message = str(error.value)
    assert "missing keys (1): backbone.block2.1.attn.kv.bias" in message
    assert "unexpected keys (1): backbone.block4.0.attn.sr.weight" in message
    assert "mis-shaped keys (1): backbone.norm3.weight (161,) != model (160,)" in message


def test_openmmlab_layout_is_refused_with_a_reason(tmp_path):
    state = {"backbone.layers.0.0.projection.weight": torch.zeros(32, 3, 7, 7),
             "decode_head.convs.0.conv.weight": torch.zeros(256, 32, 1, 1),
             "decode_head.conv_seg.weight": torch.zeros(150, 256, 1, 1)}
    path = tmp_path / "segformer_mit-b0_openmmlab.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"OpenMMLab mmsegmentation SegFormer checkpoint.*head differs"):
        create_model("segformer-b0", checkpoint=path)


def test_encoder_only_hf_checkpoint_is_refused(tmp_path, model):
    state = {k: v for k, v in mmseg_to_hf(model.state_dict()).items() if k.startswith("segformer.")}
    state["classifier.weight"] = torch.zeros(1000, 256)
    path = tmp_path / "mit_b0.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match="encoder-only"):
        create_model("segformer-b0", checkpoint=path)


# --- the Hugging Face layouts ------------------------------------------------------------------------------


def test_hf_listing_converts_to_the_official_listing():
    """spec §3.2/§3.3: the 208 HF entries of B0 map onto the 192 used mmseg entries (kv fused, no conv_seg)."""

    def read(name: str) -> dict[str, torch.Tensor]:
        tensors = {}
        for line in (LISTINGS / name).read_text().splitlines():
            key, shape = line.split()
            tensors[key] = torch.empty(tuple(int(d) for d in shape[1:-1].split(",") if d), device="meta")
        return tensors

    hf, official = read("segformer-b0_hf_state_dict.txt"), read("segformer-b0_state_dict.txt")
    assert segformer_layout(hf) == "hf" and segformer_layout(official) == "mmseg"
    converted = {k: tuple(v.shape) for k, v in convert_segformer_state_dict(hf).items()}
    assert converted == {k: tuple(v.shape) for k, v in official.items() if not k.startswith("decode_head.conv_seg")}


def test_save_pretrained_file_loads_and_equals_the_official_layout(tmp_path, model, hf_model, images, levels):
    hf_model.save_pretrained(tmp_path / "hub")  # what hub files hold: legacy 4.x names, safetensors
    path = tmp_path / "hub" / "model.safetensors"
    keys = set(load_file(str(path)))
    assert "segformer.encoder.block.0.0.attention.self.key.weight" in keys and len(keys) == 208
    official_path = tmp_path / "official.pth"
    torch.save(official_checkpoint(model, CLASS_NAMES, PALETTE), official_path)
    from_hf = create_model("segformer-b0", checkpoint=path).eval()
    from_official = create_model("segformer-b0", checkpoint=official_path).eval()
    with torch.inference_mode():
        for level in levels:
            assert torch.equal(from_hf(images, **level.kwargs), from_official(images, **level.kwargs))


@pytest.mark.parametrize("names", ["legacy", "v5"])
def test_hf_bin_files_load(tmp_path, model, hf_model, names):
    """A hub `pytorch_model.bin` (4.x names) and a raw `torch.save` of a 5.x model (segformer.stages.* names)."""
    state = mmseg_to_hf(model.state_dict()) if names == "legacy" else hf_model.state_dict()
    if names == "legacy":
        del state["decode_head.batch_norm.num_batches_tracked"]  # unused at inference; some converted files lack it
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    assert segformer_layout(torch.load(path, weights_only=True)) == ("hf" if names == "legacy" else "hf5")
    loaded = create_model("segformer-b0", checkpoint=path).eval()
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[key], value), key


def test_a_missing_value_half_is_reported(tmp_path, model):
    state = mmseg_to_hf(model.state_dict())
    del state["segformer.encoder.block.1.0.attention.self.value.weight"]
    path = tmp_path / "half.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): backbone.block2.0.attn.kv.weight.*"
                                              r"unexpected keys \(1\): backbone.block2.0.attn._k.weight"):
        create_model("segformer-b0", checkpoint=path)


def test_matches_transformers_once_layer_norm_eps_is_aligned(model, hf_model, images):
    """HF builds every LayerNorm with eps 1e-5; the official blocks (norm1/norm2) and stage-end norms use 1e-6
    (spec §1.8, §6). With those set to 1e-6, HF eager equals the official arithmetic bit for bit, so ours must
    agree to float noise; left at 1e-5 the two differ by more (a check that the eps really matters here).
    HF has no ISR, so the comparison is at the training setting."""
    explicit = create_model("segformer-b0", num_classes=NUM_CLASSES, fused_attention=False).eval()
    explicit.load_state_dict(model.state_dict())
    with torch.inference_mode():
        ours_sdpa, ours_explicit = model(images), explicit(images)
    try:
        _set_block_and_stage_eps(hf_model, 1e-5)
        unaligned = _hf_logits(hf_model, images)
        _set_block_and_stage_eps(hf_model, 1e-6)
        aligned = _hf_logits(hf_model, images)
    finally:
        _set_block_and_stage_eps(hf_model, 1e-6)
    assert aligned.shape == ours_sdpa.shape == (2, NUM_CLASSES, 32, 33)
    for ours in (ours_sdpa, ours_explicit):
        max_diff, mean_diff = _rel(ours, aligned)
        assert max_diff <= 3e-5 and mean_diff <= 1.5e-6, (max_diff, mean_diff)
    assert _rel(ours_explicit, aligned)[0] <= 1e-6  # the same arithmetic: equal up to last-bit noise
    assert _rel(ours_explicit, unaligned)[0] > 3e-6  # eps 1e-5 is measurably not the official model
