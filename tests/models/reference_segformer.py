"""An independent, deliberately literal SegFormer (+ ISR) forward, written from the spec pseudocode.

Source: /work/shared/specs/segformer.md §1.2-1.7 (MiT encoder, all-MLP head) and §2.1 (ISR: a floor-mode
AvgPool2d(p, p) on the sr-reduced, LayerNormed K/V tokens, before the kv Linear, only where sr > 1). This
module never imports `models`: it reads weights straight from a state dict in the NVlabs mmseg naming and
uses only `torch.nn.functional` ops and the explicit softmax(q k^T * d**-0.5) v, so that the parity tests
compare two separate implementations rather than one with itself.

    logits = reference_forward(state_dict, images, pool_ratios=(2, 2, 1, 1))

Also: `mmseg_to_hf` (spec §3.3, the HF conversion script's mapping, re-stated) and `randomize_`.
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

NUM_HEADS = (1, 2, 5, 8)  # §1.1, every variant
SR_RATIOS = (8, 4, 2, 1)
BLOCK_EPS = 1e-6  # §1.4 block norm1/norm2 and §1.3 stage-end norms
DEFAULT_EPS = 1e-5  # §1.2 patch-embed norm, §1.5 attn.norm, BatchNorm



def attention(x: torch.Tensor, height: int, width: int, sd: StateDict, name: str, heads: int, sr: int,
              pool: int) -> torch.Tensor:
    """§1.5 efficient self-attention with §2.1's ISR pool."""
    batch, n, channels = x.shape
    d = channels // heads
    q = linear(x, sd, name + ".q").reshape(batch, n, heads, d).permute(0, 2, 1, 3)
    if sr > 1:
        y = F.conv2d(tokens_to_grid(x, height, width), sd[name + ".sr.weight"], sd[name + ".sr.bias"], stride=sr)
        reduced_h, reduced_w = y.shape[-2:]
        y = layer_norm(grid_to_tokens(y), sd, name + ".norm", DEFAULT_EPS)
        if pool > 1:  # nn.AvgPool2d(p, p): kernel = stride = p, no padding, floor mode
            y = F.avg_pool2d(tokens_to_grid(y, reduced_h, reduced_w), kernel_size=pool, stride=pool, padding=0,
                             ceil_mode=False)
            y = grid_to_tokens(y)
    else:  # stage 4: no sr, no norm, no pool whatever ISR says
        y = x
    kv = linear(y, sd, name + ".kv")  # (B, N', 2C): K then V
    k = kv[..., :channels].reshape(batch, -1, heads, d).permute(0, 2, 1, 3)
    v = kv[..., channels:].reshape(batch, -1, heads, d).permute(0, 2, 1, 3)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * d**-0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(batch, n, channels)
    return linear(out, sd, name + ".proj")


def mix_ffn(x: torch.Tensor, height: int, width: int, sd: StateDict, name: str) -> torch.Tensor:
    """§1.6: fc1 -> depthwise 3x3 -> GELU (erf) -> fc2; no ReLU."""
    x = linear(x, sd, name + ".fc1")
    hidden = x.shape[-1]
    grid = F.conv2d(tokens_to_grid(x, height, width), sd[name + ".dwconv.dwconv.weight"],
                    sd[name + ".dwconv.dwconv.bias"], stride=1, padding=1, groups=hidden)
    return linear(F.gelu(grid_to_tokens(grid)), sd, name + ".fc2")


