"""Building blocks of DoViT: the ViT encoder layer, the FCN auxiliary heads and the Segmenter mask head.

Names follow the official mmseg 0.x checkpoints (FLHonker/DoViT-code `DoViT`, mmseg `FCNHead` and
`SegmenterMaskTransformerHead`):

- backbone layer: `ln1`, `attn.qkv` (timm-style fused Linear, rows [q; k; v]), `attn.proj`, `ln2`,
  `ffn.layers.0.0` / `ffn.layers.1` (mmcv FFN: Linear -> GELU -> Linear);
- head layer: the same, but the attention is mmcv's `MultiheadAttention`, i.e. `attn.attn.in_proj_weight`,
  `attn.attn.in_proj_bias`, `attn.attn.out_proj` (PyTorch `nn.MultiheadAttention` naming, also [q; k; v]).

Attention takes an optional additive key bias `(B, 1, 1, N)` (0 for real tokens, -inf for padding), which is
how DoViT runs a batch whose images keep different numbers of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.conv import ConvBnRelu


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None, fused: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + key_bias) v for (B, h, N, d) tensors; SDPA when `fused`, else explicit."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if key_bias is not None:
        scores = scores + key_bias
    return scores.softmax(dim=-1) @ v


class TokenAttention(nn.Module):
    """The backbone's multi-head self-attention: one fused `qkv` Linear (with bias) and `proj`."""

    def __init__(self, dim: int, num_heads: int, *, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attend(qkv[0], qkv[1], qkv[2], key_bias, self.fused)  # B, h, N, d
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _PackedProjections(nn.Module):
    """Holds `in_proj_weight`, `in_proj_bias` and `out_proj` under nn.MultiheadAttention's names."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)


class HeadAttention(nn.Module):
    """The Segmenter head's attention (mmcv MultiheadAttention, batch first), as plain tensor ops."""

    def __init__(self, dim: int, num_heads: int, *, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.fused = fused
        self.attn = _PackedProjections(dim)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attend(qkv[0], qkv[1], qkv[2], key_bias, self.fused)
        return self.attn.out_proj(out.transpose(1, 2).reshape(B, N, C))


class Ffn(nn.Module):
    """mmcv FFN with num_fcs=2: `layers.0.0` Linear(C, hidden) -> GELU (erf) -> `layers.1` Linear(hidden, C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU()), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(ln1(x)); x + ffn(ln2(x)). Drop path and dropout are inference no-ops.

    Args:
        packed_attention: the head's mmcv MultiheadAttention naming (`attn.attn.in_proj_*`) instead of the
            backbone's fused `attn.qkv`.
        eps: LayerNorm eps (backbone 1e-6 from the Segmenter config; head 1e-5, the LN default).
    """

    def __init__(self, dim: int, num_heads: int, *, eps: float, packed_attention: bool, fused: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        attention = HeadAttention if packed_attention else TokenAttention
        self.attn = attention(dim, num_heads, fused=fused)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.ffn = Ffn(dim, 4 * dim)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), key_bias)
        return x + self.ffn(self.ln2(x))



class FcnAuxHead(nn.Module):
    """mmseg FCNHead as the DoViT configs set it: num_convs=1, kernel 1, no concat, dropout 0.

    (B, C, h, w) token map -> (B, K, h, w) logits on the token grid. `conv_seg` is registered first, as
    mmseg's BaseDecodeHead does, so the state dict order matches the official one.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.convs = nn.Sequential(ConvBnRelu(in_channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.convs(x))


class SegmenterMaskHead(nn.Module):
    """Segmenter's mask transformer (mmseg `SegmenterMaskTransformerHead`, 2 layers, LN eps 1e-5).

    Patch tokens (B, C, h, w) -> masks (B, K, h, w) at stride 16: dec_proj, append the K class embeddings,
    2 layers, decoder_norm, project patches and classes (no bias), L2-normalize both (a plain division by the
    norm, as mmseg), patches @ classes^T, then `mask_norm` (LayerNorm over K).
    """

    def __init__(self, dim: int, num_heads: int, num_classes: int, *, num_layers: int = 2, fused: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        nn.init.trunc_normal_(self.cls_emb, std=0.02)
        self.layers = nn.ModuleList(
            EncoderLayer(dim, num_heads, eps=1e-5, packed_attention=True, fused=fused) for _ in range(num_layers)
        )
        self.dec_proj = nn.Linear(dim, dim)
        self.patch_proj = nn.Linear(dim, dim, bias=False)
        self.classes_proj = nn.Linear(dim, dim, bias=False)
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        x = self.dec_proj(x.permute(0, 2, 3, 1).reshape(B, h * w, C))
        x = torch.cat([x, self.cls_emb.expand(B, -1, -1)], dim=1)
        for layer in self.layers:
            x = layer(x)
        x = self.decoder_norm(x)
        K = self.num_classes
        patches = self.patch_proj(x[:, :-K])
        classes = self.classes_proj(x[:, -K:])
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # B, h*w, K
        return masks.permute(0, 2, 1).reshape(B, K, h, w)
