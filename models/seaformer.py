"""SeaFormer (Wan et al., ICLR 2023): MobileNetV2 stacks + SEA transformer layers, and the light head.

Variants T/S/B/L exactly as the official configs (fudan-zvg/SeaFormer `seaformer-seg/local_configs/seaformer/
seaformer_{tiny,small,base,large}.py`). Module and parameter names follow the official mmseg 0.x checkpoints
(`backbone.smb1.stem_block.0.c.weight`, `decode_head.fuse1.local_embedding.bn.bias`, ...), so official state
dicts load strictly; `decode_head.conv_seg` is the classifier and no key is unused.

SeaFormer has no compute knob: the service trades quality for speed through the input scale (the README's
Cityscapes "h" vs "f" rows: 4x the pixels for about +5 mIoU). Any input size runs; logits are
(B, K, ceil(H/8), ceil(W/8)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelMeta, SegmentationModel
from models.layers.seaformer_blocks import SeaFormerLayer, StackedMV2Block, h_sigmoid
from models.registry import register_model
from models.spec import CheckpointRules, ModelSpec

MV2Row = tuple[int, int, int, int]  # kernel, expand ratio, output channels, stride


@dataclass(frozen=True)
class SeaFormerConfig:
    """One variant, in the official config's terms (`model_cfgs` and `decode_head`)."""

    cfgs: tuple[tuple[MV2Row, ...], ...]  # smb1..smb5
    channels: tuple[int, ...]  # input channels of smb1..smb5 (smb1's = stem width), then smb5's output
    depths: tuple[int, ...]  # SEA blocks per trans layer; the last len(depths) smb stages get one each
    key_dims: tuple[int, ...]
    emb_dims: tuple[int, ...]
    num_heads: int
    mlp_ratios: tuple[float, ...]
    head_in_channels: tuple[int, ...]  # [stride-8 detail, trans1, trans2, ...]
    head_embed_dims: tuple[int, ...]
    head_channels: int  # == head_embed_dims[-1] (upstream requires it)


class SeaFormerBackbone(nn.Module):
    """smb1..smb5 to strides 4, 8, 16, 32, 64; `trans{i}` after each of the last len(depths) smb stages.

    images (B, 3, H, W) -> [smb2 output (stride 8), trans1 output, trans2 output, ...], each NCHW.
    """

    def __init__(self, config: SeaFormerConfig) -> None:
        super().__init__()
        self.num_stages = len(config.cfgs)
        self.num_layers = len(config.depths)
        for index, cfgs in enumerate(config.cfgs):
            setattr(self, f"smb{index + 1}", StackedMV2Block(cfgs, config.channels[index], stem=index == 0))
        for index, depth in enumerate(config.depths):
            layer = SeaFormerLayer(depth, config.emb_dims[index], config.key_dims[index], config.num_heads,
                                   config.mlp_ratios[index])
            setattr(self, f"trans{index + 1}", layer)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        x = images
        first_trans_stage = self.num_stages - self.num_layers
        for stage in range(self.num_stages):
            x = getattr(self, f"smb{stage + 1}")(x)
            if stage == 1:  # the shared stride-8 feature: the head's detail input
                outputs.append(x)
            if stage >= first_trans_stage:
                x = getattr(self, f"trans{stage - first_trans_stage + 1}")(x)
                outputs.append(x)
        return outputs


