"""SegFormer checkpoint layouts: NVlabs mmseg (ours), Hugging Face `transformers` (4.x names, which hub files
and `save_pretrained` hold, and the 5.x in-memory names), and the OpenMMLab layout that is refused.

Spec /work/shared/specs/segformer.md §3. Both supported layouts hold the same tensors under other names;
the only structural difference is that HF splits the fused `attn.kv` Linear ([2C, C], rows 0:C = K,
C:2C = V) into `key` and `value`, and has no `decode_head.conv_seg` (which the forward never uses).

    state_dict = convert_segformer_state_dict(hf_state_dict)   # -> backbone.* / decode_head.* names
"""

from __future__ import annotations

import re

import torch

StateDict = dict[str, torch.Tensor]

# Renames of single keys, applied in order; the first rule that matches wins. `{s}` is HF's 0-based stage
# index, turned into mmseg's 1-based one by `_stage`. Key and value become the temporary `attn._k` / `attn._v`
# and are fused afterwards.
_BLOCK = r"(?P<s>\d+)\.(?P<j>\d+)\."
_HF_LEGACY_RULES: tuple[tuple[str, str], ...] = (
    (r"^segformer\.encoder\.patch_embeddings\.(?P<s>\d+)\.proj\.", "backbone.patch_embed{S}.proj."),
    (r"^segformer\.encoder\.patch_embeddings\.(?P<s>\d+)\.layer_norm\.", "backbone.patch_embed{S}.norm."),
    (rf"^segformer\.encoder\.block\.{_BLOCK}layer_norm_1\.", "backbone.block{S}.{j}.norm1."),
    (rf"^segformer\.encoder\.block\.{_BLOCK}layer_norm_2\.", "backbone.block{S}.{j}.norm2."),
    (rf"^segformer\.encoder\.block\.{_BLOCK}attention\.self\.query\.", "backbone.block{S}.{j}.attn.q."),
    (rf"^segformer\.encoder\.block\.{_BLOCK}attention\.self\.key\.", "backbone.block{S}.{j}.attn._k."),
    (rf"^segformer\.encoder\.block\.{_BLOCK}attention\.self\.value\.", "backbone.block{S}.{j}.attn._v."),
    (rf"^segformer\.encoder\.block\.{_BLOCK}attention\.self\.sr\.", "backbone.block{S}.{j}.attn.sr."),
    (rf"^segformer\.encoder\.block\.{_BLOCK}attention\.self\.layer_norm\.", "backbone.block{S}.{j}.attn.norm."),
    (rf"^segformer\.encoder\.block\.{_BLOCK}attention\.output\.dense\.", "backbone.block{S}.{j}.attn.proj."),
    (rf"^segformer\.encoder\.block\.{_BLOCK}mlp\.dense1\.", "backbone.block{S}.{j}.mlp.fc1."),
    (rf"^segformer\.encoder\.block\.{_BLOCK}mlp\.dense2\.", "backbone.block{S}.{j}.mlp.fc2."),
    (rf"^segformer\.encoder\.block\.{_BLOCK}mlp\.dwconv\.dwconv\.", "backbone.block{S}.{j}.mlp.dwconv.dwconv."),
    (r"^segformer\.encoder\.layer_norm\.(?P<s>\d+)\.", "backbone.norm{S}."),
    (r"^decode_head\.linear_c\.(?P<s>\d+)\.proj\.", "decode_head.linear_c{S}.proj."),
)
# transformers 5.x renamed the modules in memory (its `conversion_mapping.py`); a raw `torch.save` of such a
# model's state dict carries these names.
_HF_V5_RULES: tuple[tuple[str, str], ...] = (
    (r"^segformer\.stages\.(?P<s>\d+)\.patch_embeddings\.proj\.", "backbone.patch_embed{S}.proj."),
    (r"^segformer\.stages\.(?P<s>\d+)\.patch_embeddings\.layer_norm\.", "backbone.patch_embed{S}.norm."),
    (r"^segformer\.stages\.(?P<s>\d+)\.blocks\.(?P<j>\d+)\.layernorm_before\.", "backbone.block{S}.{j}.norm1."),
    (r"^segformer\.stages\.(?P<s>\d+)\.blocks\.(?P<j>\d+)\.layernorm_after\.", "backbone.block{S}.{j}.norm2."),
    (r"^segformer\.stages\.(?P<s>\d+)\.blocks\.(?P<j>\d+)\.attention\.q_proj\.", "backbone.block{S}.{j}.attn.q."),
    (r"^segformer\.stages\.(?P<s>\d+)\.blocks\.(?P<j>\d+)\.attention\.k_proj\.", "backbone.block{S}.{j}.attn._k."),
    (r"^segformer\.stages\.(?P<s>\d+)\.blocks\.(?P<j>\d+)\.attention\.v_proj\.", "backbone.block{S}.{j}.attn._v."),
    (r"^segformer\.stages\.(?P<s>\d+)\.blocks\.(?P<j>\d+)\.attention\.o_proj\.", "backbone.block{S}.{j}.attn.proj."),
    (r"^segformer\.stages\.(?P<s>\d+)\.blocks\.(?P<j>\d+)\.attention\.sequence_reduction\.sequence_reduction\.",
     "backbone.block{S}.{j}.attn.sr."),
    (r"^segformer\.stages\.(?P<s>\d+)\.blocks\.(?P<j>\d+)\.attention\.sequence_reduction\.layer_norm\.",
     "backbone.block{S}.{j}.attn.norm."),
    (r"^segformer\.stages\.(?P<s>\d+)\.blocks\.(?P<j>\d+)\.mlp\.", "backbone.block{S}.{j}.mlp."),
    (r"^segformer\.stages\.(?P<s>\d+)\.layer_norm\.", "backbone.norm{S}."),
    (r"^decode_head\.linear_projections\.(?P<s>\d+)\.proj\.", "decode_head.linear_c{S}.proj."),
)
# The head's ConvModule is three modules in HF (any version).
_HF_HEAD_RULES: tuple[tuple[str, str], ...] = (
    (r"^decode_head\.linear_fuse\.weight$", "decode_head.linear_fuse.conv.weight"),
    (r"^decode_head\.batch_norm\.", "decode_head.linear_fuse.bn."),
    (r"^decode_head\.classifier\.", "decode_head.linear_pred."),
)


