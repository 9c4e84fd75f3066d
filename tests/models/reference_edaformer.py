"""An independent, deliberately literal EDAFormer forward, written from the spec pseudocode.

Source: /work/shared/specs/edaformer.md (§1.2-1.6 encoder, §2 decoder). This module never imports
`models` (in particular not `models.layers` or `models.edaformer`): it reads weights straight from a state
dict in the official naming and uses only `torch.nn.functional` ops, an explicit softmax(q k^T * d^-0.5) v
and fixed-kernel floor-mode average pooling, so that the parity tests compare two separate
implementations rather than one with itself.

    logits = reference_forward(state_dict, images, encoder_ratios=(2, 2, 1, 1), decoder_ratios=(2, 2, 2))

Also holds `randomize_`, a test helper that makes every affine/bias/BatchNorm tensor non-trivial.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.models.reference_ops import (
    StateDict,
    grid_to_tokens,
    layer_norm,
    linear,
    perturb_weights_,
    tokens_to_grid,
)

# §1.1: heads per encoder stage (head dim 32 for T, 64 for B); training pooling ratios (§1.6).
ENCODER_HEADS = (1, 2, 4, 8)
ENCODER_POOLING = (8, 4, 2, 1)
# §2.1: decoder branches and their heads.
C4_BLOCKS, C4_HEADS = ("attn4", "attn44", "attn444"), 8
C3_BLOCKS, C3_HEADS = ("attn3", "attn33"), 4
C2_BLOCKS, C2_HEADS = ("attn2",), 2

ENCODER_EPS = 1e-6  # block norm1/norm2 and the final stage norms
DEFAULT_EPS = 1e-5  # patch-embed norms, every decoder LayerNorm, BatchNorm



def embedding_free_attention(
    x: torch.Tensor, height: int, width: int, sd: StateDict, name: str, heads: int, pool: int, decoder: bool
) -> torch.Tensor:
    """§1.5 (encoder) and §2.1 (decoder: LayerNorm eps 1e-5 + GELU on the pooled K/V)."""
    batch, n, channels = x.shape
    d = channels // heads
    q = x.reshape(batch, n, heads, d).permute(0, 2, 1, 3)  # (B, h, N, d), no projection
    kv = tokens_to_grid(x, height, width)
    # nn.AvgPool2d(r, r): kernel = stride = r, no padding, floor mode; applied even when r == 1.
    kv = F.avg_pool2d(kv, kernel_size=pool, stride=pool, padding=0, ceil_mode=False)
    kv = F.conv2d(kv, sd[name + ".sr.weight"], sd[name + ".sr.bias"])  # 1x1 conv, with bias
    kv = grid_to_tokens(kv)  # (B, N', C)
    if decoder:
        kv = F.gelu(layer_norm(kv, sd, name + ".norm", DEFAULT_EPS))
    n_kv = kv.shape[1]
    kv = kv.reshape(batch, n_kv, heads, d).permute(0, 2, 1, 3)
    k = v = kv
    attn = torch.softmax((q @ k.transpose(-2, -1)) * d**-0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(batch, n, channels)
    return linear(out, sd, name + ".proj")


def mix_ffn(x: torch.Tensor, height: int, width: int, sd: StateDict, name: str, decoder: bool) -> torch.Tensor:
    """Encoder: fc1 -> ReLU -> dwconv -> GELU -> fc2. Decoder: fc1 -> dwconv -> GELU -> fc2."""
    x = linear(x, sd, name + ".fc1")
    if not decoder:
        x = F.relu(x)
    hidden = x.shape[-1]
    grid = tokens_to_grid(x, height, width)
    grid = F.conv2d(
        grid, sd[name + ".dwconv.dwconv.weight"], sd[name + ".dwconv.dwconv.bias"], stride=1, padding=1, groups=hidden
    )
    x = F.gelu(grid_to_tokens(grid))  # exact (erf) GELU
    return linear(x, sd, name + ".fc2")


def block(
    x: torch.Tensor, height: int, width: int, sd: StateDict, name: str, heads: int, pool: int, decoder: bool
) -> torch.Tensor:
    """Pre-norm residual block (§1.4; decoder variant §2.1)."""
    eps = DEFAULT_EPS if decoder else ENCODER_EPS
    x = x + embedding_free_attention(
        layer_norm(x, sd, name + ".norm1", eps), height, width, sd, name + ".attn", heads, pool, decoder
    )
    x = x + mix_ffn(layer_norm(x, sd, name + ".norm2", eps), height, width, sd, name + ".mlp", decoder)
    return x


def patch_embed(x: torch.Tensor, sd: StateDict, name: str, kernel: int, stride: int) -> tuple[torch.Tensor, int, int]:
    """§1.2: Conv2d(k, s, p=k//2, bias) then LayerNorm (default eps 1e-5) on the tokens."""
    x = F.conv2d(x, sd[name + ".proj.weight"], sd[name + ".proj.bias"], stride=stride, padding=kernel // 2)
    height, width = x.shape[-2:]
    return layer_norm(grid_to_tokens(x), sd, name + ".norm", DEFAULT_EPS), height, width


def encoder(images: torch.Tensor, sd: StateDict, encoder_ratios: tuple[int, ...]) -> list[torch.Tensor]:
    """§1.3: four stages; each returns NCHW after its final LayerNorm (eps 1e-6)."""
    pools = [base * ratio for base, ratio in zip(ENCODER_POOLING, encoder_ratios, strict=True)]
    features = []
    x = images
    for stage in range(1, 5):
        kernel, stride = (7, 4) if stage == 1 else (3, 2)
        tokens, height, width = patch_embed(x, sd, f"backbone.patch_embed{stage}", kernel, stride)
        j = 0
        while f"backbone.block{stage}.{j}.norm1.weight" in sd:
            tokens = block(
                tokens,
                height,
                width,
                sd,
                f"backbone.block{stage}.{j}",
                ENCODER_HEADS[stage - 1],
                pools[stage - 1],
                decoder=False,
            )
            j += 1
        tokens = layer_norm(tokens, sd, f"backbone.norm{stage}", ENCODER_EPS)
        x = tokens_to_grid(tokens, height, width)
        features.append(x)
    return features


def decoder(features: list[torch.Tensor], sd: StateDict, decoder_ratios: tuple[int, ...]) -> torch.Tensor:
    """§2.2: branches on c4 (3 blocks), c3 (2) and c2 (1); concat [c4, c3, c2]; fuse; predict."""
    a, b, c = decoder_ratios
    pool2, pool3, pool4 = 4 * a, 2 * b, 1 * c
    c2, c3, c4 = features[1], features[2], features[3]
    h2, w2 = c2.shape[-2:]

    def branch(feature: torch.Tensor, names: tuple[str, ...], heads: int, pool: int) -> torch.Tensor:
        _, _, height, width = feature.shape
        tokens = grid_to_tokens(feature)
        for name in names:
            tokens = block(tokens, height, width, sd, f"decode_head.{name}", heads, pool, decoder=True)
        return tokens_to_grid(tokens, height, width)

    u4 = F.interpolate(branch(c4, C4_BLOCKS, C4_HEADS, pool4), size=(h2, w2), mode="bilinear", align_corners=False)
    u3 = F.interpolate(branch(c3, C3_BLOCKS, C3_HEADS, pool3), size=(h2, w2), mode="bilinear", align_corners=False)
    u2 = branch(c2, C2_BLOCKS, C2_HEADS, pool2)
    y = torch.cat([u4, u3, u2], dim=1)
    y = F.conv2d(y, sd["decode_head.linear_fuse.conv.weight"])  # no bias
    y = F.batch_norm(
        y,
        sd["decode_head.linear_fuse.bn.running_mean"],
        sd["decode_head.linear_fuse.bn.running_var"],
        sd["decode_head.linear_fuse.bn.weight"],
        sd["decode_head.linear_fuse.bn.bias"],
        training=False,
        eps=DEFAULT_EPS,
    )
    y = F.relu(y)
    # Dropout2d(0.1) is the identity at inference.
    return F.conv2d(y, sd["decode_head.linear_pred.weight"], sd["decode_head.linear_pred.bias"])


@torch.no_grad()
def reference_forward(
    sd: StateDict,
    images: torch.Tensor,
    encoder_ratios: tuple[int, int, int, int] = (1, 1, 1, 1),
    decoder_ratios: tuple[int, int, int] = (1, 1, 1),
) -> torch.Tensor:
    """Logits at stride 8 for normalized `images` (B, 3, H, W), with the official ISR ratios."""
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    return decoder(encoder(images, sd, tuple(encoder_ratios)), sd, tuple(decoder_ratios))


randomize_ = perturb_weights_  # the recipe the other references share
