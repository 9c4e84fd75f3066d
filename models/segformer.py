"""SegFormer B0-B5 (Xie et al., NeurIPS 2021): the MiT encoder and the all-MLP head, with ISR on the encoder.

Spec: /work/shared/specs/segformer.md. Module and parameter names follow the NVlabs mmseg checkpoints
(`backbone.block1.0.attn.kv.weight`, `decode_head.linear_fuse.bn.running_var`, ...), so official files load
strictly; Hugging Face `nvidia/segformer-*` files are converted on load (`models.segformer_checkpoint`).

Inference Spatial Reduction (EDAFormer, ECCV 2024, applied to SegFormer as in its `mix_transformer.py`):
`model(images, isr=IsrConfig(encoder=(a, b, c, d)))` adds a fixed-kernel floor `avg_pool2d(p, p)` on the
sr-reduced, LayerNormed key/value tokens, before the kv Linear, in the stages whose sr ratio is > 1. Stage 4
(sr 1) is never pooled, so `d` has no effect; the all-MLP head has no attention, so the decoder ratios must
stay 1. The setting is an argument of `forward`, never module state; no weights change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelMeta, SegmentationModel
from models.checkpoint import MMSEG_CONV_SEG
from models.isr import IsrConfig, IsrKnob
from models.layers import MixFFN, OverlapPatchEmbed
from models.layers.conv import ConvBnRelu
from models.layers.stages import run_stages
from models.registry import register_model
from models.segformer_checkpoint import convert_segformer_state_dict
from models.spec import CheckpointRules, ModelSpec

NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
STAGE_STRIDES = (4, 8, 16, 32)
MLP_RATIO = 4


class EfficientSelfAttention(nn.Module):
    """Spatial-reduction attention: q from every token, K/V from a strided conv + LayerNorm of the grid.

    Args:
        dim: channels C of the tokens; heads split C into chunks of C / num_heads.
        num_heads: heads h.
        sr_ratio: kernel = stride of the K/V conv `sr`; 1 (stage 4) means no `sr`/`norm` modules at all.
        fused: `F.scaled_dot_product_attention` (same default scale d**-0.5) instead of the explicit
            softmax(q k^T * d**-0.5) v of the official code. Both compute the same function.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, *, fused: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.fused = fused
        # Registration order of upstream: q, kv, proj, then sr and norm (only where sr_ratio > 1).
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # rows 0:C are K, C:2C are V
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # default eps 1e-5, unlike the blocks' 1e-6

    def forward(self, x: torch.Tensor, height: int, width: int, pool_ratio: int = 1) -> torch.Tensor:
        """x: (B, N=H*W, C) tokens -> (B, N, C). `pool_ratio` is ISR's extra K/V pooling (ignored at sr 1)."""
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)  # B, h, N, d
        kv_tokens = x
        if self.sr_ratio > 1:
            grid = self.sr(x.permute(0, 2, 1).reshape(B, C, height, width))  # B, C, floor(H/sr), floor(W/sr)
            _, _, reduced_h, reduced_w = grid.shape
            kv_tokens = self.norm(grid.reshape(B, C, -1).permute(0, 2, 1))  # B, N', C
            if pool_ratio > 1:
                # ISR: nn.AvgPool2d(p, p) upstream, i.e. a fixed kernel, floor mode (a trailing row or column
                # that does not fill a window is dropped). Never adaptive pooling: other windows, and a kernel
                # that an ONNX export would freeze at the example's size.
                grid = kv_tokens.permute(0, 2, 1).reshape(B, C, reduced_h, reduced_w)
                grid = F.avg_pool2d(grid, kernel_size=pool_ratio, stride=pool_ratio)
                kv_tokens = grid.reshape(B, C, -1).permute(0, 2, 1)  # B, N'', C
        kv = self.kv(kv_tokens).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # B, h, N', d each
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class MixTransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)); x + MixFFN(LN(x)), both LayerNorms with eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, *, fused: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, fused=fused)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * MLP_RATIO, relu_after_fc1=False)  # fc1 -> dwconv -> GELU (erf) -> fc2

    def forward(self, x: torch.Tensor, height: int, width: int, pool_ratio: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), height, width, pool_ratio)
        return x + self.mlp(self.norm2(x), height, width)


