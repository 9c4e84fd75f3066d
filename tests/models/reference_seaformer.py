"""An independent, deliberately literal SeaFormer forward, written from the spec pseudocode.

Source: /work/shared/specs/seaformer.md (§1.1 layout and MV2 block, §1.2 SEA attention, §1.3 light head,
§1.4 variant table, §4 names). This module never imports `models`: it reads the weights straight from a state
dict in the official naming, uses only `torch.nn.functional` ops, and takes the variant table from the spec, so
the parity tests compare two separate implementations rather than one with itself.

    logits = reference_forward(state_dict, images, "seaformer-t")

Also holds the test helpers `randomize_` and `calibrate_batchnorm_`: random weights with random BatchNorm
statistics lose all spatial structure through SeaFormer's depth (spec §6), so tests set the running
statistics from one train-mode pass over a structured image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.models.reference_ops import StateDict, batch_norm

# Spec §1.4: per variant, the MV2 rows [k, t, c, s] of smb1..smb5, the stem width, the SEA layers as
# (dim, key_dim, depth, mlp_ratio) after the last smb stages, heads, and the head's embed dims.
VARIANTS: dict[str, dict] = {
    "seaformer-t": {
        "stem": 16,
        "smb": [[(3, 1, 16, 1), (3, 4, 16, 2), (3, 3, 16, 1)], [(5, 3, 32, 2), (5, 3, 32, 1)],
                [(3, 3, 64, 2), (3, 3, 64, 1)], [(5, 3, 128, 2)], [(3, 6, 160, 2)]],
        "sea": [(128, 16, 2, 2), (160, 24, 2, 4)], "heads": 4, "embed": [64, 96],
    },
    "seaformer-s": {
        "stem": 16,
        "smb": [[(3, 1, 16, 1), (3, 4, 24, 2), (3, 3, 24, 1)], [(5, 3, 48, 2), (5, 3, 48, 1)],
                [(3, 3, 96, 2), (3, 3, 96, 1)], [(5, 4, 160, 2)], [(3, 6, 192, 2)]],
        "sea": [(160, 16, 3, 2), (192, 24, 3, 4)], "heads": 6, "embed": [96, 128],
    },
    "seaformer-b": {
        "stem": 16,
        "smb": [[(3, 1, 16, 1), (3, 4, 32, 2), (3, 3, 32, 1)], [(5, 3, 64, 2), (5, 3, 64, 1)],
                [(3, 3, 128, 2), (3, 3, 128, 1)], [(5, 4, 192, 2)], [(3, 6, 256, 2)]],
        "sea": [(192, 16, 4, 2), (256, 24, 4, 4)], "heads": 8, "embed": [128, 160],
    },
    "seaformer-l": {
        "stem": 32,
        "smb": [[(3, 3, 32, 1), (3, 4, 64, 2), (3, 4, 64, 1)], [(5, 4, 128, 2), (5, 4, 128, 1)],
                [(3, 4, 192, 2), (3, 4, 192, 1)], [(5, 4, 256, 2)], [(3, 6, 320, 2)]],
        "sea": [(192, 16, 3, 2), (256, 20, 3, 4), (320, 24, 3, 6)], "heads": 8, "embed": [128, 160, 192],
    },
}


def conv_bn(x: torch.Tensor, sd: StateDict, name: str, stride: int = 1, depthwise: bool = False,
            conv: str = "c") -> torch.Tensor:
    """Bias-free conv (padding k // 2) + BN; `conv` is the conv's child name ("c" in the backbone, "conv" in
    the head's ConvModules)."""
    weight = sd[f"{name}.{conv}.weight"]
    groups = x.shape[1] if depthwise else 1
    x = F.conv2d(x, weight, None, stride=stride, padding=weight.shape[-1] // 2, groups=groups)
    return batch_norm(x, sd, name + ".bn")


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3) / 6


def mv2_block(x: torch.Tensor, sd: StateDict, name: str, row: tuple[int, int, int, int]) -> torch.Tensor:
    """§1.1: [1x1 ConvBN + ReLU if t != 1] -> kxk dw ConvBN(s) + ReLU -> 1x1 ConvBN; residual iff s == 1, in == out."""
    _, expand, out_channels, stride = row
    y = x
    index = 0
    if expand != 1:
        y = F.relu(conv_bn(y, sd, f"{name}.conv.{index}"))
        index += 2
    y = F.relu(conv_bn(y, sd, f"{name}.conv.{index}", stride=stride, depthwise=True))
    y = conv_bn(y, sd, f"{name}.conv.{index + 2}")
    return x + y if stride == 1 and x.shape[1] == out_channels else y


def positional(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (B, C, L) + the (1, C, 16) table resized linearly to L, align_corners=False (§1.2)."""
    return x + F.interpolate(table, size=x.shape[-1], mode="linear", align_corners=False)


def axial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, key_dim: int) -> torch.Tensor:
    """softmax(q kᵀ d_k^-0.5) v per head along one axis. q, k: (B, h·d_k, L); v: (B, h·d_v, L) -> (B, h·d_v, L)."""
    batch, _, length = q.shape
    q = q.reshape(batch, heads, key_dim, length).transpose(-2, -1)  # B, h, L, d_k
    k = k.reshape(batch, heads, key_dim, length)  # B, h, d_k, L
    v = v.reshape(batch, heads, -1, length).transpose(-2, -1)  # B, h, L, d_v
    out = torch.softmax((q @ k) * key_dim**-0.5, dim=-1) @ v
    return out.transpose(-2, -1).reshape(batch, -1, length)


def sea_attention(x: torch.Tensor, sd: StateDict, name: str, heads: int, key_dim: int) -> torch.Tensor:
    """§1.2: detail kernel D, row and column squeeze attention, out = h_sigmoid(proj(ReLU6(S))) ⊙ D."""
    batch, _, height, width = x.shape
    q, k, v = conv_bn(x, sd, name + ".to_q"), conv_bn(x, sd, name + ".to_k"), conv_bn(x, sd, name + ".to_v")
    detail = F.relu6(conv_bn(torch.cat([q, k, v], dim=1), sd, name + ".dwconv", depthwise=True))
    detail = conv_bn(detail, sd, name + ".pwconv")

    q_row = positional(q.mean(dim=3), sd[name + ".pos_emb_rowq.pos_embed"])  # mean over W: length H
    k_row = positional(k.mean(dim=3), sd[name + ".pos_emb_rowk.pos_embed"])
    rows = axial_attention(q_row, k_row, v.mean(dim=3), heads, key_dim).reshape(batch, -1, height, 1)
    rows = conv_bn(F.relu6(rows), sd, name + ".proj_encode_row.1")

    q_col = positional(q.mean(dim=2), sd[name + ".pos_emb_columnq.pos_embed"])  # mean over H: length W
    k_col = positional(k.mean(dim=2), sd[name + ".pos_emb_columnk.pos_embed"])
    cols = axial_attention(q_col, k_col, v.mean(dim=2), heads, key_dim).reshape(batch, -1, 1, width)
    cols = conv_bn(F.relu6(cols), sd, name + ".proj_encode_column.1")

    summed = v + (rows + cols)  # broadcast: rows over W, columns over H
    return hard_sigmoid(conv_bn(F.relu6(summed), sd, name + ".proj.1")) * detail


def sea_block(x: torch.Tensor, sd: StateDict, name: str, heads: int, key_dim: int) -> torch.Tensor:
    """§1.2: x + Attn(x); x + MLP(x), MLP = ConvBN(ReLU6(DWConv3x3_bias(ConvBN(x))))."""
    x = x + sea_attention(x, sd, name + ".attn", heads, key_dim)
    hidden = conv_bn(x, sd, name + ".mlp.fc1")
    hidden = F.conv2d(hidden, sd[name + ".mlp.dwconv.weight"], sd[name + ".mlp.dwconv.bias"], padding=1,
                      groups=hidden.shape[1])
    return x + conv_bn(F.relu6(hidden), sd, name + ".mlp.fc2")


def backbone(images: torch.Tensor, sd: StateDict, variant: dict) -> list[torch.Tensor]:
    """§1.1: smb1 (stem 3x3 s2 ConvBN + ReLU, cfg1) .. smb5; SEA layers after the last len(sea) stages.
    Returns [stride-8 feature, SEA layer outputs...]."""
    x = F.relu(conv_bn(images, sd, "backbone.smb1.stem_block.0", stride=2))
    outputs = []
    first_sea_stage = len(variant["smb"]) - len(variant["sea"])
    for stage, rows in enumerate(variant["smb"]):
        for j, row in enumerate(rows, start=1):
            x = mv2_block(x, sd, f"backbone.smb{stage + 1}.layer{j}", row)
        if stage == 1:
            outputs.append(x)
        if stage >= first_sea_stage:
            layer = stage - first_sea_stage
            _, key_dim, depth, _ = variant["sea"][layer]
            for n in range(depth):
                x = sea_block(x, sd, f"backbone.trans{layer + 1}.transformer_blocks.{n}", variant["heads"], key_dim)
            outputs.append(x)
    return outputs


def light_head(features: list[torch.Tensor], sd: StateDict, variant: dict) -> torch.Tensor:
    """§1.3: fusion blocks, depthwise 1x1 ConvBN + ReLU, (Dropout = identity), conv_seg."""
    x = features[0]
    for i in range(len(variant["embed"])):
        name = f"decode_head.fuse{i + 1}"
        local = conv_bn(x, sd, name + ".local_embedding", conv="conv")
        gate = hard_sigmoid(conv_bn(features[i + 1], sd, name + ".global_act", conv="conv"))
        x = local * F.interpolate(gate, size=local.shape[-2:], mode="bilinear", align_corners=False)
    x = F.relu(conv_bn(x, sd, "decode_head.linear_fuse", depthwise=True, conv="conv"))
    return F.conv2d(x, sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"])


@torch.no_grad()
def reference_forward(sd: StateDict, images: torch.Tensor, variant: str) -> torch.Tensor:
    """Logits (B, K, ceil(H/8), ceil(W/8)) for normalized `images` (B, 3, H, W)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    table = VARIANTS[variant]
    return light_head(backbone(images, sd, table), sd, table)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make every BatchNorm affine, bias and positional table non-trivial in place (upstream zero-initializes
    the attention's output-projection BN scales, which would switch the attention off); multi-dim conv
    weights keep their random initialisation."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict().items():
        if not tensor.is_floating_point() or "running_" in name:
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        if name.endswith("bn.weight"):
            tensor.copy_(0.6 + 0.8 * torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype))
        elif tensor.dim() == 1:
            tensor.copy_(0.1 * noise)
        elif name.endswith("pos_embed"):
            tensor.copy_(noise)
    return module


def structured_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Normalized-looking images with large regions (blocks of different colours, a gradient and stripes),
    so that features vary over space."""
    generator = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, height).view(height, 1)
    xs = torch.linspace(-1, 1, width).view(1, width)
    images = torch.empty(batch, 3, height, width)
    for b in range(batch):
        colours = torch.randn(4, 3, generator=generator) * 1.5
        quadrant = (ys > 0).long() * 2 + (xs > 0).long()  # H, W in {0..3}
        images[b] = colours[quadrant].permute(2, 0, 1)
        images[b, 0] += 0.8 * torch.sin(6 * xs + 3 * b).expand(height, width)
        images[b, 1] += 0.8 * ys.expand(height, width)
    return images + 0.05 * torch.randn(images.shape, generator=generator)


@torch.no_grad()
def calibrate_batchnorm_(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """Set every BatchNorm's running statistics to the batch statistics of one train-mode pass over `images`
    (momentum 1), then switch the model to eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0
    model.train()
    model(images)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()
