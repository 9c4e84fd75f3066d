"""An independent, deliberately literal LRFormer forward, written from the spec.

Source: /work/shared/specs/lrformer.md (§1.1 backbone, §1.2 LRSA, §1.3 LRHead, §6 verified details). This
module never imports `models`: it reads weights straight from a state dict in the official naming and uses
only `torch.nn.functional` ops, NCHW maps throughout (LayerNorm over the channel axis), pooled sizes computed
with Python's `round(x + 0.001)` as the official code does, and `F.adaptive_avg_pool2d` directly.

    logits = reference_forward(state_dict, images, pooled_size=16)

Also holds `randomize_`, which makes every parameter and BatchNorm statistic non-trivial while keeping the
activations' spatial structure (BatchNorm statistics measured on an input, then perturbed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.models.reference_ops import StateDict, batch_norm

BACKBONE_HEADS = (2, 4, 10, 16)  # §1.4 defaults of every variant
HEAD_HEADS = 8
HEAD_Q_SIZE = 32
BASE_PYRAMID = (11, 8, 6, 4)
BLOCK_EPS = 1e-6  # block norms, stem and patch-embed norms
ATTN_NORM_EPS = 1e-5  # LayerNorm on the pooled K/V tokens


def conv(x: torch.Tensor, sd: StateDict, name: str, stride: int = 1, depthwise: bool = False) -> torch.Tensor:
    weight = sd[name + ".weight"]
    padding = weight.shape[-1] // 2
    return F.conv2d(x, weight, sd.get(name + ".bias"), stride=stride, padding=padding,
                    groups=x.shape[1] if depthwise else 1)


def channel_norm(x: torch.Tensor, sd: StateDict, name: str, eps: float) -> torch.Tensor:
    """LayerNorm over C of an NCHW map."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), sd[name + ".weight"], sd[name + ".bias"], eps)
    return y.permute(0, 3, 1, 2)


