"""GMAC counting: convolutions, linears and the two attention matmuls (q k^T and attn v).

This is how the EDAFormer and SegFormer authors count (mmcv's complexity counter plus 2*N*N'*C per
attention); norms, activations and pooling are not counted. Counting runs on the meta device, so even
EDAFormer-B at 1024x2048 costs no memory and no compute. A family whose cost depends on the data (DoViT's
early exits) defines `count_gmacs(height, width, batch, **knob)` on the model, and that is used instead.

    count_gmacs(model, 512, 512, isr=IsrConfig.parse("2211/222"))
    count_gmacs(model, 512, 512, pooled_size=12)
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.spec import Level


def count_gmacs(model: torch.nn.Module, height: int, width: int, *, batch: int = 1, **knob: Any) -> float:
    """Multiply-accumulates (in 1e9) of one forward pass at (batch, 3, height, width) with `knob`."""
    own = getattr(model, "count_gmacs", None)
    if callable(own):
        return float(own(height, width, batch=batch, **knob))
    meta_model = copy.deepcopy(model).to("meta")
    images = torch.empty(batch, 3, height, width, device="meta")
    # The fused CPU attention kernel is invisible to FlopCounterMode; the math backend decomposes it
    # into the two matmuls that the count must include.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(images, **knob)
    return counter.get_total_flops() / 2 / 1e9


@lru_cache(maxsize=1024)
def gmacs_for(model_name: str, num_classes: int, height: int, width: int, level: Level) -> float:
    """Cached `count_gmacs` for a registered model at a level (the planner asks for the same shapes often)."""
    from models.registry import create_model

    with torch.device("meta"):
        model = create_model(model_name, num_classes=num_classes)
    return count_gmacs(model, height, width, **level.kwargs)
