"""Open Inference Protocol (KServe v2) over gRPC: placeholder, being written (registers nothing yet)."""

from __future__ import annotations

from typing import Any


def add_to_server(server: Any, runtime: Any) -> list[str]:
    """Register the OIP servicer on `server`; returns the full service names it added (for reflection)."""
    return []
