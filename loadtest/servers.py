"""The servers under test, each a subprocess on a free loopback port: segserve and the baselines.

Only one runs at a time during a measurement: on a small machine two servers would share the cores
and each would measure the other.
"""

from __future__ import annotations

import atexit
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

ROOT = Path(__file__).resolve().parents[1]
_RUNNING: set[ManagedServer] = set()


@dataclass(frozen=True)
class ServingConfig:
    """The serving configuration shared by every server under test (documented in the report)."""

    resize_scale: str = "1024x256"  # LONGxSHORT keep-ratio scale: 256x341 photos stay 256x341 (net 256x352)
    calibration_shape: str = "256x352"  # the network input of the most common size, so budgets read right
    max_batch_size: int = 4
    max_queue_delay_ms: float = 2.0  # the server's default
    max_queue_size: int = 64
    workers: int = 1
    calibration_repeats: int = 3  # median of 3 timed runs: one noisy run on a shared machine does not skew it
    threads: int | None = None  # intra-op threads per worker (and for the plain endpoint); None = all cores
    device: str = "cpu"
    config_path: str | None = None  # the model repository file every segserve target serves
    profile_dir: str | None = None  # where segserve keeps its latency profile; None = a private temporary one
    model: str = "edaformer-t"  # the default model's architecture: what the plain endpoint serves
    checkpoint: str | None = None  # its weights (None: random)
    extra_env: dict[str, str] = field(default_factory=dict)

    def segserve_env(self) -> dict[str, str]:
        env = {
            "SEGSERVE_DEVICE": self.device,
            "SEGSERVE_RESIZE_SCALE": self.resize_scale,
            "SEGSERVE_CALIBRATION_SHAPE": self.calibration_shape,
            "SEGSERVE_CALIBRATION_BATCH_SIZES": ",".join(str(b) for b in (1, 2, 4, 8) if b <= self.max_batch_size),
            "SEGSERVE_CALIBRATION_REPEATS": str(self.calibration_repeats),
            "SEGSERVE_MAX_BATCH_SIZE": str(self.max_batch_size),
            "SEGSERVE_MAX_QUEUE_DELAY_MS": str(self.max_queue_delay_ms),
            "SEGSERVE_MAX_QUEUE_SIZE": str(self.max_queue_size),
            "SEGSERVE_WORKERS": str(self.workers),
            "SEGSERVE_LOG_LEVEL": "warning",
            # A run calibrates afresh (never a profile persisted by an earlier run on a busier machine); the
            # targets after the first reuse its profile, so every target plans from the same measurements.
            "SEGSERVE_PROFILE_DIR": self.profile_dir or tempfile.mkdtemp(prefix="loadtest-profiles-"),
        }
        if self.config_path:
            env["SEGSERVE_CONFIG"] = self.config_path
        else:
            env["SEGSERVE_MODEL"] = self.model
            if self.checkpoint:
                env["SEGSERVE_CHECKPOINT"] = self.checkpoint
            else:
                env["SEGSERVE_RANDOM_WEIGHTS"] = "true"
        if self.threads:
            env["SEGSERVE_THREADS_PER_WORKER"] = str(self.threads)
        return {**env, **self.extra_env}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(eq=False)
class ManagedServer:
    """A server subprocess; `kind` is "segserve" (has /metrics, /v1/models) or "plain"."""

    name: str
    kind: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    port: int = field(default_factory=free_port)
    fixed_point: str | None = None  # every request names this point (segserve), or the server runs only it (plain)
    unset_env: tuple[str, ...] = ()  # inherited variables the server must not see
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 300.0) -> ManagedServer:
        env = {**{k: v for k, v in os.environ.items() if k not in self.unset_env}, **self.env, "PYTHONUNBUFFERED": "1"}
        self.log_path = Path(tempfile.gettempdir()) / f"loadtest-{self.name}-{self.port}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _RUNNING.add(self)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=1.0, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"{self.name} was not ready within {ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        _RUNNING.discard(self)
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """A fresh process on the same port: used when a server cannot drain its backlog in time."""
        self.stop(timeout_s=5.0)
        self.start()

    def busy(self) -> bool:
        """Whether the server still holds requests (queued or running)."""
        path = "/metrics" if self.kind == "segserve" else "/inflight"
        response = httpx.get(self.base_url + path, timeout=5.0, trust_env=False)
        if self.kind == "segserve":
            from loadtest.metrics import parse

            snap = parse(response.text)
            return snap.inflight > 0 or snap.queue_depth > 0
        return response.json()["inflight"] > 0

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if not self.busy():
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return False

    def __enter__(self) -> ManagedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    """No server outlives the load test, even when it is interrupted (the CLI turns SIGTERM into an exit)."""
    for server in list(_RUNNING):
        server.stop(timeout_s=5.0)


def segserve(name: str, config: ServingConfig) -> ManagedServer:
    """segserve under test, serving `config.config_path` (the fixed-point baseline is the same server)."""
    # Inherited SEGSERVE_* variables would change what is measured without the report saying so.
    inherited = tuple(key for key in os.environ if key.startswith("SEGSERVE_"))
    server = ManagedServer(name=name, kind="segserve", command=[sys.executable, "-m", "service", "serve"],
                           env=config.segserve_env(), ready_path="/readyz", unset_env=inherited)
    server.env["SEGSERVE_PORT"] = str(server.port)
    server.env["SEGSERVE_HOST"] = "127.0.0.1"
    return server


def plain(name: str, config: ServingConfig, point: str) -> ManagedServer:
    """Baseline (a): the plain FastAPI endpoint (`loadtest.baseline_server`), the default model at full compute."""
    port = free_port()
    command = [sys.executable, "-m", "loadtest.baseline_server", "--port", str(port),
               "--resize-scale", config.resize_scale, "--model", config.model, "--device", config.device]
    if config.checkpoint:
        command += ["--checkpoint", config.checkpoint]
    if config.threads:
        command += ["--threads", str(config.threads)]
    # `segserve loadtest` runs inside segserve's CLI, which sets OMP_WAIT_POLICY for its own process; the plain
    # endpoint is what a user writes, with the library defaults, whichever command started the load test.
    return ManagedServer(name=name, kind="plain", command=command, env=dict(config.extra_env),
                         ready_path="/healthz", port=port, fixed_point=point, unset_env=("OMP_WAIT_POLICY",))
