"""segserve: latency-budget-aware serving of EDAFormer segmentation over HTTP and gRPC."""

__version__ = "0.1.0"
