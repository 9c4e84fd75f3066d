"""SeaFormer building blocks: MobileNetV2 stacks and the squeeze-enhanced axial (SEA) transformer layer.

Module and parameter names follow the official mmseg checkpoints (fudan-zvg/SeaFormer,
`seaformer-seg/mmseg/models/backbones/seaformer.py`): a conv + BatchNorm pair is an `nn.Sequential` with
children `c` and `bn`; MV2 blocks hold their layers in `conv.{0,2,4}`; activations sit at the even
indices of `proj*` so the convs are `proj.1`, `proj_encode_row.1`, ... . Everything is NCHW; BatchNorm is
the only normalization (eps 1e-5) and runs in eval mode at inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The positional tables are this long whatever the input size; they are resized to each axis at run time.
POS_EMBED_LENGTH = 16


def h_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """ReLU6(x + 3) / 6, written as upstream does (not F.hardsigmoid) so the arithmetic is the same."""
    return F.relu6(x + 3) / 6


class ConvBN(nn.Sequential):
    """Upstream `Conv2d_BN`: a bias-free conv (`c`) and a BatchNorm (`bn`), no activation.

    `bn_weight_init` is upstream's initial BN scale (0 for the attention's output projections, so a fresh
    block starts as the identity); checkpoints overwrite it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                                       groups=groups, bias=False))
        bn = nn.BatchNorm2d(out_channels)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0.0)
        self.add_module("bn", bn)


