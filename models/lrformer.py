"""LRFormer (Wu et al., "Low-Resolution Self-Attention for Semantic Segmentation", TPAMI 2025): T, S, B, L.

A 4-stage backbone (strides 4-32) whose self-attention (LRSA) runs in a fixed low-resolution space: queries
pooled to `s` on the short side (16 when trained), keys/values from a pooled pyramid (11/8/6/4 at s = 16,
`round(p * s / 16 + 0.001)` otherwise). The LRHead fuses stages 2-4 at stride 8 with two LRSA blocks of its
own (query size 32, whatever `s`). Module and parameter names follow the official mmseg checkpoints, so they
load strictly; the official `conv_seg` is the classifier.

The knob is the backbone's pooled size, a forward keyword (`model(images, pooled_size=8)`), never module
state. Input sizes: the official backbone runs only when ceil(H/4) and ceil(W/4) are multiples of 8 (H and W
mod 32 in {0, 29, 30, 31}); other sizes raise a ValueError here (the official code crashes), and the test
pipeline resizes to multiples of 32 on every dataset.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelMeta, SegmentationModel
from models.layers.conv import ConvBnRelu
from models.layers.lrformer_blocks import FuseBlock, LrsaBlock
from models.layers.lrformer_pooling import (
    is_exporting,
    plan_pools,
    pooled_sizes,
    pyramid_sizes,
    query_and_pyramid_sizes,
)
from models.registry import register_model
from models.spec import CheckpointRules, ChoiceKnob, ModelSpec

Dims = tuple[int, int, int, int]

TRAINED_POOLED_SIZE = 16
HEAD_Q_SIZE = 32
# Stage-1 grid (ceil(H/4)) must split evenly over the three stride-2 patch embeddings that follow.
GRID_MULTIPLE = 8
POOLED_SIZE = ChoiceKnob(
    "pooled_size", TRAINED_POOLED_SIZE, (16, 12, 8), prefix="s",
    # s >= 2: at s = 1 the official code takes an un-pooled query path and pyramid sizes round to 0.
    valid=lambda value: 2 <= value <= 64,
    # One ONNX graph serves every pooled size: the sizes are derived in the graph from its scalar `knob` input.
    runtime_input=True,
)


def check_input_size(height: int, width: int) -> None:
    """ValueError unless ceil(H/4) and ceil(W/4) are multiples of 8, the sizes the official backbone runs."""
    if math.ceil(height / 4) % GRID_MULTIPLE or math.ceil(width / 4) % GRID_MULTIPLE:
        raise ValueError(
            f"LRFormer cannot take a {height}x{width} input: ceil(H/4) and ceil(W/4) must be multiples of 8 "
            "(H and W mod 32 in {0, 29, 30, 31}), as in the official backbone; resize to a multiple of 32 "
            "(the test pipeline's align_to=32)"
        )


class Stem(nn.Module):
    """Stride-4 stem: conv3x3/2-BN-GELU, conv3x3-BN-GELU, conv3x3/2-BN-GELU, conv3x3; then LayerNorm (1e-6)."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        half = out_channels // 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, out_channels, 3, 2, 1), nn.BatchNorm2d(out_channels), nn.GELU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1),
        )
        self.norm = nn.LayerNorm(out_channels, eps=1e-6)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, 3, H, W) -> tokens (B, h*w, C) of the (h, w) = (ceil(H/4), ceil(W/4)) grid."""
        x = self.conv1(images)
        B, C, height, width = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class PatchEmbed(nn.Module):
    """Stride-2 overlapping patch embedding: conv3x3/2 with bias, then LayerNorm (1e-6) on the tokens."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, C_in, H, W) -> tokens (B, h*w, C) of the (h, w) = (H/2, W/2) grid."""
        x = self.proj(x)
        B, C, height, width = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class LRFormerBackbone(nn.Module):
    """The LRFormer encoder: 4 maps (B, C_i, H/s_i, W/s_i) at strides 4, 8, 16, 32, after each stage's last
    block (no final norm). The four K/V depthwise convs of a stage (`d_convsN`) are shared by its blocks."""

    def __init__(self, dims: Dims, depths: Dims, num_heads: Dims = (2, 4, 10, 16),
                 mlp_ratios: Dims = (8, 8, 4, 4)) -> None:
        super().__init__()
        self.depths = depths
        self.patch_embed1 = Stem(dims[0])
        for stage in (2, 3, 4):
            setattr(self, f"patch_embed{stage}", PatchEmbed(dims[stage - 2], dims[stage - 1]))
        for stage, dim in enumerate(dims, start=1):
            convs = [nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim) for _ in range(4)]
            setattr(self, f"d_convs{stage}", nn.ModuleList(convs))
        for stage, (dim, depth, heads, ratio) in enumerate(zip(dims, depths, num_heads, mlp_ratios, strict=True), 1):
            blocks = [LrsaBlock(dim, heads, ratio, layer_scale=stage >= 3) for _ in range(depth)]
            setattr(self, f"block{stage}", nn.ModuleList(blocks))

    def forward(
        self, images: torch.Tensor, pooled_size: int | torch.Tensor = TRAINED_POOLED_SIZE
    ) -> list[torch.Tensor]:
        """images: (B, 3, H, W) -> [(B, C_i, H/s_i, W/s_i)] for s_i = 4, 8, 16, 32 (H, W as `check_input_size`).

        `pooled_size` is an int, or a scalar tensor while exporting (the knob as a graph input).
        """
        B, _, H, W = images.shape
        if not is_exporting():  # an exported graph keeps H, W symbolic; the pipeline aligns to 32 anyway
            check_input_size(H, W)
        features = []
        x = images
        for stage in range(1, 5):
            tokens, height, width = getattr(self, f"patch_embed{stage}")(x)
            if stage == 1:
                # Stage k's grid is the stage-1 grid halved k - 1 times, exactly (`check_input_size`): one aspect
                # ratio, so the same pooled sizes in every stage, as the official per-stage rounding gives.
                sizes = pooled_sizes(height, width, query_and_pyramid_sizes(pooled_size))
            d_convs = getattr(self, f"d_convs{stage}")
            q_pool, *kv_pools = plan_pools(height, width, sizes, tokens)  # once for all blocks of the stage
            for block in getattr(self, f"block{stage}"):
                tokens = block(tokens, height, width, d_convs, q_pool, kv_pools)
            x = tokens.reshape(B, height, width, -1).permute(0, 3, 1, 2)
            features.append(x)
        return features


