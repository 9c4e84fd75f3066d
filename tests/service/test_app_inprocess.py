"""The app built in-process from test settings over a fake backend: the service's own logic, without a model run.

The fake backend stands in for the network only (fakes for what is not under test): preprocessing, batching,
planning, postprocessing, encoding, caching, errors and readiness are the real ones. It can be told to crash
mid-batch, and its factory to fail, to show what a broken worker does to the server.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.runtime import Runtime
from service.served_model import ServedModel
from service.settings import Settings
from service.workers.backends.base import Backend
from tests.servers import FAST_SETTINGS

SETTINGS = {key.removeprefix("SEGSERVE_").lower(): value for key, value in FAST_SETTINGS.items()}


@dataclass
class Faults:
    """What the fake backends do wrong, shared by every worker's backend."""

    crash: bool = False  # every batch raises
    unbuildable: bool = False  # the factory raises (a worker's rebuild fails)
    built: int = 0
    batches: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeBackend(Backend):
    """Logits that make class `round(mean red) % K` win everywhere: the mask says which image it came from."""

    name = "fake"

    def __init__(self, served: ServedModel, faults: Faults) -> None:
        super().__init__(served.pipeline)
        self.num_classes = served.meta.num_classes
        self.faults = faults

    def forward_with_stats(self, images: torch.Tensor, **knob: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.faults.lock:
            self.faults.batches.append(images.shape[0])
        if self.faults.crash:
            raise RuntimeError("the device fell off the bus")
        B, _, H, W = images.shape
        red = images[:, 0] * self.pipeline.std[0] + self.pipeline.mean[0]  # back to 0-255
        winner = red.mean(dim=(1, 2)).round().long() % self.num_classes
        logits = torch.zeros(B, self.num_classes, -(-H // 8), -(-W // 8))
        logits[torch.arange(B), winner] = 1.0
        return logits, {}


def png(red: int, height: int = 60, width: int = 80) -> bytes:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = red
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
def client(faults: Faults, tmp_path) -> Iterator[TestClient]:
    def factory(served: ServedModel):
        def build() -> Backend:
            faults.built += 1
            if faults.unbuildable:
                raise RuntimeError("no device")
            return FakeBackend(served, faults)

        return build

    settings = Settings(**SETTINGS, profile_dir=str(tmp_path / "profiles"), max_queue_delay_ms=0)
    runtime = Runtime(settings, backends=factory)
    with TestClient(create_app(settings, runtime=runtime)) as test_client:
        deadline = time.monotonic() + 120  # calibration over the fake backend, GMAC counts on the meta device
        while test_client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the in-process app never became ready"
            time.sleep(0.05)
        yield test_client


def segment(client: TestClient, data: bytes, **params: object):
    return client.post("/v1/segment", content=data, params=params, headers={"Content-Type": "image/png"})


def test_the_app_serves_from_test_settings_over_a_fake_backend(client: TestClient, faults: Faults) -> None:
    response = segment(client, png(red=37))
    assert response.status_code == 200, response.text
    mask = np.asarray(Image.open(io.BytesIO(response.content)))
    assert mask.shape == (60, 80) and (mask == 37).all()  # the real postprocess of the fake's logits
    assert response.headers["X-Segserve-Cache"] == "miss" and faults.batches  # it ran on the fake
    assert segment(client, png(red=37)).headers["X-Segserve-Cache"] == "hit"


def test_a_crashing_backend_fails_only_its_batch_and_the_worker_is_rebuilt(client: TestClient, faults: Faults) -> None:
    built = faults.built
    faults.crash = True
    failed = [segment(client, png(red=100 + i)) for i in range(3)]  # three batches in a row: the rebuild threshold
    for response in failed:
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "inference_failed"
        assert "fell off the bus" in response.json()["error"]["message"]
    assert faults.built == built + 1  # the worker rebuilt its backend after the third failure in a row
    faults.crash = False
    assert segment(client, png(red=5)).status_code == 200  # and it serves again
    assert client.get("/readyz").status_code == 200


def test_a_worker_that_cannot_rebuild_turns_readiness_off(client: TestClient, faults: Faults) -> None:
    faults.crash = faults.unbuildable = True
    for i in range(3):
        assert segment(client, png(red=150 + i)).status_code == 500
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["workers_alive"] == 0
    refused = segment(client, png(red=200))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
    assert int(refused.headers["Retry-After"]) >= 1


def test_reduced_precision_points_need_cuda(tmp_path) -> None:
    from service.repository import ConfigError

    settings = Settings(**SETTINGS, profile_dir=str(tmp_path), precisions="fp32,bf16")
    with pytest.raises(ConfigError, match="need --device cuda and the torch backend"):
        Runtime(settings)
