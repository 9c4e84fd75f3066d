"""Building blocks of EDAFormer: embedding-free attention, Mix-FFN and overlapping patch embedding."""

from models.layers.attention import EmbeddingFreeAttention
from models.layers.mlp import DepthwiseConv, MixFFN
from models.layers.patch_embed import OverlapPatchEmbed

__all__ = ["DepthwiseConv", "EmbeddingFreeAttention", "MixFFN", "OverlapPatchEmbed"]