class LRHead(nn.Module):
    """LRHead: stages 2-4 resized to stride 8, squeeze1, fuse_block1, concat with stage 4, squeeze2,
    fuse_block2, conv_seg. Logits at stride 8 (Dropout2d before conv_seg is the identity at inference)."""

    def __init__(self, in_dims: tuple[int, int, int], channels: int, num_classes: int,
                 num_heads: int = 8, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)  # mmseg registers it first
        self.squeeze1 = ConvBnRelu(sum(in_dims), channels)
        self.squeeze2 = ConvBnRelu(channels + in_dims[-1], channels)
        self.fuse_block1 = FuseBlock(channels, num_heads, mlp_ratio)
        self.fuse_block2 = FuseBlock(channels, num_heads, mlp_ratio)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: the backbone's 4 maps -> logits (B, K, H/8, W/8)."""
        size = features[1].shape[2:]
        # mmseg resizes every input, the stride-8 one to its own size too (an exact copy).
        inputs = [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in features[1:]]
        # q 32, K/V 22/16/12/8: the head's own sizes, whatever the backbone's knob
        sizes = pooled_sizes(size[0], size[1], (HEAD_Q_SIZE, *pyramid_sizes(HEAD_Q_SIZE)))
        q_pool, *kv_pools = plan_pools(size[0], size[1], sizes, inputs[0])
        x = self.fuse_block1(self.squeeze1(torch.cat(inputs, dim=1)), q_pool, kv_pools)
        x = self.fuse_block2(self.squeeze2(torch.cat((x, inputs[-1]), dim=1)), q_pool, kv_pools)
        return self.conv_seg(x)


