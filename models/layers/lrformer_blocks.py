"""LRFormer's building blocks: the LRSA block of the backbone and the fuse block of the LRHead.

Parameter names follow the official checkpoints (`block1.0.attn.q.0.weight`, `fuse_block1.attn.kv.weight`,
...). The tensor layouts of the official forward are kept on purpose (tokens (B, N, C) in the backbone, reshaped
to NCHW views for the convolutions; NCHW in the head), so that the arithmetic matches it to the last bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.lrformer_pooling import GridPool

LAYER_SCALE_INIT = 1e-6


def _depthwise(dim: int) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v; (B, heads, N, d) each, M keys -> (B, N, heads * d)."""
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    out = attn @ v
    B, heads, N, d = out.shape
    return out.transpose(1, 2).reshape(B, N, heads * d)


class InvertedResidual(nn.Module):
    """IRB: fc2(h + dw3x3(h)) with h = GELU(fc1(x)); 1x1 convs, all with bias, no activation after the DW conv."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, kernel_size=1)
        self.conv = _depthwise(hidden)
        self.fc2 = nn.Conv2d(hidden, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = F.gelu(self.fc1(x))
        return self.fc2(x + self.conv(x))


class LowResolutionAttention(nn.Module):
    """LRSA of the backbone: queries from the map pooled by `q_pool`, keys/values from the pooled pyramid.

    Every pyramid level is refined by the stage's shared depthwise conv (`d_convs`), flattened, concatenated
    and LayerNorm'ed (eps 1e-5); the attention output at the query grid is upsampled bilinearly to (H, W).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Sequential(nn.Linear(dim, dim))  # "attn.q.0"
        self.kv = nn.Sequential(nn.Linear(dim, 2 * dim))  # "attn.kv.0"; rows [K; V]
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, height: int, width: int, d_convs: nn.ModuleList, q_pool: GridPool,
        kv_pools: list[GridPool],
    ) -> torch.Tensor:
        """x: (B, N, C) tokens of an (height, width) grid -> (B, N, C)."""
        B, N, C = x.shape
        heads, d = self.num_heads, C // self.num_heads
        grid = x.transpose(1, 2).reshape(B, C, height, width)
        q = self.q(q_pool(grid).flatten(2).transpose(1, 2))
        q = q.reshape(B, -1, heads, d).permute(0, 2, 1, 3).contiguous()  # B, heads, Nq, d
        levels = []
        for pool, d_conv in zip(kv_pools, d_convs, strict=True):
            level = pool(grid)
            levels.append((level + d_conv(level)).flatten(2))
        tokens = self.norm(torch.cat(levels, dim=2).permute(0, 2, 1))  # B, M, C
        kv = self.kv(tokens).reshape(B, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
        out = self.proj(_attend(q, kv[0], kv[1], self.scale))  # B, Nq, C
        out = out.transpose(1, 2).reshape(B, C, q_pool.out_height, q_pool.out_width)
        out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
        return out.flatten(2).transpose(1, 2)


class LrsaBlock(nn.Module):
    """Backbone block: x + cpe(x); x + ls1 * LRSA(LN(x)); x + ls2 * IRB(LN(x)); layer scale in stages 3-4 only."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale: bool) -> None:
        super().__init__()
        if layer_scale:  # registered first: the official state dict lists them first
            self.layer_scale_1 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
            self.layer_scale_2 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.layer_scale = layer_scale
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = LowResolutionAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = InvertedResidual(dim, int(dim * mlp_ratio))
        self.cpe = _depthwise(dim)

    def forward(
        self, x: torch.Tensor, height: int, width: int, d_convs: nn.ModuleList, q_pool: GridPool,
        kv_pools: list[GridPool],
    ) -> torch.Tensor:
        """x: (B, N, C) tokens of an (height, width) grid -> (B, N, C); the pools are planned for that grid."""
        B, N, C = x.shape
        grid = x.permute(0, 2, 1).reshape(B, C, height, width)
        x = (self.cpe(grid) + grid).reshape(B, C, -1).permute(0, 2, 1)
        attn = self.attn(self.norm1(x), height, width, d_convs, q_pool, kv_pools)
        if self.layer_scale:
            attn = self.layer_scale_1.view(1, 1, -1) * attn
        x = x + attn
        hidden = self.norm2(x).permute(0, 2, 1).reshape(B, C, height, width)
        mlp = self.mlp(hidden).reshape(B, C, -1).permute(0, 2, 1)
        if self.layer_scale:
            mlp = self.layer_scale_2.view(1, 1, -1) * mlp
        return x + mlp


class HeadAttention(nn.Module):
    """LRSA of the LRHead on NCHW maps: a 1x1-conv query projection, a Linear K/V, no d_convs."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Conv2d(dim, dim, kernel_size=1)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, q_pool: GridPool, kv_pools: list[GridPool]) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        heads, d = self.num_heads, C // self.num_heads
        q = self.q(q_pool(x)).reshape(B, heads, d, -1).permute(0, 1, 3, 2).contiguous()  # B, heads, Nq, d
        levels = [pool(x).reshape(B, C, -1) for pool in kv_pools]
        tokens = self.norm(torch.cat(levels, dim=2).permute(0, 2, 1))  # B, M, C
        kv = self.kv(tokens).reshape(B, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
        out = self.proj(_attend(q, kv[0], kv[1], self.scale))  # B, Nq, C
        out = out.transpose(1, 2).reshape(B, C, q_pool.out_height, q_pool.out_width)
        return F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)


class FuseBlock(nn.Module):
    """LRHead block on NCHW maps: BatchNorm norms, layer scale, the head's LRSA and an IRB."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = HeadAttention(dim, num_heads)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = InvertedResidual(dim, int(dim * mlp_ratio))
        self.cpe = _depthwise(dim)

    def forward(self, x: torch.Tensor, q_pool: GridPool, kv_pools: list[GridPool]) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W); the pools are planned for that (H, W)."""
        x = self.cpe(x) + x
        x = x + self.layer_scale_1.view(1, -1, 1, 1) * self.attn(self.norm1(x), q_pool, kv_pools)
        return x + self.layer_scale_2.view(1, -1, 1, 1) * self.mlp(self.norm2(x))

