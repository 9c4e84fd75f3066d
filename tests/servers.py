"""Start real segserve processes for tests: `python -m service serve` under uvicorn, on free ports.

Servers use EDAFormer-T with random weights and a small serving scale (short side 128) so that every
request runs the real model quickly on a 2-core machine. Each server keeps its latency profile in a private
directory, so that tests never share or reuse another run's calibration.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Small but real: every level of the ladder fits a 128-pixel short side. Random weights with the ADE20K classes
# (not the demo weights), so that the tests know the label space; tests of the demo weights say so.
FAST_SETTINGS = {
    "SEGSERVE_RANDOM_WEIGHTS": "true",
    "SEGSERVE_RESIZE_SCALE": "512x128",
    "SEGSERVE_CALIBRATION_SHAPE": "128x160",
    "SEGSERVE_CALIBRATION_BATCH_SIZES": "1,2,4",
    "SEGSERVE_CALIBRATION_REPEATS": "1",
    "SEGSERVE_MAX_BATCH_SIZE": "4",
    "SEGSERVE_LOG_LEVEL": "warning",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def jpeg_bytes(height: int = 120, width: int = 160, seed: int = 0, quality: int = 90) -> bytes:
    """A real JPEG with smooth structure (gradients and blobs), not flat noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([
        (xx * 255 / max(1, width - 1)),
        (yy * 255 / max(1, height - 1)),
        128 + 100 * np.sin(xx / (5 + seed % 7)) * np.cos(yy / 9),
    ], axis=-1) + rng.normal(0, 8, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass
class ServerProcess:
    """A running `segserve serve` subprocess; use as a context manager."""

    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    grpc_port: int | None = None
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ready_url(self) -> str:
        """Where readiness is probed (a server with an ops port answers it there)."""
        return f"{self.base_url}/readyz"

    def start(self, ready_timeout_s: float = 240.0) -> ServerProcess:
        profile_dir = tempfile.mkdtemp(prefix="segserve-profiles-")
        env = {**os.environ, **FAST_SETTINGS, "SEGSERVE_PROFILE_DIR": profile_dir, **self.env,
               "SEGSERVE_PORT": str(self.port), "PYTHONUNBUFFERED": "1"}
        if self.grpc_port is not None:
            env["SEGSERVE_GRPC_PORT"] = str(self.grpc_port)
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"segserve-test-{self.port}.log"
        log = self.log_path.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.terminate()  # a server that never became ready must not outlive the test that started it
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"segserve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.ready_url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"segserve was not ready within {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path and self.log_path.exists() else ""

    def terminate(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.terminate()
