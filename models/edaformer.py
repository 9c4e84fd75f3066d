"""EDAFormer (Yu et al., ECCV 2024): the EFT encoder, the all-attention decoder, and the model.

Module and parameter names follow the official mmseg checkpoints (`backbone.block1.0.attn.sr.weight`,
`decode_head.attn444.mlp.fc2.bias`, ...), so official state dicts load strictly. The ISR setting is an
argument of `forward`, never module state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelMeta, SegmentationModel
from models.checkpoint import MMSEG_CONV_SEG
from models.isr import EDAFORMER_ISR, IsrConfig
from models.layers import EmbeddingFreeAttention, MixFFN, OverlapPatchEmbed
from models.layers.conv import ConvBnRelu
from models.layers.stages import run_stages
from models.registry import register_model
from models.spec import CheckpointRules, ModelSpec


class EftBlock(nn.Module):
    """Pre-norm block: x + EFA(LN(x)); x + MixFFN(LN(x)).

    The encoder uses LayerNorm eps 1e-6, a ReLU after fc1 and no K/V norm; the decoder uses eps 1e-5,
    no ReLU, and LayerNorm + GELU on the pooled K/V.
    """

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, *, decoder: bool, fused: bool) -> None:
        super().__init__()
        eps = 1e-5 if decoder else 1e-6
        # Registration order matches upstream state_dict order: norm1, (decoder: norm2,) attn, norm2, mlp.
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        if decoder:
            self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn = EmbeddingFreeAttention(dim, num_heads, kv_norm=decoder, fused=fused)
        if not decoder:
            self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MixFFN(dim, hidden_dim, relu_after_fc1=not decoder)

    def forward(self, x: torch.Tensor, height: int, width: int, pool_ratio: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), height, width, pool_ratio)
        return x + self.mlp(self.norm2(x), height, width)


class EftEncoder(nn.Module):
    """Embedding-Free Transformer: a 4-stage pyramid at strides 4, 8, 16, 32."""

    def __init__(
        self,
        dims: tuple[int, int, int, int],
        depths: tuple[int, int, int, int],
        num_heads: tuple[int, int, int, int],
        mlp_ratio: float,
        *,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.dims = dims
        in_channels = 3
        for stage, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads, strict=True), start=1):
            kernel, stride = (7, 4) if stage == 1 else (3, 2)
            setattr(self, f"patch_embed{stage}", OverlapPatchEmbed(in_channels, dim, kernel, stride))
            hidden = int(dim * mlp_ratio)  # int(32 * 3.8) = 121, as upstream
            blocks = [EftBlock(dim, heads, hidden, decoder=False, fused=fused) for _ in range(depth)]
            setattr(self, f"block{stage}", nn.ModuleList(blocks))
            setattr(self, f"norm{stage}", nn.LayerNorm(dim, eps=1e-6))
            in_channels = dim

    def forward(self, images: torch.Tensor, pools: tuple[int, ...]) -> list[torch.Tensor]:
        """images: (B, 3, H, W) -> 4 feature maps (B, C_i, ceil(H/s_i), ceil(W/s_i))."""
        return run_stages(self, images, pools)



class EdaFormerHead(nn.Module):
    """All-attention decoder over stages 2-4; logits at stride 8.

    Branches: 3 blocks on c4 (8 heads), 2 on c3 (4 heads), 1 on c2 (2 heads); both coarser branches
    are resized bilinearly to c2's size, concatenated in the order [c4, c3, c2], fused and classified.
    """

    def __init__(
        self, in_dims: tuple[int, int, int], embed_dim: int, mlp_ratio: float, num_classes: int,
        *, fused: bool = True,
    ) -> None:
        super().__init__()
        c2, c3, c4 = in_dims

        def block(dim: int, heads: int) -> EftBlock:
            return EftBlock(dim, heads, int(dim * mlp_ratio), decoder=True, fused=fused)

        # Registration order of upstream (attn4, attn44, attn444, attn3, attn33, attn2) keeps
        # state_dict order identical to the official listing.
        self.attn4, self.attn44, self.attn444 = block(c4, 8), block(c4, 8), block(c4, 8)
        self.attn3, self.attn33 = block(c3, 4), block(c3, 4)
        self.attn2 = block(c2, 2)
        self.linear_fuse = ConvBnRelu(c2 + c3 + c4, embed_dim)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    @staticmethod
    def _run(blocks: list[EftBlock], feature: torch.Tensor, pool: int) -> torch.Tensor:
        B, C, height, width = feature.shape
        tokens = feature.flatten(2).transpose(1, 2)  # B, N, C
        for blk in blocks:
            tokens = blk(tokens, height, width, pool)
        return tokens.transpose(1, 2).reshape(B, C, height, width)

    def forward(self, features: list[torch.Tensor], pools: tuple[int, ...]) -> torch.Tensor:
        """features: encoder outputs; pools: (stage-2, stage-3, stage-4) branch pools."""
        c2, c3, c4 = features[1], features[2], features[3]
        size = c2.shape[-2:]
        pool2, pool3, pool4 = pools
        out4 = self._run([self.attn4, self.attn44, self.attn444], c4, pool4)
        out4 = F.interpolate(out4, size=size, mode="bilinear", align_corners=False)
        out3 = self._run([self.attn3, self.attn33], c3, pool3)
        out3 = F.interpolate(out3, size=size, mode="bilinear", align_corners=False)
        out2 = self._run([self.attn2], c2, pool2)
        fused = self.linear_fuse(torch.cat([out4, out3, out2], dim=1))
        return self.linear_pred(fused)  # B, K, H/8, W/8 (Dropout2d is identity at inference)


class EdaFormer(SegmentationModel):
    """EDAFormer: `logits = model(images, isr=IsrConfig(...))`.

    images: normalized float (B, 3, H, W). logits: (B, num_classes, ceil(H/8), ceil(W/8)), the decode
    head's output before any resize.
    """

    def __init__(self, backbone: EftEncoder, decode_head: EdaFormerHead, meta: ModelMeta, spec: ModelSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.meta = meta
        self.spec = spec

    def forward(self, images: torch.Tensor, isr: IsrConfig | None = None) -> torch.Tensor:
        isr = isr or IsrConfig()
        features = self.backbone(images, isr.encoder_pools)
        return self.decode_head(features, isr.decoder_pools)

    def set_fused_attention(self, fused: bool) -> EdaFormer:
        """Choose SDPA (default) or the explicit softmax form, once, e.g. before an export."""
        for module in self.modules():
            if isinstance(module, EmbeddingFreeAttention):
                module.fused = fused
        return self


def _spec(name: str, miou: dict[str, float], gmacs_512: float, description: str) -> ModelSpec:
    return ModelSpec(
        name=name, family="edaformer", output_stride=8, knob=EDAFORMER_ISR,
        # mmseg's BaseDecodeHead creates `conv_seg` (128 input channels), which EDAFormerHead never uses.
        checkpoint=CheckpointRules("decode_head.linear_pred.weight", (MMSEG_CONV_SEG,), unused_in_channels=128),
        published_miou=miou, reference_gmacs_512=gmacs_512, description=description,
    )


# ADE20K single-scale mIoU as believed in specs/edaformer.md section 4 (not confirmed against the paper's
# tables): a prior for the planner, never an acceptance target.
EDAFORMER_T = _spec("edaformer-t", {"ade20k": 42.3}, 5.59,
                    "EDAFormer-T: EFT-T encoder (dims 32-256, depths 2-2-10-2, MLP 3.8), decoder embed 128, MLP 2")
EDAFORMER_B = _spec("edaformer-b", {"ade20k": 49.0}, 31.82,
                    "EDAFormer-B: EFT-B encoder (dims 64-512, depths 3-3-22-3, MLP 4), decoder embed 768, MLP 1")


def _build(
    spec: ModelSpec, num_classes: int, dims: tuple[int, int, int, int], depths: tuple[int, int, int, int],
    encoder_mlp_ratio: float, decoder_embed_dim: int, decoder_mlp_ratio: float, fused: bool,
) -> EdaFormer:
    backbone = EftEncoder(dims, depths, num_heads=(1, 2, 4, 8), mlp_ratio=encoder_mlp_ratio, fused=fused)
    head = EdaFormerHead(dims[1:], decoder_embed_dim, decoder_mlp_ratio, num_classes, fused=fused)
    return EdaFormer(backbone, head, ModelMeta(name=spec.name, num_classes=num_classes), spec)


@register_model(EDAFORMER_T)
def edaformer_t(num_classes: int = 150, fused_attention: bool = True) -> EdaFormer:
    return _build(EDAFORMER_T, num_classes, (32, 64, 128, 256), (2, 2, 10, 2), 3.8, 128, 2.0, fused_attention)


@register_model(EDAFORMER_B)
def edaformer_b(num_classes: int = 150, fused_attention: bool = True) -> EdaFormer:
    return _build(EDAFORMER_B, num_classes, (64, 128, 256, 512), (3, 3, 22, 3), 4.0, 768, 1.0, fused_attention)
