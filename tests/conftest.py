"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.servers import ServerProcess, jpeg_bytes


@pytest.fixture(scope="session")
def live_server() -> Iterator[ServerProcess]:
    """One real segserve process for the session; a few requests have been served when it is handed out."""
    with ServerProcess() as server:
        for seed in range(2):
            response = httpx.post(f"{server.base_url}/v1/segment", content=jpeg_bytes(seed=seed),
                                  headers={"Content-Type": "image/jpeg"}, params={"latency_budget_ms": 5000},
                                  timeout=60)
            response.raise_for_status()
        yield server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped, with a reason, on machines without CUDA (the only allowed skip)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
