"""Embedding-free attention (EFA), the attention of EDAFormer's encoder and decoder.

EFA has no query/key/value projections: the query is the (normalized) tokens themselves, and key and
value are one tensor, `Conv1x1(AvgPool_r(x))`. The pooling ratio `r` is an argument of `forward`, not
module state: that is Inference Spatial Reduction (ISR). One set of weights serves every ratio, and
calls with different ratios from several threads at once are safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingFreeAttention(nn.Module):
    """Multi-head EFA over tokens laid out as a (H, W) grid.

    Args:
        dim: channels C of the tokens.
        num_heads: heads h; the head dim is C / h.
        kv_norm: the decoder variant, which applies LayerNorm (eps 1e-5) and GELU to the pooled K/V.
        fused: use `F.scaled_dot_product_attention` (same default scale 1/sqrt(d)) instead of the
            explicit softmax(q k^T / sqrt(d)) v. Both compute the same function.
    """

    def __init__(self, dim: int, num_heads: int, *, kv_norm: bool = False, fused: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        # Names and registration order follow the official checkpoints: `proj` (output Linear),
        # `sr` (1x1 conv on the pooled K/V), then the decoder's `norm`.
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim) if kv_norm else None

    def forward(self, x: torch.Tensor, height: int, width: int, pool_ratio: int) -> torch.Tensor:
        """x: (B, N=H*W, C) tokens -> (B, N, C)."""
        B, N, C = x.shape
        q = x.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # B, h, N, d

        grid = x.transpose(1, 2).reshape(B, C, height, width)  # B, C, H, W
        # Fixed kernel = stride = r, floor mode: trailing rows/columns that do not fill a window are
        # dropped, exactly as nn.AvgPool2d(r, r) upstream. Never adaptive pooling (different windows).
        if pool_ratio > 1:
            grid = F.avg_pool2d(grid, kernel_size=pool_ratio, stride=pool_ratio)
        kv = self.sr(grid).flatten(2).transpose(1, 2)  # B, N', C
        if self.norm is not None:
            kv = F.gelu(self.norm(kv))
        # contiguous(): the fused CPU attention kernel needs a dense last dim, else it falls back to math.
        kv = kv.reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2).contiguous()  # B, h, N', d; k = v

        if self.fused:
            out = F.scaled_dot_product_attention(q, kv, kv)
        else:
            attn = (q @ kv.transpose(-2, -1)) * self.scale
            out = attn.softmax(dim=-1) @ kv
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out)
