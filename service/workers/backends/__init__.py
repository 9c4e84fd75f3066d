"""Execution backends: run a batch of preprocessed images at one ISR level, return label maps."""

from service.workers.backends.base import Backend, BatchOutput

__all__ = ["Backend", "BatchOutput"]
