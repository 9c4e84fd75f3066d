"""The hardening figures for docs/benchmarks.md, on real servers: peak memory under near-limit images at once, and
how late answers come under overload with a hard timeout.

    python scripts/hardening_figures.py [--rounds 3]

1. Memory: a server with a 256 MiB in-flight budget and a 4.2 MP pixel limit gets 8 different 2000x2000 PNGs
   (4 MP each) at once; reported: the server's RSS before, its peak (VmHWM) and its RSS 2 s after, and the
   statuses (200, or 429 `memory_budget` past the budget).
2. Deadlines: 48 requests at once with `timeout_ms=600`, each naming the full point (about 3x what one worker
   can do in 600 ms): the statuses, the server's own total time of the answers 200 (it must stay within the
   timeout) and the client's.
3. The schema: `schemathesis run --checks all` with `--max-examples` per operation (the suite runs 8), its
   summary lines.

The tests assert the bounds (tests/service/test_hardening.py); this prints the figures, median over rounds.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import ServerProcess, jpeg_bytes  # the suite's launcher: a real `segserve serve` process

MEMORY_BUDGET = 256 * 2**20


def rss(pid: int) -> tuple[float, float]:
    """(resident, peak resident) in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def structured_png(side: int, seed: int) -> bytes:
    yy, xx = np.mgrid[0:side, 0:side]
    base = 128 + 100 * np.sin(xx / (9 + seed)) * np.cos(yy / 13)
    pixels = np.stack([base, xx * 255 / side, yy * 255 / side], axis=-1).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def post(url: str, data: bytes, content_type: str, **params: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/segment", content=data, params=params, headers={"Content-Type": content_type},
                      timeout=300)


def memory_round(images: list[bytes]) -> dict:
    env = {"SEGSERVE_MAX_PIXELS": "4200000", "SEGSERVE_MAX_INFLIGHT_BYTES": str(MEMORY_BUDGET),
           "SEGSERVE_SCALES": "1", "SEGSERVE_LEVELS": "2222-222", "SEGSERVE_CALIBRATION_BATCH_SIZES": "1"}
    with ServerProcess(env=env) as server:
        pid = server.process.pid
        before, _ = rss(pid)
        with ThreadPoolExecutor(len(images)) as pool:
            statuses = [r.status_code for r in pool.map(lambda d: post(server.base_url, d, "image/png"), images)]
        _, peak = rss(pid)
        time.sleep(2)
        after, _ = rss(pid)
    return {"before": before, "peak": peak, "after": after, "statuses": Counter(statuses)}


def deadline_round(seed: int) -> dict:
    images = [jpeg_bytes(120, 160, seed=seed + i) for i in range(48)]
    with ServerProcess() as server:
        def timed(data: bytes) -> tuple[int, float, float]:
            started = time.monotonic()
            response = post(server.base_url, data, "image/jpeg", timeout_ms=600, point="edaformer-t/1111-111@1")
            return (response.status_code, time.monotonic() - started,
                    float(response.headers.get("X-Segserve-Total-Ms", 0)) / 1e3)

        with ThreadPoolExecutor(len(images)) as pool:
            results = list(pool.map(timed, images))
    answered = [(client, server_s) for status, client, server_s in results if status == 200]
    return {"statuses": Counter(status for status, _, _ in results),
            "server_max": max((s for _, s in answered), default=0.0),
            "client_max": max((c for c, _ in answered), default=0.0)}


def schemathesis_summary(max_examples: int) -> str:
    binary = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    config = Path(__file__).resolve().parents[1] / "tests" / "data" / "schemathesis.toml"
    with ServerProcess() as server:
        done = subprocess.run([binary, "--config-file", str(config), "run", f"{server.base_url}/openapi.json",
                               "--checks", "all", "--max-examples", str(max_examples), "--workers", "1",
                               "--seed", "1"], capture_output=True, text=True, timeout=1800)
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    keep = [line for line in lines if any(word in line for word in ("passed", "failed", "cases", "generated",
                                                                    "Operations", "Test cases", "Failures"))]
    return f"exit {done.returncode}: " + " | ".join(keep[-8:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-examples", type=int, default=50, help="schemathesis examples per operation")
    args = parser.parse_args()
    images = [structured_png(2000, seed) for seed in range(8)]
    memory = [memory_round(images) for _ in range(args.rounds)]
    deadlines = [deadline_round(7000 + 100 * r) for r in range(args.rounds)]
    med = statistics.median
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (1 min) at the end; "
          f"{args.rounds} rounds, medians")
    print(f"memory, 8 x 4 MP PNG at once, in-flight budget {MEMORY_BUDGET / 2**20:.0f} MiB: RSS before "
          f"{med(m['before'] for m in memory):.0f} MiB, peak +{med(m['peak'] - m['before'] for m in memory):.0f} MiB "
          f"(max +{max(m['peak'] - m['before'] for m in memory):.0f}), 2 s after "
          f"+{med(m['after'] - m['before'] for m in memory):.0f} MiB; statuses "
          f"{sum((m['statuses'] for m in memory), Counter())}")
    print(f"deadlines, 48 at once with timeout_ms=600: statuses {sum((d['statuses'] for d in deadlines), Counter())}; "
          f"latest answer 200, server {max(d['server_max'] for d in deadlines) * 1e3:.0f} ms, client "
          f"{max(d['client_max'] for d in deadlines) * 1e3:.0f} ms")
    print(f"schemathesis, --max-examples {args.max_examples}: {schemathesis_summary(args.max_examples)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
