"""Start-up time of the default server: process launch to `/readyz` 200, first start and restart.

    python scripts/startup_time.py [--runs 3] [--args "--model segformer-b0"] [--markdown docs/startup.md]

A first start has an empty profile directory (calibration runs: a few anchor points per model); a restart finds
the profile saved by the previous run (same machine, backend, model and weights) and only warms up. Medians of
`--runs` pairs, with the machine's load average, since the figures move with whatever else shares the cores.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_to_ready(profile_dir: str, extra: list[str], timeout_s: float = 600) -> float:
    port = free_port()
    env = {**os.environ, "SEGSERVE_PROFILE_DIR": profile_dir, "SEGSERVE_LOG_LEVEL": "warning"}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port), *extra], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - started < timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("not ready in time")
    finally:
        process.terminate()
        process.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--args", default="", help="extra `segserve serve` arguments")
    parser.add_argument("--markdown", help="append the result as a Markdown table row to this file")
    args = parser.parse_args()
    extra = shlex.split(args.args)
    first, again = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as profiles:
            first.append(time_to_ready(profiles, extra))
            again.append(time_to_ready(profiles, extra))
        print(f"first start {first[-1]:.1f} s, restart {again[-1]:.1f} s", flush=True)
    load = os.getloadavg()[0]
    line = (f"| `segserve serve {args.args}`".rstrip() + f" | {statistics.median(first):.1f} s | "
            f"{statistics.median(again):.1f} s | {args.runs} | {load:.1f} |")
    print(f"median first start {statistics.median(first):.1f} s, restart {statistics.median(again):.1f} s "
          f"({args.runs} runs, load average {load:.1f} on {os.cpu_count()} cores)")
    if args.markdown:
        with open(args.markdown, "a") as handle:
            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