class MixVisionTransformer(nn.Module):
    """MiT encoder: 4 stages at strides 4, 8, 16, 32, each patch embed -> blocks -> LayerNorm (eps 1e-6)."""

    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], *, fused: bool = True) -> None:
        super().__init__()
        # Upstream registers the four patch embeddings first, then block1, norm1, block2, norm2, ...
        in_channels = 3
        for stage, dim in enumerate(dims, start=1):
            kernel, stride = (7, 4) if stage == 1 else (3, 2)
            setattr(self, f"patch_embed{stage}", OverlapPatchEmbed(in_channels, dim, kernel, stride))
            in_channels = dim
        for stage, (dim, depth) in enumerate(zip(dims, depths, strict=True), start=1):
            heads, sr_ratio = NUM_HEADS[stage - 1], SR_RATIOS[stage - 1]
            blocks = [MixTransformerBlock(dim, heads, sr_ratio, fused=fused) for _ in range(depth)]
            setattr(self, f"block{stage}", nn.ModuleList(blocks))
            setattr(self, f"norm{stage}", nn.LayerNorm(dim, eps=1e-6))

    def forward(self, images: torch.Tensor, pool_ratios: tuple[int, ...]) -> list[torch.Tensor]:
        """images: (B, 3, H, W) -> 4 feature maps (B, C_i, ceil(H/s_i), ceil(W/s_i)), s_i = 4, 8, 16, 32."""
        return run_stages(self, images, pool_ratios)