def encoder(images: torch.Tensor, sd: StateDict, pool_ratios: tuple[int, ...]) -> list[torch.Tensor]:
    """§1.2-1.4: four stages, each returned NCHW after its stage-end LayerNorm."""
    features = []
    x = images
    for stage in range(1, 5):
        kernel, stride = (7, 4) if stage == 1 else (3, 2)
        prefix = f"backbone.patch_embed{stage}"
        x = F.conv2d(x, sd[prefix + ".proj.weight"], sd[prefix + ".proj.bias"], stride=stride, padding=kernel // 2)
        height, width = x.shape[-2:]
        tokens = layer_norm(grid_to_tokens(x), sd, prefix + ".norm", DEFAULT_EPS)
        j = 0
        while f"backbone.block{stage}.{j}.norm1.weight" in sd:
            name = f"backbone.block{stage}.{j}"
            tokens = tokens + attention(layer_norm(tokens, sd, name + ".norm1", BLOCK_EPS), height, width, sd,
                                        name + ".attn", NUM_HEADS[stage - 1], SR_RATIOS[stage - 1],
                                        pool_ratios[stage - 1])
            tokens = tokens + mix_ffn(layer_norm(tokens, sd, name + ".norm2", BLOCK_EPS), height, width, sd,
                                      name + ".mlp")
            j += 1
        x = tokens_to_grid(layer_norm(tokens, sd, f"backbone.norm{stage}", BLOCK_EPS), height, width)
        features.append(x)
    return features


def head(features: list[torch.Tensor], sd: StateDict) -> torch.Tensor:
    """§1.7: linear_c{i} on tokens, resize c2..c4 to c1 (bilinear, align_corners False), concat c4, c3, c2, c1."""
    size = features[0].shape[-2:]
    parts = []
    for index in (4, 3, 2, 1):
        feature = features[index - 1]
        tokens = linear(grid_to_tokens(feature), sd, f"decode_head.linear_c{index}.proj")
        projected = tokens_to_grid(tokens, *feature.shape[-2:])
        if index != 1:
            projected = F.interpolate(projected, size=size, mode="bilinear", align_corners=False)
        parts.append(projected)
    y = F.conv2d(torch.cat(parts, dim=1), sd["decode_head.linear_fuse.conv.weight"])  # no bias
    prefix = "decode_head.linear_fuse.bn."
    y = F.batch_norm(y, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                     sd[prefix + "bias"], training=False, eps=DEFAULT_EPS)
    y = F.relu(y)  # Dropout2d(0.1) is the identity at inference
    return F.conv2d(y, sd["decode_head.linear_pred.weight"], sd["decode_head.linear_pred.bias"])


@torch.no_grad()
def reference_forward(sd: StateDict, images: torch.Tensor,
                      pool_ratios: tuple[int, int, int, int] = (1, 1, 1, 1)) -> torch.Tensor:
    """Logits (B, K, ceil(H/4), ceil(W/4)) for normalized `images` (B, 3, H, W) at ISR `pool_ratios`."""
    return head(encoder(images, sd, tuple(pool_ratios)), sd)


def mmseg_to_hf(sd: StateDict) -> StateDict:
    """§3.3: NVlabs mmseg names -> HF transformers legacy (4.x, hub-file) names; kv split into key/value."""
    out: StateDict = {}
    for key, tensor in sd.items():
        if key.startswith("decode_head.conv_seg."):
            continue  # HF has no conv_seg
        new = key
        for stage in range(1, 5):
            embed = f"segformer.encoder.patch_embeddings.{stage - 1}."
            new = new.replace(f"backbone.patch_embed{stage}.norm.", embed + "layer_norm.")
            new = new.replace(f"backbone.patch_embed{stage}.", embed)
            new = new.replace(f"backbone.block{stage}.", f"segformer.encoder.block.{stage - 1}.")
            new = new.replace(f"backbone.norm{stage}.", f"segformer.encoder.layer_norm.{stage - 1}.")
            new = new.replace(f"decode_head.linear_c{stage}.", f"decode_head.linear_c.{stage - 1}.")
        for old, replacement in ((".norm1.", ".layer_norm_1."), (".norm2.", ".layer_norm_2."),
                                 (".attn.q.", ".attention.self.query."), (".attn.proj.", ".attention.output.dense."),
                                 (".attn.sr.", ".attention.self.sr."), (".attn.norm.", ".attention.self.layer_norm."),
                                 (".mlp.fc1.", ".mlp.dense1."), (".mlp.fc2.", ".mlp.dense2."),
                                 ("decode_head.linear_fuse.conv.", "decode_head.linear_fuse."),
                                 ("decode_head.linear_fuse.bn.", "decode_head.batch_norm."),
                                 ("decode_head.linear_pred.", "decode_head.classifier.")):
            new = new.replace(old, replacement)
        if ".attn.kv." in new:
            half = tensor.shape[0] // 2
            out[new.replace(".attn.kv.", ".attention.self.key.")] = tensor[:half].clone()
            out[new.replace(".attn.kv.", ".attention.self.value.")] = tensor[half:].clone()
        else:
            out[new] = tensor
    return out


randomize_ = perturb_weights_  # the recipe the other references share