def pooled_size(height: int, width: int, size: int) -> tuple[int, int]:
    """§1.2: the short side gets `size`, the long side round(long * size / short + 0.001)."""
    if width >= height:
        return size, round(width * float(size) / height + 0.001)
    return round(height * float(size) / width + 0.001), size


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) queries, (B, M, C) keys/values -> (B, N, C); heads split the channels in order."""
    B, N, C = q.shape
    d = C // heads
    q = q.reshape(B, N, heads, d).transpose(1, 2)
    k = k.reshape(B, -1, heads, d).transpose(1, 2)
    v = v.reshape(B, -1, heads, d).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(B, N, C)


def lrsa(x: torch.Tensor, sd: StateDict, name: str, heads: int, q_size: int, kv_sizes: list[int],
         d_convs: str | None, head: bool) -> torch.Tensor:
    """§1.2 (backbone: Linear q, shared d_convs) and §1.3 (head: 1x1-conv q, no d_convs). NCHW in and out."""
    B, C, H, W = x.shape
    q_map = F.adaptive_avg_pool2d(x, pooled_size(H, W, q_size))
    hq, wq = q_map.shape[-2:]
    if head:
        q = conv(q_map, sd, name + ".q").flatten(2).transpose(1, 2)
    else:
        q = F.linear(q_map.flatten(2).transpose(1, 2), sd[name + ".q.0.weight"], sd[name + ".q.0.bias"])
    levels = []
    for index, size in enumerate(kv_sizes):
        level = F.adaptive_avg_pool2d(x, pooled_size(H, W, size))
        if d_convs is not None:
            level = level + conv(level, sd, f"{d_convs}.{index}", depthwise=True)
        levels.append(level.flatten(2).transpose(1, 2))
    tokens = torch.cat(levels, dim=1)
    tokens = F.layer_norm(tokens, (C,), sd[name + ".norm.weight"], sd[name + ".norm.bias"], ATTN_NORM_EPS)
    kv_name = name + (".kv" if head else ".kv.0")
    kv = F.linear(tokens, sd[kv_name + ".weight"], sd[kv_name + ".bias"])
    out = attention(q, kv[..., :C], kv[..., C:], heads)
    out = F.linear(out, sd[name + ".proj.weight"], sd[name + ".proj.bias"])
    out = out.transpose(1, 2).reshape(B, C, hq, wq)
    return F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)


def irb(x: torch.Tensor, sd: StateDict, name: str) -> torch.Tensor:
    """fc2(h + dw(h)), h = GELU(fc1(x))."""
    hidden = F.gelu(conv(x, sd, name + ".fc1"))
    return conv(hidden + conv(hidden, sd, name + ".conv", depthwise=True), sd, name + ".fc2")


def layer_scale(sd: StateDict, name: str, channels: int) -> torch.Tensor:
    """(1, C, 1, 1); ones where the block has no layer scale (stages 1-2)."""
    value = sd.get(name, torch.ones(channels))
    return value.view(1, -1, 1, 1)


def backbone_block(x: torch.Tensor, sd: StateDict, name: str, heads: int, q_size: int, kv_sizes: list[int],
                   d_convs: str) -> torch.Tensor:
    C = x.shape[1]
    x = x + conv(x, sd, name + ".cpe", depthwise=True)
    attn = lrsa(channel_norm(x, sd, name + ".norm1", BLOCK_EPS), sd, name + ".attn", heads, q_size, kv_sizes,
                d_convs, head=False)
    x = x + layer_scale(sd, name + ".layer_scale_1", C) * attn
    mlp = irb(channel_norm(x, sd, name + ".norm2", BLOCK_EPS), sd, name + ".mlp")
    return x + layer_scale(sd, name + ".layer_scale_2", C) * mlp


def backbone(images: torch.Tensor, sd: StateDict, q_size: int) -> list[torch.Tensor]:
    """§1.1: stem (stride 4), then patch embeds (stride 2) and blocks; the 4 NCHW maps."""
    kv_sizes = [round(p * q_size / 16 + 0.001) for p in BASE_PYRAMID]
    stem = "backbone.patch_embed1.conv1"
    x = F.gelu(batch_norm(conv(images, sd, stem + ".0", stride=2), sd, stem + ".1"))
    x = F.gelu(batch_norm(conv(x, sd, stem + ".3"), sd, stem + ".4"))
    x = F.gelu(batch_norm(conv(x, sd, stem + ".6", stride=2), sd, stem + ".7"))
    x = channel_norm(conv(x, sd, stem + ".9"), sd, "backbone.patch_embed1.norm", BLOCK_EPS)
    features = []
    for stage in range(1, 5):
        if stage > 1:
            x = conv(x, sd, f"backbone.patch_embed{stage}.proj", stride=2)
            x = channel_norm(x, sd, f"backbone.patch_embed{stage}.norm", BLOCK_EPS)
        index = 0
        while f"backbone.block{stage}.{index}.cpe.weight" in sd:
            x = backbone_block(x, sd, f"backbone.block{stage}.{index}", BACKBONE_HEADS[stage - 1], q_size, kv_sizes,
                               f"backbone.d_convs{stage}")
            index += 1
        features.append(x)
    return features


def fuse_block(x: torch.Tensor, sd: StateDict, name: str) -> torch.Tensor:
    kv_sizes = [round(p * HEAD_Q_SIZE / 16 + 0.001) for p in BASE_PYRAMID]  # 22/16/12/8
    x = x + conv(x, sd, name + ".cpe", depthwise=True)
    attn = lrsa(batch_norm(x, sd, name + ".norm1"), sd, name + ".attn", HEAD_HEADS, HEAD_Q_SIZE, kv_sizes, None,
                head=True)
    x = x + sd[name + ".layer_scale_1"].view(1, -1, 1, 1) * attn
    mlp = irb(batch_norm(x, sd, name + ".norm2"), sd, name + ".mlp")
    return x + sd[name + ".layer_scale_2"].view(1, -1, 1, 1) * mlp


def head(features: list[torch.Tensor], sd: StateDict) -> torch.Tensor:
    """§1.3: stages 2-4 at stride 8; squeeze1; fuse1; concat stage 4; squeeze2; fuse2; conv_seg."""
    size = features[1].shape[-2:]
    inputs = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:]]
    x = F.relu(batch_norm(conv(torch.cat(inputs, 1), sd, "decode_head.squeeze1.conv"), sd, "decode_head.squeeze1.bn"))
    x = fuse_block(x, sd, "decode_head.fuse_block1")
    x = torch.cat([x, inputs[-1]], 1)
    x = F.relu(batch_norm(conv(x, sd, "decode_head.squeeze2.conv"), sd, "decode_head.squeeze2.bn"))
    x = fuse_block(x, sd, "decode_head.fuse_block2")
    return conv(x, sd, "decode_head.conv_seg")


def reference_forward(sd: StateDict, images: torch.Tensor, pooled_size: int = 16) -> torch.Tensor:
    """(B, 3, H, W) normalized images -> logits (B, K, H/8, W/8), in eval mode."""
    with torch.no_grad():
        return head(backbone(images, sd, pooled_size), sd)


def randomize_(model: nn.Module, seed: int = 0, calibration: torch.Tensor | None = None) -> nn.Module:
    """Non-trivial weights that keep spatial structure, in place.

    Layer scales (1e-6 when initialized) become O(0.5), so the attention and MLP branches matter; norms and
    biases get random affine terms. BatchNorm running statistics are measured on a calibration input (so the
    normalization neither blows up nor flattens the maps), then perturbed per channel so that they still matter.
    """
    generator = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator) * scale

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_scale" in name:
                param.copy_(0.3 + 0.4 * torch.rand(param.shape, generator=generator))
            elif param.ndim == 1 and name.endswith(".weight"):  # LayerNorm / BatchNorm scales
                param.copy_(1 + noise(param, 0.2))
            elif name.endswith(".bias"):
                param.copy_(noise(param, 0.05))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: the statistics of the calibration batch
    model.train()
    images = calibration if calibration is not None else torch.randn(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        model(images)
    model.eval()
    with torch.no_grad():
        for bn in norms:
            bn.momentum = 0.1
            bn.running_mean.add_(noise(bn.running_mean, 0.1) * bn.running_var.sqrt())
            bn.running_var.mul_(torch.exp(noise(bn.running_var, 0.2)))
    return model