class TokenLinear(nn.Module):
    """The head's per-stage `MLP`: flatten to tokens, Linear(C_i, E), back to (B, E, H, W)."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).permute(0, 2, 1).reshape(B, -1, H, W)



class SegFormerHead(nn.Module):
    """All-MLP head: every stage to E channels, resized to c1's grid, concatenated c4, c3, c2, c1, fused."""

    def __init__(self, in_dims: tuple[int, ...], embed_dim: int, num_classes: int) -> None:
        super().__init__()
        c1, c2, c3, c4 = in_dims
        # Registration order of upstream: c4 first (mmseg's unused conv_seg would precede them).
        self.linear_c4 = TokenLinear(c4, embed_dim)
        self.linear_c3 = TokenLinear(c3, embed_dim)
        self.linear_c2 = TokenLinear(c2, embed_dim)
        self.linear_c1 = TokenLinear(c1, embed_dim)
        self.linear_fuse = ConvBnRelu(4 * embed_dim, embed_dim)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: c1..c4 -> logits (B, K, ceil(H/4), ceil(W/4))."""
        c1, c2, c3, c4 = features
        size = c1.shape[-2:]

        def upsampled(linear: TokenLinear, feature: torch.Tensor) -> torch.Tensor:
            return F.interpolate(linear(feature), size=size, mode="bilinear", align_corners=False)

        parts = [upsampled(self.linear_c4, c4), upsampled(self.linear_c3, c3), upsampled(self.linear_c2, c2)]
        fused = self.linear_fuse(torch.cat([*parts, self.linear_c1(c1)], dim=1))  # c1 is not resized
        return self.linear_pred(fused)  # Dropout2d(0.1) is the identity at inference


class SegFormer(SegmentationModel):
    """SegFormer: `logits = model(images, isr=IsrConfig(encoder=(2, 2, 1, 1)))`.

    images: normalized float (B, 3, H, W), H and W >= 29 (more with ISR: `SEGFORMER_ISR.fits`).
    logits: (B, num_classes, ceil(H/4), ceil(W/4)), the decode head's output before any resize.
    """

    def __init__(self, backbone: MixVisionTransformer, decode_head: SegFormerHead, meta: ModelMeta,
                 spec: ModelSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.meta = meta
        self.spec = spec

    def forward(self, images: torch.Tensor, isr: IsrConfig | None = None) -> torch.Tensor:
        isr = isr or IsrConfig()
        if isr.decoder != (1, 1, 1):
            raise ValueError(f"SegFormer's head has no attention: ISR decoder ratios must be 111, got {isr.code}")
        return self.decode_head(self.backbone(images, isr.encoder))

    def set_fused_attention(self, fused: bool) -> SegFormer:
        """Choose SDPA (default) or the explicit softmax of the official code, once, e.g. before an export."""
        for module in self.modules():
            if isinstance(module, EfficientSelfAttention):
                module.fused = fused
        return self


def kv_tokens_remain(isr: IsrConfig, height: int, width: int) -> bool:
    """Whether every stage keeps >= 1 K/V token: stage grids are ceil(side / stride); the sr conv floors by
    sr, the ISR pool floors by p, so a stage with sr > 1 needs a grid side >= sr * p. Stage 4 (sr 1) is never
    pooled. Minimum square inputs: 29 (1111), 61 (2111, 2211, 2221), 125 (4421)."""
    for stride, sr_ratio, pool in zip(STAGE_STRIDES, SR_RATIOS, isr.encoder, strict=True):
        need = sr_ratio * pool if sr_ratio > 1 else 1
        if math.ceil(height / stride) < need or math.ceil(width / stride) < need:
            return False
    return True


# Best first, each strictly cheaper than the one before in GMACs at 512x512 and 1024x2048 for every variant
# (spec §2.4; B0 at 1024x2048: 120.96, 2111, 82.27, 74.06, 64.39). 2211 is what EDAFormer's repo hard-codes for
# B2-B5; 2221 adds stage 3; 4421 is the cheapest setting the spec measured.
SEGFORMER_ISR = IsrKnob(["1111", "2111", "2211", "2221", "4421"], fits=kv_tokens_remain, encoder_only=True)

_CHECKPOINT = CheckpointRules(
    "decode_head.linear_pred.weight",
    # mmseg's BaseDecodeHead creates `conv_seg` (128 input channels), which SegFormerHead never uses.
    (MMSEG_CONV_SEG,),
    convert=convert_segformer_state_dict,
    unused_in_channels=128,
)
_ADE_COCO = {"resize_scale": (2048, 512), "align_to": 32, "test_mode": "whole"}
_CITYSCAPES = {"resize_scale": (2048, 1024), "align_to": None, "test_mode": "slide",
               "slide_crop": (1024, 1024), "slide_stride": (768, 768)}
_PIPELINES = {"ade20k": _ADE_COCO, "coco-stuff": _ADE_COCO, "cityscapes": _CITYSCAPES}
# NVlabs B5 ADE20K config: 640x640 crops, test scale (2048, 640) with AlignedResize.
_PIPELINES_B5 = {**_PIPELINES, "ade20k": {**_ADE_COCO, "resize_scale": (2048, 640)}}
_MIT_SMALL, _MIT_LARGE = (32, 64, 160, 256), (64, 128, 320, 512)


def _spec(name: str, miou: dict[str, float], gmacs_512: float, description: str, pipelines: dict) -> ModelSpec:
    return ModelSpec(
        name=name, family="segformer", output_stride=4, knob=SEGFORMER_ISR, checkpoint=_CHECKPOINT,
        published_miou=miou, pipelines=pipelines, reference_gmacs_512=gmacs_512,
        # Any side >= 29 runs (>= 125 at 4421): odd, non-square and not multiples of 32 are all fine.
        parity_sizes=((1, 512, 512), (1, 387, 641), (1, 200, 328), (2, 256, 256)),
        description=description,
    )


# Single-scale mIoU (spec §4.1, SegFormer paper Table 1/2 as cross-checked there). Only ADE20K B0 37.4
# (paperswithcode) and B4 50.3 (the abstract) are confirmed by a second source; every other figure comes from one
# third-party summary that agrees with the spec author's recollection (unverified). B5's ADE20K figure is at 640.
# GMACs at 512x512 with 150 classes: spec §2.4 (torch count on the official module tree).
SEGFORMER_B0 = _spec("segformer-b0", {"ade20k": 37.4, "cityscapes": 76.2}, 8.388,
                     "SegFormer-B0: MiT-B0 (dims 32-256, depths 2-2-2-2), all-MLP head E=256", _PIPELINES)
SEGFORMER_B1 = _spec("segformer-b1", {"ade20k": 42.2, "cityscapes": 78.5}, 15.878,
                     "SegFormer-B1: MiT-B1 (dims 64-512, depths 2-2-2-2), all-MLP head E=256", _PIPELINES)
SEGFORMER_B2 = _spec("segformer-b2", {"ade20k": 46.5, "cityscapes": 81.0}, 62.338,
                     "SegFormer-B2: MiT-B2 (dims 64-512, depths 3-4-6-3), all-MLP head E=768", _PIPELINES)
SEGFORMER_B3 = _spec("segformer-b3", {"ade20k": 49.4, "cityscapes": 81.7}, 78.963,
                     "SegFormer-B3: MiT-B3 (dims 64-512, depths 3-4-18-3), all-MLP head E=768", _PIPELINES)
SEGFORMER_B4 = _spec("segformer-b4", {"ade20k": 50.3, "cityscapes": 82.3}, 95.567,
                     "SegFormer-B4: MiT-B4 (dims 64-512, depths 3-8-27-3), all-MLP head E=768", _PIPELINES)
SEGFORMER_B5 = _spec("segformer-b5", {"ade20k": 51.0, "cityscapes": 82.4}, 111.510,
                     "SegFormer-B5: MiT-B5 (dims 64-512, depths 3-6-40-3), all-MLP head E=768; ADE20K at 640",
                     _PIPELINES_B5)


def _build(spec: ModelSpec, num_classes: int, dims: tuple[int, ...], depths: tuple[int, ...], embed_dim: int,
           fused: bool) -> SegFormer:
    backbone = MixVisionTransformer(dims, depths, fused=fused)
    head = SegFormerHead(dims, embed_dim, num_classes)
    return SegFormer(backbone, head, ModelMeta(name=spec.name, num_classes=num_classes), spec)


@register_model(SEGFORMER_B0)
def segformer_b0(num_classes: int = 150, fused_attention: bool = True) -> SegFormer:
    return _build(SEGFORMER_B0, num_classes, _MIT_SMALL, (2, 2, 2, 2), 256, fused_attention)


@register_model(SEGFORMER_B1)
def segformer_b1(num_classes: int = 150, fused_attention: bool = True) -> SegFormer:
    return _build(SEGFORMER_B1, num_classes, _MIT_LARGE, (2, 2, 2, 2), 256, fused_attention)


@register_model(SEGFORMER_B2)
def segformer_b2(num_classes: int = 150, fused_attention: bool = True) -> SegFormer:
    return _build(SEGFORMER_B2, num_classes, _MIT_LARGE, (3, 4, 6, 3), 768, fused_attention)


@register_model(SEGFORMER_B3)
def segformer_b3(num_classes: int = 150, fused_attention: bool = True) -> SegFormer:
    return _build(SEGFORMER_B3, num_classes, _MIT_LARGE, (3, 4, 18, 3), 768, fused_attention)


@register_model(SEGFORMER_B4)
def segformer_b4(num_classes: int = 150, fused_attention: bool = True) -> SegFormer:
    return _build(SEGFORMER_B4, num_classes, _MIT_LARGE, (3, 8, 27, 3), 768, fused_attention)


@register_model(SEGFORMER_B5)
def segformer_b5(num_classes: int = 150, fused_attention: bool = True) -> SegFormer:
    return _build(SEGFORMER_B5, num_classes, _MIT_LARGE, (3, 6, 40, 3), 768, fused_attention)
