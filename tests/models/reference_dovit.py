"""An independent, deliberately literal DoViT + Segmenter forward, written from the spec and the official code's
structure (FLHonker/DoViT-code `DoViT.forward`, mmseg `FCNHead`, `SegmenterMaskTransformerHead`).

Source: /work/shared/specs/dovit.md sections 1.1-1.5 and 6. This module never imports `models`: it reads the
weights from a state dict in the official naming and uses functional ops only. It follows the official
per-tap recipe step by step, one image at a time (batch size 1, where the official batch-mean kept count is
exact): avg-pooled confidence, keep mask, argsort (stable, descending: CLS first, the authors' intent per
spec section 6), gather kept and exited tokens, summary token when |exited| / |sequence| > 0.1, and the
rebuild `gather(cat[kept, exited], restore)` after EVERY block. The Segmenter head's attention is PyTorch's own
`F.multi_head_attention_forward` (what mmcv's MultiheadAttention calls), sequence first.

    logits, kept = reference_forward(state_dict, images, exit_threshold=0.96, exit_floor=None)

Also holds `randomize_`, a test helper that makes every affine/bias/BatchNorm tensor non-trivial and sharpens
the aux classifiers so that random weights are confident on some tokens (the token pass really runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.models.reference_ops import StateDict, layer_norm, perturb_weights_

PATCH = 16
TAPS = (2, 5, 8)  # out_indices[:-1] of the Segmenter DoViT configs
AGG_RATE = 0.1
BACKBONE_EPS = 1e-6  # Segmenter base config: LN eps 1e-6 in the ViT
HEAD_EPS = 1e-5  # the head's LayerNorms: mmseg default LN
BN_EPS = 1e-5


def linear(x: torch.Tensor, sd: StateDict, name: str) -> torch.Tensor:
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def ffn(x: torch.Tensor, sd: StateDict, name: str) -> torch.Tensor:
    return linear(F.gelu(linear(x, sd, name + ".layers.0.0")), sd, name + ".layers.1")


def backbone_layer(x: torch.Tensor, sd: StateDict, name: str, heads: int) -> torch.Tensor:
    """timm-style MSA as DoViT's MultiheadAttention: (q @ k^T) * scale, softmax, @ v, proj."""
    batch, n, channels = x.shape
    y = layer_norm(x, sd, name + ".ln1", BACKBONE_EPS)
    qkv = linear(y, sd, name + ".attn.qkv").reshape(batch, n, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (channels // heads) ** -0.5).softmax(dim=-1)
    x = x + linear((attn @ v).transpose(1, 2).reshape(batch, n, channels), sd, name + ".attn.proj")
    return x + ffn(layer_norm(x, sd, name + ".ln2", BACKBONE_EPS), sd, name + ".ffn")


def head_layer(x: torch.Tensor, sd: StateDict, name: str, heads: int) -> torch.Tensor:
    channels = x.shape[-1]
    y = layer_norm(x, sd, name + ".ln1", HEAD_EPS).transpose(0, 1)  # N, B, C: nn.MultiheadAttention's layout
    p = name + ".attn.attn."
    out, _ = F.multi_head_attention_forward(
        y, y, y, channels, heads, sd[p + "in_proj_weight"], sd[p + "in_proj_bias"], None, None, False, 0.0,
        sd[p + "out_proj.weight"], sd[p + "out_proj.bias"], training=False, need_weights=True,
    )
    x = x + out.transpose(0, 1)
    return x + ffn(layer_norm(x, sd, name + ".ln2", HEAD_EPS), sd, name + ".ffn")


def fcn_aux_head(x: torch.Tensor, sd: StateDict, name: str) -> torch.Tensor:
    """FCNHead(num_convs=1, kernel 1, concat_input=False, dropout 0): conv (no bias) -> BN -> ReLU -> conv_seg."""
    y = F.conv2d(x, sd[name + ".convs.0.conv.weight"])
    y = F.batch_norm(y, sd[name + ".convs.0.bn.running_mean"], sd[name + ".convs.0.bn.running_var"],
                     sd[name + ".convs.0.bn.weight"], sd[name + ".convs.0.bn.bias"], training=False, eps=BN_EPS)
    return F.conv2d(F.relu(y), sd[name + ".conv_seg.weight"], sd[name + ".conv_seg.bias"])


def position_embedding(x: torch.Tensor, sd: StateDict, hw: tuple[int, int]) -> torch.Tensor:
    """mmseg `_pos_embeding`: resize (bicubic, align_corners=False) only if the token counts differ."""
    pos = sd["backbone.pos_embed"]
    if x.shape[1] != pos.shape[1]:
        grid = round((pos.shape[1] - 1) ** 0.5)
        table = pos[:, 1:].reshape(1, grid, grid, pos.shape[2]).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=hw, align_corners=False, mode="bicubic")
        pos = torch.cat([pos[:, 0:1], torch.flatten(table, 2).transpose(1, 2)], dim=1)
    return x + pos


def segmenter_head(x: torch.Tensor, sd: StateDict, heads: int) -> torch.Tensor:
    b, c, h, w = x.shape
    num_classes = sd["decode_head.cls_emb"].shape[1]
    x = linear(x.permute(0, 2, 3, 1).contiguous().view(b, -1, c), sd, "decode_head.dec_proj")
    x = torch.cat([x, sd["decode_head.cls_emb"].expand(b, -1, -1)], dim=1)
    j = 0
    while f"decode_head.layers.{j}.ln1.weight" in sd:
        x = head_layer(x, sd, f"decode_head.layers.{j}", heads)
        j += 1
    x = layer_norm(x, sd, "decode_head.decoder_norm", HEAD_EPS)
    patches = linear(x[:, :-num_classes], sd, "decode_head.patch_proj")
    classes = linear(x[:, -num_classes:], sd, "decode_head.classes_proj")
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    masks = layer_norm(patches @ classes.transpose(1, 2), sd, "decode_head.mask_norm", HEAD_EPS)
    return masks.permute(0, 2, 1).contiguous().view(b, -1, h, w)


def single_image(image: torch.Tensor, sd: StateDict, heads: int, thresholds: list[float],
                 floor: float | None) -> tuple[torch.Tensor, list[int]]:
    """One image (1, 3, H, W) -> logits (1, K, h, w) and the kept patch-token count after each tap."""
    height, width = image.shape[-2:]
    image = F.pad(image, (0, -width % PATCH, 0, -height % PATCH))  # AdaptivePadding 'corner'
    x = F.conv2d(image, sd["backbone.patch_embed.projection.weight"], sd["backbone.patch_embed.projection.bias"],
                 stride=PATCH)
    hw = (x.shape[2], x.shape[3])
    x = x.flatten(2).transpose(1, 2)
    x = position_embedding(torch.cat([sd["backbone.cls_token"], x], dim=1), sd, hw)
    _, n_plus_1, channels = x.shape
    n = n_plus_1 - 1
    prev_decision = torch.ones(1, n, 1, dtype=x.dtype)
    ids_restore = torch.arange(n_plus_1).reshape(1, n_plus_1, 1)
    keep_tokens, exit_tokens = x, x[:, :0]
    kept: list[int] = []
    depth = 0
    while f"backbone.layers.{depth}.ln1.weight" in sd:
        depth += 1
    for i in range(depth):
        if i in TAPS:
            k = TAPS.index(i)
            grid = x[:, 1:].reshape(1, hw[0], hw[1], channels).permute(0, 3, 1, 2)
            aux = fcn_aux_head(grid, sd, f"backbone.auxiliary_head.{k}")
            ks = aux.shape[-2] // hw[0]
            prob = torch.max(torch.softmax(aux, dim=1), dim=1)[0]
            prob = F.avg_pool2d(prob.unsqueeze(1), kernel_size=ks, stride=ks).reshape(1, n, 1)
            exit_mask = prob > thresholds[k]
            if floor is not None:
                exit_mask = exit_mask | ((prob - 0) < floor)
            keep_mask = (1.0 - exit_mask.to(x.dtype)) * prev_decision
            prev_decision = keep_mask
            kept.append(int(keep_mask.sum()))
            keep_mask = torch.cat([torch.ones(1, 1, 1, dtype=x.dtype), keep_mask], dim=1)
            num_keep = int(keep_mask.sum())
            tids = torch.argsort(keep_mask, dim=1, descending=True, stable=True)
            ids_restore = torch.argsort(tids, dim=1, stable=True)
            keep_tokens = torch.gather(x, 1, tids[:, :num_keep].repeat(1, 1, channels))
            exit_tokens = torch.gather(x, 1, tids[:, num_keep:].repeat(1, 1, channels))
            if 1.0 * exit_tokens.shape[1] / x.shape[1] > AGG_RATE:
                agg = (exit_tokens.mean(1, True) + keep_tokens[:, 0:1]) * 0.5
                keep_tokens = torch.cat([agg, keep_tokens[:, 1:]], dim=1)
        keep_tokens = backbone_layer(keep_tokens, sd, f"backbone.layers.{i}", heads)
        x_ = torch.cat([keep_tokens, exit_tokens], dim=1)
        x = torch.gather(x_, 1, ids_restore.repeat(1, 1, channels))
    x = layer_norm(x, sd, "backbone.ln1", BACKBONE_EPS)
    out = x[:, 1:].reshape(1, hw[0], hw[1], channels).permute(0, 3, 1, 2)
    return segmenter_head(out, sd, heads), kept


@torch.no_grad()
def reference_forward(sd: StateDict, images: torch.Tensor, exit_threshold: float | tuple[float, ...] = 0.96,
                      exit_floor: float | None = None, heads: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, K, ceil(H/16), ceil(W/16)) and kept patch-token counts (B, 3), image by image."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if heads is None:
        heads = sd["backbone.cls_token"].shape[-1] // 64  # ViT-S and ViT-B: head dim 64
    thresholds = list(exit_threshold) if isinstance(exit_threshold, (tuple, list)) else [exit_threshold] * 3
    results = [single_image(images[b:b + 1], sd, heads, thresholds, exit_floor) for b in range(images.shape[0])]
    return torch.cat([r[0] for r in results]), torch.tensor([r[1] for r in results])


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, aux_scale: float = 1.0) -> torch.nn.Module:
    """The shared perturbation (`perturb_weights_`), then the aux heads' classifiers multiplied by `aux_scale`
    (a sharper softmax: confident tokens, so that tokens exit)."""
    perturb_weights_(module, seed)
    for name, tensor in module.state_dict().items():
        if ".auxiliary_head." in name and ".conv_seg." in name and tensor.is_floating_point():
            tensor.mul_(aux_scale)
    return module


def structured_images(batch: int, height: int, width: int, seed: int = 0, dtype: torch.dtype = torch.float32
                      ) -> torch.Tensor:
    """Normalized test images with spatial structure: smooth colour regions (a 3x4 field upsampled) plus noise,
    so that aux-head confidence, and therefore the stopped tokens, vary across the image."""
    generator = torch.Generator().manual_seed(seed * 7919 + height * 131 + width)
    low = 1.5 * torch.randn(batch, 3, 3, 4, generator=generator, dtype=dtype)
    smooth = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    return smooth + 0.3 * torch.randn(batch, 3, height, width, generator=generator, dtype=dtype)