class ConvModule(nn.Module):
    """mmcv ConvModule as the light head builds it: a bias-free 1x1 conv (`conv`), BatchNorm (`bn`), and a
    ReLU only when asked."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int = 1, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class FusionBlock(nn.Module):
    """detail (B, C_l, h, w), context (B, C_g, h', w') -> ConvBN(detail) * Up(h_sigmoid(ConvBN(context)))."""

    def __init__(self, detail_channels: int, context_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.local_embedding = ConvModule(detail_channels, embed_dim, relu=False)
        self.global_act = ConvModule(context_channels, embed_dim, relu=False)

    def forward(self, detail: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        local = self.local_embedding(detail)
        gate = F.interpolate(h_sigmoid(self.global_act(context)), size=local.shape[-2:], mode="bilinear",
                             align_corners=False)
        return local * gate


class LightHead(nn.Module):
    """Fusion blocks from the stride-8 detail over trans1, trans2(, trans3); depthwise 1x1 ConvBN + ReLU
    (`linear_fuse`); Dropout2d(0.1); `conv_seg`. Logits at stride 8."""

    def __init__(self, config: SeaFormerConfig, num_classes: int) -> None:
        super().__init__()
        channels, embed_dims = config.head_channels, config.head_embed_dims
        if channels != embed_dims[-1]:
            raise ValueError(f"head channels {channels} must equal the last embed dim {embed_dims[-1]}")
        # mmseg's BaseDecodeHead registers conv_seg (and the dropout) first: the official state_dict order.
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(0.1)
        self.linear_fuse = ConvModule(channels, channels, groups=channels, relu=True)
        self.num_fusions = len(embed_dims)
        for index, embed_dim in enumerate(embed_dims):
            detail_channels = config.head_in_channels[0] if index == 0 else embed_dims[index - 1]
            fusion = FusionBlock(detail_channels, config.head_in_channels[index + 1], embed_dim)
            setattr(self, f"fuse{index + 1}", fusion)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[0]
        for index in range(self.num_fusions):
            x = getattr(self, f"fuse{index + 1}")(x, features[index + 1])
        return self.conv_seg(self.dropout(self.linear_fuse(x)))


class SeaFormer(SegmentationModel):
    """SeaFormer: `logits = model(images)`.

    images: normalized float (B, 3, H, W), any H and W. logits: (B, num_classes, ceil(H/8), ceil(W/8)),
    the light head's output before any resize. The forward keeps no state (thread-safe in eval mode).
    """

    def __init__(self, config: SeaFormerConfig, num_classes: int, meta: ModelMeta, spec: ModelSpec) -> None:
        super().__init__()
        self.backbone = SeaFormerBackbone(config)
        self.decode_head = LightHead(config, num_classes)
        self.meta = meta
        self.spec = spec

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(images))


def _mv2(*rows: MV2Row) -> tuple[MV2Row, ...]:
    return tuple(rows)


# From local_configs/seaformer/seaformer_{tiny,small,base,large}.py at 9718d05 (2025-02-07). mlp_ratios is
# the backbone's default [2, 4] where a config does not set it; attn_ratio is 2 everywhere.
CONFIGS: dict[str, SeaFormerConfig] = {
    "seaformer-t": SeaFormerConfig(
        cfgs=(_mv2((3, 1, 16, 1), (3, 4, 16, 2), (3, 3, 16, 1)), _mv2((5, 3, 32, 2), (5, 3, 32, 1)),
              _mv2((3, 3, 64, 2), (3, 3, 64, 1)), _mv2((5, 3, 128, 2)), _mv2((3, 6, 160, 2))),
        channels=(16, 16, 32, 64, 128, 160), depths=(2, 2), key_dims=(16, 24), emb_dims=(128, 160), num_heads=4,
        mlp_ratios=(2, 4), head_in_channels=(32, 128, 160), head_embed_dims=(64, 96), head_channels=96,
    ),
    "seaformer-s": SeaFormerConfig(
        cfgs=(_mv2((3, 1, 16, 1), (3, 4, 24, 2), (3, 3, 24, 1)), _mv2((5, 3, 48, 2), (5, 3, 48, 1)),
              _mv2((3, 3, 96, 2), (3, 3, 96, 1)), _mv2((5, 4, 160, 2)), _mv2((3, 6, 192, 2))),
        channels=(16, 24, 48, 96, 160, 192), depths=(3, 3), key_dims=(16, 24), emb_dims=(160, 192), num_heads=6,
        mlp_ratios=(2, 4), head_in_channels=(48, 160, 192), head_embed_dims=(96, 128), head_channels=128,
    ),
    "seaformer-b": SeaFormerConfig(
        cfgs=(_mv2((3, 1, 16, 1), (3, 4, 32, 2), (3, 3, 32, 1)), _mv2((5, 3, 64, 2), (5, 3, 64, 1)),
              _mv2((3, 3, 128, 2), (3, 3, 128, 1)), _mv2((5, 4, 192, 2)), _mv2((3, 6, 256, 2))),
        channels=(16, 32, 64, 128, 192, 256), depths=(4, 4), key_dims=(16, 24), emb_dims=(192, 256), num_heads=8,
        mlp_ratios=(2, 4), head_in_channels=(64, 192, 256), head_embed_dims=(128, 160), head_channels=160,
    ),
    "seaformer-l": SeaFormerConfig(
        cfgs=(_mv2((3, 3, 32, 1), (3, 4, 64, 2), (3, 4, 64, 1)), _mv2((5, 4, 128, 2), (5, 4, 128, 1)),
              _mv2((3, 4, 192, 2), (3, 4, 192, 1)), _mv2((5, 4, 256, 2)), _mv2((3, 6, 320, 2))),
        channels=(32, 64, 128, 192, 256, 320), depths=(3, 3, 3), key_dims=(16, 20, 24), emb_dims=(192, 256, 320),
        num_heads=8, mlp_ratios=(2, 4, 6), head_in_channels=(128, 192, 256, 320), head_embed_dims=(128, 160, 192),
        head_channels=192,
    ),
}

# Test pipelines of the official configs (all normalize with ImageNet's mean/std, RGB, the DatasetInfo default):
# - ADE20K (`_base_/datasets/ade20k.py`): keep-ratio Resize into (2048, 512), then ResizeToMultiple(32) (a
#   second bilinear resize up to multiples of 32), whole-image inference.
# - Cityscapes "f" (`seaformer_{small,base}_1024x1024_160k_1x8city.py`): keep-ratio Resize into (2048, 1024), no
#   alignment, and `test_cfg=dict(mode='whole')` from the model config: whole-image, not sliding-window.
PIPELINES = {
    "ade20k": {"resize_scale": (2048, 512), "align_to": 32, "test_mode": "whole"},
    "cityscapes": {"resize_scale": (2048, 1024), "align_to": None, "test_mode": "whole", "slide_crop": None,
                   "slide_stride": None},
}
# Any size runs (logits ceil(H/8) x ceil(W/8)), so parity also covers sizes that are not multiples of 8 or 32.
PARITY_SIZES = ((1, 512, 512), (1, 384, 640), (1, 201, 333), (2, 250, 250))


def _spec(name: str, miou: dict[str, float], gmacs_512: float, description: str) -> ModelSpec:
    return ModelSpec(
        name=name, family="seaformer", output_stride=8, knob=None,
        checkpoint=CheckpointRules("decode_head.conv_seg.weight"),  # conv_seg is the classifier: nothing unused
        published_miou=miou, pipelines=PIPELINES, reference_gmacs_512=gmacs_512, parity_sizes=PARITY_SIZES,
        description=description,
    )


# Single-scale val mIoU from the official seaformer-seg/README.md (read at 9718d05; not re-measured here):
# ADE20K from the 8x4 (batch-32) rows, whose checkpoints are the released ones (the top-level README rounds
# S to 39.4); Cityscapes from the "f" rows (1024x1024 crops, tested at 2048x1024), released for S and B only.
# GMACs at 512x512 with 150 classes, through the head without the final resize: spec section 6.
SEAFORMER_T = _spec("seaformer-t", {"ade20k": 36.5}, 0.563,
                    "SeaFormer-T: MV2 16-160, SEA layers at strides 32/64 (dims 128/160, 4 heads, depth 2), head 96")
SEAFORMER_S = _spec("seaformer-s", {"ade20k": 39.5, "cityscapes": 76.4}, 1.031,
                    "SeaFormer-S: MV2 16-192, SEA layers at strides 32/64 (dims 160/192, 6 heads, depth 3), head 128")
SEAFORMER_B = _spec("seaformer-b", {"ade20k": 41.9, "cityscapes": 77.7}, 1.758,
                    "SeaFormer-B: MV2 16-256, SEA layers at strides 32/64 (dims 192/256, 8 heads, depth 4), head 160")
SEAFORMER_L = _spec("seaformer-l", {"ade20k": 43.8}, 6.340,
                    "SeaFormer-L: MV2 32-320, SEA layers at strides 16/32/64 (dims 192/256/320, 8 heads, depth 3), "
                    "head 192")


def _build(spec: ModelSpec, num_classes: int) -> SeaFormer:
    return SeaFormer(CONFIGS[spec.name], num_classes, ModelMeta(name=spec.name, num_classes=num_classes), spec)


@register_model(SEAFORMER_T)
def seaformer_t(num_classes: int = 150) -> SeaFormer:
    return _build(SEAFORMER_T, num_classes)


@register_model(SEAFORMER_S)
def seaformer_s(num_classes: int = 150) -> SeaFormer:
    return _build(SEAFORMER_S, num_classes)


@register_model(SEAFORMER_B)
def seaformer_b(num_classes: int = 150) -> SeaFormer:
    return _build(SEAFORMER_B, num_classes)


@register_model(SEAFORMER_L)
def seaformer_l(num_classes: int = 150) -> SeaFormer:
    return _build(SEAFORMER_L, num_classes)
