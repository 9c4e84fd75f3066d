"""DoViT (Liu et al., WACV 2024): a plain ViT whose easy tokens stop early, with Segmenter's mask head.

    logits = model(images)                                   # trained exit threshold 0.96
    logits, stats = model.forward_with_stats(images, exit_threshold=0.9)   # stats["kept_fraction"]: (B, 3)

Spec: /work/shared/specs/dovit.md (section 6 supersedes); official code FLHonker/DoViT-code
(`mmseg/models/backbones/do_vit.py`, `local_configs/segmenter/*`). At aux taps 2, 5 and 8 an FCN head
classifies every patch token; a token whose confidence max_c softmax(z)_c exceeds the threshold (or falls
below the optional floor) stops: later blocks run on the kept tokens only, and stopped tokens keep their
features until the final LayerNorm and the decode head.

Differences from the official forward, all deliberate:
- Decisions are per image. The official code keeps the batch-mean token count for every image; here a batch
  is padded to its largest kept count and padded keys are masked out of attention (-inf bias), so each image
  gets its single-image result (to float noise) and its own kept count. One code path, eager and ONNX.
- Kept tokens are ordered deterministically (CLS first, then ascending position), which the summary token
  assumes; the official unstable argsort can put a patch first (spec section 6).
- Blocks between two taps run back to back on the kept tokens, and the full sequence is rebuilt once at the
  next tap: the same values as the official rebuild after every block, since stopped tokens never change.
- `exit_floor` (the official `diff_conf`) is off unless given; the ADE20K configs trained with 0.02
  (`exit_floor=0.02` reproduces them), which stops every token of an unconfident (e.g. untrained) model.

Knob: the ladder is t0.96 (trained), t0.93, t0.9; any value > 1 ("dense", off the ladder) stops nothing and
runs the dense ViT on the same weights. ONNX takes the threshold as a runtime scalar (one graph for every
value, a per-tap tuple only when its values are equal); per-tap thresholds and `exit_floor` are eager-only.
Cityscapes checkpoints were trained on 768 crops: build with `img_size=768` (pos_embed (1, 2305, C)) and pass
their exit_threshold 0.985 (and `exit_floor=0.0` for S). GMACs depend on the data: `count_gmacs` gives the
dense count (an upper bound) unless given the kept fractions a forward reported.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelMeta, SegmentationModel
from models.checkpoint import MMSEG_CONV_SEG
from models.datasets import DATASETS
from models.layers.dovit_blocks import EncoderLayer, FcnAuxHead, SegmenterMaskHead
from models.registry import register_model
from models.spec import CheckpointRules, ModelSpec, ThresholdKnob

PATCH = 16
TAPS = (2, 5, 8)  # out_indices (2, 5, 8, 11) minus the last: the check runs before block i, after i blocks
TRAINED_THRESHOLD = 0.96  # exit_conf of the ADE20K Segmenter configs (S and B)
AGG_RATE = 0.1  # summary token when more than this share of the sequence (CLS included) has stopped
AUX_CHANNELS = 256
KEPT_FRACTION = "kept_fraction"

Threshold = float | Sequence[float] | torch.Tensor


class PatchEmbed(nn.Module):
    """mmseg PatchEmbed, padding 'corner': zero-pad right/bottom to a multiple of 16, then a 16x16/16 conv."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """images (B, 3, H, W) -> tokens (B, h*w, C), h = ceil(H/16), w = ceil(W/16)."""
        height, width = images.shape[-2:]
        pad_h, pad_w = (PATCH - height % PATCH) % PATCH, (PATCH - width % PATCH) % PATCH
        x = self.projection(F.pad(images, (0, pad_w, 0, pad_h)))
        _, _, h, w = x.shape
        return x.flatten(2).transpose(1, 2), h, w


class DoViTBackbone(nn.Module):
    """The ViT with its three FCN aux heads (`backbone.auxiliary_head.{k}`, as DoEncoderDecoder attaches them).

    Args:
        dim, depth, num_heads: ViT width, layers and heads (S: 384/12/6, B: 768/12/12).
        num_classes: classes of the aux heads.
        img_size: training crop; `pos_embed` has (img_size / 16)^2 + 1 entries.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, num_classes: int, img_size: int = 512,
                 taps: tuple[int, ...] = TAPS, *, fused: bool = True) -> None:
        super().__init__()
        self.grid = img_size // PATCH
        self.taps = taps
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.patch_embed = PatchEmbed(dim)
        self.layers = nn.ModuleList(
            EncoderLayer(dim, num_heads, eps=1e-6, packed_attention=False, fused=fused) for _ in range(depth)
        )
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)  # final_norm=True
        self.auxiliary_head = nn.ModuleList(FcnAuxHead(dim, num_classes, AUX_CHANNELS) for _ in taps)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h*w, C). mmseg resizes the grid part bicubically (align_corners=False) only when the token
        count differs from the training grid's, so a 16x64 grid (1024 tokens) gets the 32x32 table unresized.
        Written without a branch on the shape so that it exports with dynamic height and width."""
        pos = self.pos_embed
        G, C = self.grid, pos.shape[-1]
        table = pos[:, 1:]
        grid = table.reshape(1, G, G, C).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        count = h * w
        unresized = torch.cat([table, table.new_zeros(1, count, C)], dim=1)[:, :count]  # == table when count == G*G
        same_count = (torch.ones((), dtype=torch.int64, device=pos.device) * count) == G * G
        return torch.cat([pos[:, :1], torch.where(same_count, unresized, resized)], dim=1)

    def confidence(self, tokens: torch.Tensor, tap: int, h: int, w: int) -> torch.Tensor:
        """Aux head `tap`'s confidence max_c softmax(z)_c per patch token: (B, 1 + h*w, C) -> (B, h*w).
        FCN logits lie on the token grid, so the official avg_pool (kernel 1) is the identity."""
        B, _, C = tokens.shape
        grid = tokens[:, 1:].transpose(1, 2).reshape(B, C, h, w)
        logits = self.auxiliary_head[tap](grid)
        # At least float32 for a half-precision model, so its decisions match the fp32 ones but for rounding.
        return _at_least_fp32(logits).softmax(dim=1).amax(dim=1).reshape(B, h * w)

    def forward(self, images: torch.Tensor, thresholds: torch.Tensor, floor: torch.Tensor | None
                ) -> tuple[torch.Tensor, int, int, torch.Tensor]:
        """images (B, 3, H, W); thresholds (taps,) float32; floor a 0-d float32 tensor or None.

        Returns the final-normed tokens (B, 1 + h*w, C), h, w, and the kept patch-token counts (B, taps).
        """
        x, h, w = self.patch_embed(images)
        B, N, _ = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.position_embedding(h, w)
        keep = torch.ones(B, N, dtype=torch.bool, device=x.device)  # patch tokens still running
        kept_counts = []
        bounds = (*self.taps, len(self.layers))
        for layer in self.layers[: bounds[0]]:
            x = layer(x)
        for k, (start, end) in enumerate(itertools.pairwise(bounds)):
            confidence = self.confidence(x, k, h, w)
            stop = confidence > thresholds[k]
            if floor is not None:
                stop = stop | (confidence < floor)
            keep = keep & ~stop
            kept_counts.append(keep.sum(dim=1))
            x = run_kept_tokens(x, keep, self.layers[start:end])
        return self.ln1(x), h, w, torch.stack(kept_counts, dim=1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def run_kept_tokens(x: torch.Tensor, keep: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
    """Run `layers` on each image's kept tokens only; stopped tokens come back unchanged.

    x: (B, T, C) with CLS first (T = 1 + patches); keep: (B, T - 1) bool over patches. Each image's sequence is
    ordered CLS, kept patches, stopped patches (ascending positions within each group); the batch runs on the
    first n = max kept count positions, and an image with fewer kept tokens masks its extra (stopped) ones out
    of attention as keys and restores them afterwards. When more than AGG_RATE of an image's sequence has
    stopped, its CLS is replaced by the summary token (mean(stopped) + CLS) / 2 first.
    """
    B, T, C = x.shape
    kept = torch.cat([keep.new_ones(B, 1), keep], dim=1)  # CLS always runs
    counts = kept.sum(dim=1)  # B
    positions = torch.arange(T, device=x.device)
    # Distinct keys, so any sort gives one order: kept before stopped, ascending position within each.
    order = (kept.long() * (2 * T) - positions).argsort(dim=1, descending=True)
    restore = order.argsort(dim=1)
    ordered = x.gather(1, order.unsqueeze(-1).expand(B, T, C))

    stopped = ~kept
    stopped_count = T - counts
    # Summed in at least float32: thousands of fp16 tokens would overflow.
    stopped_sum = (_at_least_fp32(x) * stopped.unsqueeze(-1)).sum(dim=1)
    stopped_mean = (stopped_sum / stopped_count.clamp(min=1).unsqueeze(-1)).to(x.dtype)
    summary = (stopped_mean + ordered[:, 0]) * 0.5
    use_summary = (stopped_count.double() / T) > AGG_RATE  # the official float comparison, exactly
    first = torch.where(use_summary.unsqueeze(-1), summary, ordered[:, 0])

    n = counts.max().item()  # an unbacked size under torch.export (no int(): that would specialize it)
    torch._check(n >= 1)
    torch._check(n <= T)
    tokens = torch.cat([first.unsqueeze(1), ordered[:, 1:n]], dim=1)  # B, n, C
    valid = torch.arange(n, device=x.device) < counts.unsqueeze(1)  # B, n
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    key_bias = torch.where(valid, zero, zero - math.inf).reshape(B, 1, 1, n)
    for layer in layers:
        tokens = layer(tokens, key_bias)
    tokens = torch.where(valid.unsqueeze(-1), tokens, ordered[:, :n])
    ordered = torch.cat([tokens, ordered[:, n:]], dim=1)
    return ordered.gather(1, restore.unsqueeze(-1).expand(B, T, C))


def _as_thresholds(value: Threshold | None, taps: int, device: torch.device) -> torch.Tensor:
    """One float32 threshold per tap (float32, as the official float32 confidences are compared)."""
    if value is None:
        value = TRAINED_THRESHOLD
    if isinstance(value, torch.Tensor):
        flat = value.to(device=device, dtype=torch.float32).reshape(-1)
        if flat.shape[0] not in (1, taps):
            raise ValueError(f"exit_threshold must hold 1 or {taps} values (one per aux tap), got {flat.shape[0]}")
        return flat.expand(taps) if flat.shape[0] == 1 else flat
    values = [float(v) for v in value] if isinstance(value, (tuple, list)) else [float(value)] * taps
    if len(values) != taps or any(math.isnan(v) for v in values):
        raise ValueError(f"exit_threshold must be a number or {taps} numbers (one per aux tap), got {value!r}")
    return torch.tensor(values, dtype=torch.float32, device=device)


class DoViT(SegmentationModel):
    """DoViT + Segmenter: `logits = model(images, exit_threshold=0.96, exit_floor=None)`.

    images: normalized (B, 3, H, W), any size (padded to multiples of 16 inside). logits: (B, K, ceil(H/16),
    ceil(W/16)), the mask head's output before any resize. `exit_threshold`: a float, one per tap, or a
    tensor; above 1 nothing stops (the dense ViT). `exit_floor`: stop tokens less confident than this too.
    """

    def __init__(self, backbone: DoViTBackbone, decode_head: SegmenterMaskHead, meta: ModelMeta,
                 spec: ModelSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.meta = meta
        self.spec = spec

    def forward_with_stats(self, images: torch.Tensor, exit_threshold: Threshold | None = None,
                           exit_floor: float | torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and {"kept_fraction": (B, taps) float32}: the share of patch tokens still running after each
        tap (1.0 = nothing stopped)."""
        thresholds = _as_thresholds(exit_threshold, len(self.backbone.taps), images.device)
        floor = None if exit_floor is None else torch.as_tensor(exit_floor, dtype=torch.float32,
                                                                device=images.device)
        tokens, h, w, kept = self.backbone(images, thresholds, floor)
        B, _, C = tokens.shape
        logits = self.decode_head(tokens[:, 1:].transpose(1, 2).reshape(B, C, h, w))
        return logits, {KEPT_FRACTION: kept.to(torch.float32) / (h * w)}

    def forward(self, images: torch.Tensor, exit_threshold: Threshold | None = None,
                exit_floor: float | torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_stats(images, exit_threshold, exit_floor)[0]

    def gmacs_breakdown(self, height: int, width: int, kept_fraction: Sequence[float] | None = None
                        ) -> dict[str, float]:
        """GMACs of one image per part: convs, linears and both attention matmuls (2 n^2 C per layer).

        A layer on n tokens costs n (4C^2 + 8C^2) + 2 n^2 C. Blocks 0-1 run on all 1 + h*w tokens; blocks after
        tap k on 1 + round(f_k h*w), where f = `kept_fraction` (taps,) (None: nothing stops, the dense count
        and the upper bound for any threshold). The aux heads always run on every patch token.
        """
        h, w = math.ceil(height / PATCH), math.ceil(width / PATCH)
        N, C, K = h * w, self.backbone.cls_token.shape[-1], self.decode_head.num_classes
        fractions = [1.0] * len(self.backbone.taps) if kept_fraction is None else [float(f) for f in kept_fraction]
        if len(fractions) != len(self.backbone.taps):
            raise ValueError(f"kept_fraction needs one value per tap ({len(self.backbone.taps)}), got {fractions}")
        bounds = (*self.backbone.taps, len(self.backbone.layers))
        tokens = [N + 1] * bounds[0]
        for (start, end), fraction in zip(itertools.pairwise(bounds), fractions, strict=True):
            tokens += [1 + round(fraction * N)] * (end - start)

        def layer(n: int) -> int:
            return 12 * n * C * C + 2 * n * n * C

        head_tokens = N + K
        parts = {
            "patch_embed": N * C * 3 * PATCH * PATCH,
            "blocks": sum(layer(n) for n in tokens),
            "aux_heads": len(self.backbone.taps) * N * (C * AUX_CHANNELS + AUX_CHANNELS * K),
            "decode_head": N * C * C + len(self.decode_head.layers) * layer(head_tokens) + N * C * C + K * C * C
            + N * K * C,
        }
        return {key: value / 1e9 for key, value in parts.items()}

    def count_gmacs(self, height: int, width: int, batch: int = 1, exit_threshold: Threshold | None = None,
                    exit_floor: float | None = None, kept_fraction: Any = None) -> float:
        """GMACs of a batch (called by `models.flops.count_gmacs`). The cost depends on the data, not on the
        threshold alone: pass the `kept_fraction` a forward reported ((taps,) for every image, or (B, taps));
        without it the count is the dense one, the upper bound at any threshold."""
        del exit_threshold, exit_floor  # they act only through the kept fractions
        if kept_fraction is None:
            return batch * sum(self.gmacs_breakdown(height, width).values())
        rows = torch.as_tensor(kept_fraction, dtype=torch.float64).reshape(-1, len(self.backbone.taps))
        if rows.shape[0] == 1:
            rows = rows.expand(batch, -1)
        elif batch not in (1, rows.shape[0]):
            raise ValueError(f"kept_fraction has {rows.shape[0]} rows for a batch of {batch}")
        return sum(sum(self.gmacs_breakdown(height, width, row.tolist()).values()) for row in rows)


DOVIT_KNOB = ThresholdKnob("exit_threshold", TRAINED_THRESHOLD, (TRAINED_THRESHOLD, 0.93, 0.9), runtime_input=True)

# Segmenter configs normalize with mean = std = 127.5 (RGB) and test by sliding window without AlignedResize
# (the patch embedding pads): ADE20K crop 512 stride 480 after a keep-ratio resize into (2048, 512), Cityscapes
# crop 768 stride 512 after (2048, 1024). Other datasets have no DoViT config: only the normalization is set.
_NORMALIZE = {"mean": (127.5, 127.5, 127.5), "std": (127.5, 127.5, 127.5)}
PIPELINES = {
    **{name: dict(_NORMALIZE) for name in (*DATASETS, "custom")},
    "ade20k": {**_NORMALIZE, "resize_scale": (2048, 512), "align_to": None, "test_mode": "slide",
               "slide_crop": (512, 512), "slide_stride": (480, 480)},
    "cityscapes": {**_NORMALIZE, "resize_scale": (2048, 1024), "align_to": None, "test_mode": "slide",
                   "slide_crop": (768, 768), "slide_stride": (512, 512)},
}
# Any size runs (patch embed pads to 16): squares, non-square, sides that are not multiples of 16, batch 2.
PARITY_SIZES = ((1, 512, 512), (1, 384, 640), (1, 200, 328), (2, 250, 250))


def _spec(name: str, dim: int, description: str) -> ModelSpec:
    return ModelSpec(
        name=name, family="dovit", output_stride=PATCH, knob=DOVIT_KNOB,
        # decode_head.cls_emb is (1, K, C): the class count is read from mask_norm (K,). mmseg 0.x keeps the
        # Segmenter head's conv_seg (C input channels), which its forward never uses.
        checkpoint=CheckpointRules("decode_head.mask_norm.weight", (MMSEG_CONV_SEG,), unused_in_channels=dim),
        # No published figure is verified (spec section 2: the paper's tables were not available), so none is
        # given; the planner falls back to its stated default.
        published_miou={},
        pipelines=PIPELINES,
        reference_gmacs_512=None,  # data dependent; dense figures in `gmacs_breakdown` and spec section 2
        stats=(KEPT_FRACTION,),
        parity_sizes=PARITY_SIZES,
        torchscript_export_ok=False,  # the legacy exporter bakes the example's kept counts in (spec 3.2)
        description=description,
    )


DOVIT_S = _spec("dovit-s", 384, "DoViT-S: ViT-S/16 (384, 12 layers, 6 heads), FCN exits at 2/5/8, Segmenter head")
DOVIT_B = _spec("dovit-b", 768, "DoViT-B: ViT-B/16 (768, 12 layers, 12 heads), FCN exits at 2/5/8, Segmenter head")


def _build(spec: ModelSpec, num_classes: int, dim: int, num_heads: int, img_size: int, fused: bool,
           depth: int = 12) -> DoViT:
    backbone = DoViTBackbone(dim, depth, num_heads, num_classes, img_size, fused=fused)
    head = SegmenterMaskHead(dim, num_heads, num_classes, fused=fused)
    return DoViT(backbone, head, ModelMeta(name=spec.name, num_classes=num_classes), spec)


@register_model(DOVIT_S)
def dovit_s(num_classes: int = 150, img_size: int = 512, fused_attention: bool = True) -> DoViT:
    """`img_size`: the training crop that sizes `pos_embed` (768 for the Cityscapes configs)."""
    return _build(DOVIT_S, num_classes, 384, 6, img_size, fused_attention)


@register_model(DOVIT_B)
def dovit_b(num_classes: int = 150, img_size: int = 512, fused_attention: bool = True) -> DoViT:
    """`img_size`: the training crop that sizes `pos_embed` (768 for the Cityscapes configs)."""
    return _build(DOVIT_B, num_classes, 768, 12, img_size, fused_attention)
