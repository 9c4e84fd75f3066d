"""Fixtures for integration tests that need real external processes."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.tools import require_tool


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServerProcess:
    """A private `redis-server` (no persistence) that a test may stop, pause and start again.

    The port stays the same across restarts, so clients configured with `url` can reconnect by themselves.
    """

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float = 10.0) -> None:
        command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        ]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode} on port {self.port}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} in {ready_timeout_s} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Terminate the server (it keeps no data) and wait until it has released the port."""
        if self._process is None:
            return
        self.resume()  # a stopped (SIGSTOP) process would not act on SIGTERM
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers, as with a hung Redis."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)


@pytest.fixture
def redis_server() -> Iterator[RedisServerProcess]:
    """A fresh private Redis per test; `.url` to connect, `.stop()` / `.start()` / `.pause()` to break it.

    Without `redis-server` on PATH the test is skipped, except in CI (CI=true), where it fails: the
    cache's fail-open behaviour must be tested against a real server before a release.
    """
    binary = require_tool("redis-server", "apt-get install redis-server")
    server = RedisServerProcess(binary, _free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
