"""State-dict primitives and the weight perturbation shared by the spec-literal references.

The references compute each family from its spec with nothing but `torch.nn.functional` on a state dict, so
that they share no code with `models/`; what they share with each other is only this plumbing: read a named
LayerNorm, Linear or BatchNorm from the state dict, move between token and grid layouts, and make random
weights non-trivial in a reproducible way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

StateDict = dict[str, torch.Tensor]


def layer_norm(x: torch.Tensor, sd: StateDict, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps)


def linear(x: torch.Tensor, sd: StateDict, name: str) -> torch.Tensor:
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def batch_norm(x: torch.Tensor, sd: StateDict, name: str, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm in eval mode (running statistics)."""
    return F.batch_norm(x, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                        sd[name + ".bias"], training=False, eps=eps)


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, C) -> (B, C, H, W)."""
    batch, _, channels = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, channels, height, width)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return grid.flatten(2).transpose(1, 2)


@torch.no_grad()
def perturb_weights_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make the weights non-trivial in place: perturb every 1-D tensor (LayerNorm/BatchNorm affine, biases) and
    give BatchNorm random running statistics; multi-dim weights keep their (random) initialisation plus a little
    noise, so the logits stay spatially structured. Families whose initialisation switches parts of the network
    off (SeaFormer, LRFormer) need their own recipe, in their reference."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict().items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        if name.endswith("running_var"):
            tensor.copy_(0.3 + 1.7 * torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype))
        elif name.endswith("running_mean"):
            tensor.copy_(0.3 * noise)
        elif tensor.dim() == 1:
            tensor.add_(0.1 * noise)
        else:
            tensor.add_(0.01 * noise)
    return module