class LRFormer(SegmentationModel):
    """LRFormer: `logits = model(images, pooled_size=16)`.

    images: normalized float (B, 3, H, W) with ceil(H/4) and ceil(W/4) multiples of 8. logits:
    (B, num_classes, H/8, W/8) (ceil(H/8) for the sizes mod 32 in {29, 30, 31}), before any resize.
    """

    def __init__(self, backbone: LRFormerBackbone, decode_head: LRHead, meta: ModelMeta, spec: ModelSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.meta = meta
        self.spec = spec

    def forward(self, images: torch.Tensor, pooled_size: int | torch.Tensor = TRAINED_POOLED_SIZE) -> torch.Tensor:
        """`pooled_size`: an int; a scalar tensor is accepted too (the exported graph's `knob` input)."""
        if isinstance(pooled_size, torch.Tensor) and not is_exporting():
            pooled_size = round(float(pooled_size))
        if not isinstance(pooled_size, torch.Tensor) and (
            isinstance(pooled_size, bool) or not isinstance(pooled_size, int) or pooled_size < 2
        ):
            raise ValueError(f"pooled_size must be an int >= 2, got {pooled_size!r}")
        return self.decode_head(self.backbone(images, pooled_size))


def _pipelines(scale: tuple[int, int], cityscapes_scale: tuple[int, int] = (2048, 1024)) -> dict[str, dict]:
    """AlignResize (keep-ratio resize, then resize up to multiples of 32) and whole-image inference everywhere.

    The official snapshot has ADE20K configs only (T/S/B: AlignResize (2048, 512); L: (2560, 640); whole). COCO-Stuff
    and Cityscapes follow them with the datasets' scales: the README's COCO-Stuff FLOPs for L (122 G) are those of
    512x512, and its Cityscapes FLOPs are of whole 1024x2048 images (unverified: no config was released).
    """
    whole = {"test_mode": "whole", "align_to": 32, "slide_crop": None, "slide_stride": None}
    return {
        "ade20k": {**whole, "resize_scale": scale},
        "coco-stuff": {**whole, "resize_scale": (2048, 512)},
        "cityscapes": {**whole, "resize_scale": cityscapes_scale},
    }


def _spec(
    name: str, miou: dict[str, float], gmacs_512: float, ade_scale: tuple[int, int], description: str
) -> ModelSpec:
    return ModelSpec(
        name=name, family="lrformer", output_stride=8, knob=POOLED_SIZE,
        checkpoint=CheckpointRules("decode_head.conv_seg.weight"),
        published_miou=miou, pipelines=_pipelines(ade_scale), reference_gmacs_512=gmacs_512,
        # ceil(H/4) % 8 == 0: multiples of 32, and 350x478 (mod 32 = 30) that the official backbone takes too.
        parity_sizes=((1, 256, 256), (1, 352, 480), (1, 350, 478), (2, 224, 288)),
        # The TorchScript tracer would bake the pooled sizes and pooling windows of the example into the graph.
        torchscript_export_ok=False,
        description=description,
    )


# Published single-scale mIoU (%): the official README's tables, as quoted in specs/lrformer.md §2 (ADE20K,
# COCO-Stuff, Cityscapes val); the README was read in the official snapshot, the paper PDF was not. L on ADE20K
# is the ImageNet-1K 640x640 model (52.6); the 54.2 of L† (ImageNet-22K) is another checkpoint.
# GMACs at 512x512 (150 classes): the README's FLOPs column for ADE20K (T/S/B) and for COCO-Stuff (L, whose
# ADE20K figure is at 640x640); the README rounds to whole G, and its "FLOPs" are multiply-accumulates (our MAC
# count reproduces them within 1-3%).
LRFORMER_T = _spec("lrformer-t", {"ade20k": 46.7, "coco-stuff": 43.9, "cityscapes": 80.7}, 17.0, (2048, 512),
                   "LRFormer-T: dims 48-384, depths 2-2-6-3, LRHead 256 channels")
LRFORMER_S = _spec("lrformer-s", {"ade20k": 50.0, "coco-stuff": 46.4, "cityscapes": 81.9}, 40.0, (2048, 512),
                   "LRFormer-S: dims 64-512, depths 3-3-12-3, LRHead 384 channels")
LRFORMER_B = _spec("lrformer-b", {"ade20k": 51.0, "coco-stuff": 47.2, "cityscapes": 83.0}, 75.0, (2048, 512),
                   "LRFormer-B: dims 80-512, depths 4-4-15-8, LRHead 512 channels")
LRFORMER_L = _spec("lrformer-l", {"ade20k": 52.6, "coco-stuff": 47.9, "cityscapes": 83.2}, 122.0, (2560, 640),
                   "LRFormer-L: dims 96-640, depths 4-6-18-8, LRHead 640 channels (ADE20K at 640)")


def _build(spec: ModelSpec, num_classes: int, dims: Dims, depths: Dims, channels: int) -> LRFormer:
    backbone = LRFormerBackbone(dims, depths)
    head = LRHead((dims[1], dims[2], dims[3]), channels, num_classes)
    return LRFormer(backbone, head, ModelMeta(name=spec.name, num_classes=num_classes), spec)


@register_model(LRFORMER_T)
def lrformer_t(num_classes: int = 150) -> LRFormer:
    return _build(LRFORMER_T, num_classes, (48, 96, 240, 384), (2, 2, 6, 3), 256)


@register_model(LRFORMER_S)
def lrformer_s(num_classes: int = 150) -> LRFormer:
    return _build(LRFORMER_S, num_classes, (64, 128, 320, 512), (3, 3, 12, 3), 384)


@register_model(LRFORMER_B)
def lrformer_b(num_classes: int = 150) -> LRFormer:
    return _build(LRFORMER_B, num_classes, (80, 160, 400, 512), (4, 4, 15, 8), 512)


@register_model(LRFORMER_L)
def lrformer_l(num_classes: int = 150) -> LRFormer:
    return _build(LRFORMER_L, num_classes, (96, 192, 480, 640), (4, 6, 18, 8), 640)