class InvertedResidual(nn.Module):
    """MobileNetV2 block, cfg row [k, t, c, s]: [1x1 ConvBN + ReLU if t != 1] -> kxk depthwise ConvBN(s) +
    ReLU -> 1x1 ConvBN; a residual only when s == 1 and the channels do not change."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = round(in_channels * expand)
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [ConvBN(in_channels, hidden), nn.ReLU()]
        layers += [
            ConvBN(hidden, hidden, kernel_size, stride, groups=hidden), nn.ReLU(),
            ConvBN(hidden, out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class StackedMV2Block(nn.Module):
    """`smb{i}`: optional stem (3x3 s2 ConvBN + ReLU, `stem_block`) then `layer1..layerN` MV2 blocks."""

    def __init__(self, cfgs: Sequence[Sequence[int]], in_channels: int, *, stem: bool) -> None:
        super().__init__()
        if stem:
            self.stem_block = nn.Sequential(ConvBN(3, in_channels, 3, 2), nn.ReLU())
        self.num_layers = len(cfgs)
        for index, (kernel, expand, out_channels, stride) in enumerate(cfgs, start=1):
            # Upstream rounds channels with _make_divisible(c, 8); every released c is a multiple of 8.
            if out_channels % 8:
                raise ValueError(f"MV2 output channels must be multiples of 8, got {out_channels}")
            self.add_module(f"layer{index}", InvertedResidual(in_channels, out_channels, kernel, stride, expand))
            in_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "stem_block"):
            x = self.stem_block(x)
        for index in range(1, self.num_layers + 1):
            x = getattr(self, f"layer{index}")(x)
        return x


class SqueezeAxialPositionalEmbedding(nn.Module):
    """A learnable (1, C, 16) table, linearly resized (align_corners=False) to the sequence length and added.

    The target length comes from the input's shape at run time, so an exported graph resizes the table for
    every input size (never a length frozen at the export example).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, dim, POS_EMBED_LENGTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, N) -> (B, C, N)."""
        return x + F.interpolate(self.pos_embed, size=x.shape[-1], mode="linear", align_corners=False)


class SeaAttention(nn.Module):
    """Squeeze-enhanced axial attention on (B, C, H, W).

    q, k (heads x key_dim channels) and v (heads x 2 key_dim) are 1x1 ConvBN projections. A detail branch
    (depthwise 3x3 ConvBN + ReLU6 + 1x1 ConvBN over cat[q, k, v]) keeps full resolution; the context branch
    averages q/k/v over W (rows, length H) and over H (columns, length W), attends along each axis with
    positional tables on q and k, and broadcasts both results back over the grid onto v. The context gates
    the detail: h_sigmoid(proj(v + rows + columns)) * detail.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: int = 2) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        qk_channels = key_dim * num_heads
        self.v_channels = v_channels = int(attn_ratio * key_dim) * num_heads
        # Registration order matches the official state_dict order.
        self.to_q = ConvBN(dim, qk_channels)
        self.to_k = ConvBN(dim, qk_channels)
        self.to_v = ConvBN(dim, v_channels)
        self.proj = nn.Sequential(nn.ReLU6(), ConvBN(v_channels, dim, bn_weight_init=0.0))
        self.proj_encode_row = nn.Sequential(nn.ReLU6(), ConvBN(v_channels, v_channels, bn_weight_init=0.0))
        self.pos_emb_rowq = SqueezeAxialPositionalEmbedding(qk_channels)
        self.pos_emb_rowk = SqueezeAxialPositionalEmbedding(qk_channels)
        self.proj_encode_column = nn.Sequential(nn.ReLU6(), ConvBN(v_channels, v_channels, bn_weight_init=0.0))
        self.pos_emb_columnq = SqueezeAxialPositionalEmbedding(qk_channels)
        self.pos_emb_columnk = SqueezeAxialPositionalEmbedding(qk_channels)
        # Upstream sizes the detail conv 2 * v_channels; that equals 2 * qk + v only because attn_ratio == 2.
        detail_channels = 2 * v_channels
        if detail_channels != 2 * qk_channels + v_channels:
            raise ValueError("SeaFormer's detail branch assumes attn_ratio == 2")
        self.dwconv = ConvBN(detail_channels, detail_channels, 3, groups=detail_channels)
        self.pwconv = ConvBN(detail_channels, dim)

    def _axial(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention along one axis. q, k: (B, C_qk, L); v: (B, C_v, L) -> (B, C_v, L)."""
        B, _, L = q.shape
        q = q.reshape(B, self.num_heads, -1, L).permute(0, 1, 3, 2)  # B, h, L, d
        k = k.reshape(B, self.num_heads, -1, L)  # B, h, d, L
        v = v.reshape(B, self.num_heads, -1, L).permute(0, 1, 3, 2)  # B, h, L, d_v
        attn = (torch.matmul(q, k) * self.scale).softmax(dim=-1)
        return torch.matmul(attn, v).permute(0, 1, 3, 2).reshape(B, self.v_channels, L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        detail = self.pwconv(F.relu6(self.dwconv(torch.cat([q, k, v], dim=1))))

        rows = self._axial(self.pos_emb_rowq(q.mean(-1)), self.pos_emb_rowk(k.mean(-1)), v.mean(-1))
        rows = self.proj_encode_row(rows.reshape(B, self.v_channels, H, 1))
        columns = self._axial(self.pos_emb_columnq(q.mean(-2)), self.pos_emb_columnk(k.mean(-2)), v.mean(-2))
        columns = self.proj_encode_column(columns.reshape(B, self.v_channels, 1, W))

        context = v.add(rows.add(columns))  # upstream's order of the two additions
        return h_sigmoid(self.proj(context)) * detail


class SeaMlp(nn.Module):
    """1x1 ConvBN (C -> rC) -> depthwise 3x3 conv with bias (no BN) -> ReLU6 -> 1x1 ConvBN (rC -> C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = ConvBN(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=True)
        self.fc2 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu6(self.dwconv(self.fc1(x))))


class SeaFormerBlock(nn.Module):
    """x + SeaAttention(x); x + Mlp(x). No LayerNorm; DropPath is the identity at inference."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.attn = SeaAttention(dim, key_dim, num_heads)
        self.mlp = SeaMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class SeaFormerLayer(nn.Module):
    """Upstream `BasicLayer` (`trans{i}`): `transformer_blocks.{n}` applied in turn, shape-preserving."""

    def __init__(self, depth: int, dim: int, key_dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(
            SeaFormerBlock(dim, key_dim, num_heads, mlp_ratio) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            x = block(x)
        return x