def segformer_layout(state_dict: StateDict) -> str:
    """'mmseg' (NVlabs), 'hf' (transformers 4.x names), 'hf5' (5.x in-memory names), 'openmmlab' or 'unknown'."""
    keys = list(state_dict)

    def any_starts(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if any_starts("backbone.layers.") or any_starts("decode_head.convs.") or any_starts("decode_head.fusion_conv."):
        return "openmmlab"
    if any_starts("backbone.patch_embed1."):
        return "mmseg"
    if any_starts("segformer.encoder."):
        return "hf"
    if any_starts("segformer.stages."):
        return "hf5"
    return "unknown"


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, template in rules:
        match = re.match(pattern, key)
        if match:
            groups = match.groupdict()
            stage = str(int(groups["s"]) + 1) if "s" in groups else ""
            return template.format(S=stage, j=groups.get("j", "")) + key[match.end():]
    return key  # unknown keys stay as they are, so the strict load names them


def _fuse_key_value(state_dict: StateDict) -> StateDict:
    """attn._k.* and attn._v.* -> attn.kv.* = cat([K; V], dim 0), in the mmseg order (K rows first).

    A half without its partner keeps its temporary name, so that the strict load reports it.
    """
    fused: StateDict = {}
    for key, tensor in state_dict.items():
        if ".attn._k." in key or ".attn._v." in key:
            key_half, value_half = key.replace(".attn._v.", ".attn._k."), key.replace(".attn._k.", ".attn._v.")
            if key_half in state_dict and value_half in state_dict:
                if key == key_half:
                    kv = torch.cat([state_dict[key_half], state_dict[value_half]], dim=0)
                    fused[key.replace(".attn._k.", ".attn.kv.")] = kv
                continue
        fused[key] = tensor
    return fused


def _with_batch_count(state_dict: StateDict) -> StateDict:
    """BatchNorm's `num_batches_tracked` is never used at inference and some converted files drop it (spec §3.6:
    ignore it); a zero count is added where the rest of the BatchNorm is present, so the strict load still holds."""
    filled = dict(state_dict)
    for prefix in ("decode_head.linear_fuse.bn.", "decode_head.batch_norm."):
        if prefix + "running_mean" in filled and prefix + "num_batches_tracked" not in filled:
            filled[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return filled


def convert_segformer_state_dict(state_dict: StateDict) -> StateDict:
    """Any supported SegFormer layout -> the NVlabs mmseg names (unchanged when it is mmseg already).

    Raises ValueError for layouts this model cannot run: OpenMMLab's mmsegmentation SegFormer (another head)
    and the encoder-only ImageNet checkpoints (`nvidia/mit-b*`).
    """
    layout = segformer_layout(state_dict)
    state_dict = _with_batch_count(state_dict)
    if layout == "openmmlab":
        raise ValueError(
            "this is an OpenMMLab mmsegmentation SegFormer checkpoint (backbone.layers.*, decode_head.convs.*): "
            "its head differs (a Conv+BN+ReLU per branch, concatenation in the order c1..c4), so it cannot run "
            "as the NVlabs SegFormer; use an NVlabs (backbone.patch_embed1.*) or Hugging Face nvidia/segformer-* "
            "checkpoint instead"
        )
    if layout not in ("hf", "hf5"):
        return state_dict
    if not any(key.startswith("decode_head.") for key in state_dict):
        raise ValueError(
            "this Hugging Face SegFormer checkpoint has no decode_head: it is an encoder-only (ImageNet, "
            "nvidia/mit-b*) checkpoint, not a segmentation model"
        )
    rules = (_HF_LEGACY_RULES if layout == "hf" else _HF_V5_RULES) + _HF_HEAD_RULES
    renamed = {_rename(key, rules): tensor for key, tensor in state_dict.items()}
    return _fuse_key_value(renamed)
