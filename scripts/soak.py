"""Soak: does segserve's memory stay flat over many varied requests?

Starts a real `segserve serve` (HTTP and gRPC, loopback), sends `--requests` varied requests from a few client
threads (image sizes from thumbnails to 12 MP, JPEG/PNG/WebP, budgets, quality caps, explicit points, output
formats, both transports, repeats that hit the cache, and bad inputs that must get a 4xx), samples the server's
resident memory (VmRSS, VmHWM from /proc) every `--sample-every` requests, and writes:

- a table on stdout,
- a plot of memory against requests (`--plot`, default docs/img/soak_memory.png),
- a Markdown block with the figures (`--markdown`, default docs/soak.md).

Figures: RSS at start (ready, before any request), after 100 and after all requests, the peak (VmHWM), and the
slope of RSS from request 100 on (a least-squares line: the cache filling up shows there too; the estimated
cache content is printed beside it). Any 5xx or transport failure is counted and makes the exit status 1.

    nice python scripts/soak.py                       # the server's defaults (demo weights), ~10-20 min on 2 cores
    nice python scripts/soak.py --fast --requests 200 --env SEGSERVE_WORKERS=2  # small settings; any setting
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The tests' small settings (tests/servers.py FAST_SETTINGS), restated so that the script does not import tests/.
FAST = {"SEGSERVE_RANDOM_WEIGHTS": "true", "SEGSERVE_RESIZE_SCALE": "512x128", "SEGSERVE_CALIBRATION_SHAPE": "128x160",
        "SEGSERVE_CALIBRATION_REPEATS": "1"}
SIZES = {  # (weight, [(height, width)]): mostly what phones and web pages send, a few camera-sized
    "small": (40, [(120, 160), (240, 320), (300, 400), (64, 64)]),
    "medium": (32, [(480, 640), (600, 800), (768, 1024), (1000, 750)]),
    "large": (20, [(1080, 1440), (1200, 1600), (1536, 2048)]),
    "huge": (8, [(2448, 3264), (3000, 4000)]),  # JPEG only: the reduced decoding path
}
OUTPUT_FORMATS = ["png"] * 6 + ["color", "json", "rle", "overlay"]
MiB = 2**20


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def synth(height: int, width: int, seed: int, fmt: str) -> bytes:
    """A photo-like image (smooth gradients and blobs at a quarter of the size, scaled up, then grain), as `fmt`.
    Made small then scaled, so that a 12 MP image costs the client tens of MB, not hundreds."""
    rng = np.random.default_rng(seed)
    h, w = max(1, height // 4), max(1, width // 4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f1, f2 = rng.uniform(2, 15, 2)
    small = np.stack([xx * 255 / max(1, w - 1), yy * 255 / max(1, h - 1),
                      128 + 100 * np.sin(xx / f1) * np.cos(yy / f2)], axis=-1)
    image = np.asarray(Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((width, height),
                                                                                       Image.Resampling.BILINEAR))
    grain = rng.integers(0, 16, size=image.shape, dtype=np.uint8)
    image = np.where(image > 239, image, image + grain)  # no wrap-around past 255
    buffer = io.BytesIO()
    options = {"quality": int(rng.integers(60, 95))} if fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@dataclass
class Request:
    kind: str  # fresh, repeat or bad
    transport: str
    image: tuple[int, int, int, str] | bytes  # (height, width, seed, format), made when sent; or the bytes
    content_type: str
    params: dict[str, str] = field(default_factory=dict)
    expect_error: bool = False

    @property
    def body(self) -> bytes:
        # Made when sent, not when planned: a thousand camera-sized images would not fit the client's memory.
        return self.image if isinstance(self.image, bytes) else synth(*self.image)


def bad_request(rng: random.Random, seed: int) -> Request:
    """Inputs a careless client sends: each must get a 4xx naming the problem."""
    choice = rng.choice(["truncated", "text", "empty", "type", "budget", "point", "format", "tiny"])
    good = synth(240, 320, seed, "JPEG")
    body, content_type, params = good, "image/jpeg", {}
    if choice == "truncated":
        body = good[: len(good) // 3]
    elif choice == "text":
        body, content_type = b"this is not an image", "image/png"
    elif choice == "empty":
        body = b""
    elif choice == "type":
        content_type = "text/plain"
    elif choice == "budget":
        params = {"latency_budget_ms": rng.choice(["abc", "-5", "1e999", "１２"])}
    elif choice == "point":
        params = {"point": "no-such-model/1111-111@1"}
    elif choice == "format":
        params = {"format": "gif"}
    else:
        body = synth(8, 8, 0, "PNG")
        content_type = "image/png"
    return Request("bad", "http", body, content_type, params, expect_error=True)


def plan(count: int, seed: int, points: list[str], grpc: bool) -> list[Request]:
    """The request sequence, fixed by the seed."""
    rng = random.Random(seed)
    done: list[Request] = []
    kinds, weights = zip(*[(name, weight) for name, (weight, _) in SIZES.items()], strict=True)
    for index in range(count):
        roll = rng.random()
        fresh_ones = [r for r in done if r.kind == "fresh"]
        if roll < 0.05:
            done.append(bad_request(rng, seed * 100_003 + index))
            continue
        if roll < 0.20 and fresh_ones:  # the same image and parameters again: a cache hit
            previous = rng.choice(fresh_ones[-50:])
            done.append(Request("repeat", previous.transport, previous.image, previous.content_type,
                                dict(previous.params)))
            continue
        size_kind = rng.choices(kinds, weights)[0]
        height, width = rng.choice(SIZES[size_kind][1])
        fmt = "JPEG" if size_kind == "huge" else rng.choice(["JPEG", "JPEG", "PNG", "WEBP"])
        image = (height, width, seed * 100_003 + index, fmt)
        params: dict[str, str] = {}
        mode = rng.random()
        if mode < 0.40:
            params["latency_budget_ms"] = str(rng.choice([150, 300, 600, 1000, 2000, 4000]))
        elif mode < 0.55:
            params["quality"] = rng.choice(["fast", "balanced", "best", "0.5"])
        elif mode < 0.65 and points:
            params["point"] = rng.choice(points)
        elif mode < 0.70:
            params.update(latency_budget_ms="300", strict="true")  # may be 503: refused, not failed
        if rng.random() < 0.3:
            params["timeout_ms"] = str(rng.choice([2000, 5000, 20000]))
        transport = "grpc" if grpc and rng.random() < 0.1 else "http"
        if transport == "http":
            params["format"] = rng.choice(OUTPUT_FORMATS)
        done.append(Request("fresh", transport, image, f"image/{fmt.lower()}", params))
    return done


class Server:
    """`python -m service serve` on free loopback ports, its log in a temporary file."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.log_path = Path(tempfile.gettempdir()) / f"segserve-soak-{self.port}.log"
        self.log = self.log_path.open("wb")
        full = {**os.environ, **env, "SEGSERVE_HOST": "127.0.0.1", "SEGSERVE_PORT": str(self.port),
                "SEGSERVE_GRPC_PORT": str(self.grpc_port), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=full,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"segserve exited with {self.process.returncode}; log: {self.log_path}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"segserve was not ready within {timeout_s:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    hits: int = 0
    failures: list[str] = field(default_factory=list)  # 5xx other than refusals, no answer, a bad input accepted
    answer_bytes: int = 0  # bodies of computed (cached) answers: what the result cache holds at most
    lock: threading.Lock = field(default_factory=threading.Lock)


class Sender:
    """Sends requests from a few threads; one HTTP client and one gRPC channel per thread."""

    def __init__(self, server: Server, tally: Tally) -> None:
        self.server, self.tally, self.local = server, tally, threading.local()

    def http(self) -> httpx.Client:
        if not hasattr(self.local, "http"):
            self.local.http = httpx.Client(base_url=self.server.url, timeout=180, trust_env=False)
        return self.local.http

    def grpc_stub(self):  # -> SegmentationStub
        if not hasattr(self.local, "stub"):
            import grpc

            from service.grpc.gen import segserve_pb2_grpc

            channel = grpc.insecure_channel(f"127.0.0.1:{self.server.grpc_port}",
                                            options=[("grpc.max_receive_message_length", 256 * MiB)])
            self.local.stub = segserve_pb2_grpc.SegmentationStub(channel)
        return self.local.stub

    def send(self, request: Request) -> None:
        try:
            status, cache, size = self._grpc(request) if request.transport == "grpc" else self._http(request)
        except Exception as exc:  # no answer at all: the one thing a soak must never see
            status, cache, size = 0, "", 0
            problem = f"{request.kind} {request.transport}: {type(exc).__name__}: {exc}"
        else:
            wrong = not 400 <= status < 500 if request.expect_error else status >= 500 and status not in (503, 504)
            problem = f"{request.kind} {request.transport} {request.params} answered {status}" if wrong else ""
        with self.tally.lock:
            self.tally.statuses[status] += 1
            self.tally.hits += cache == "hit"
            if status == 200 and cache == "miss":
                self.tally.answer_bytes += size
            if problem:
                self.tally.failures.append(problem)

    def _http(self, request: Request) -> tuple[int, str, int]:
        response = self.http().post("/v1/segment", content=request.body, params=request.params,
                                    headers={"Content-Type": request.content_type})
        return response.status_code, response.headers.get("X-Segserve-Cache", ""), len(response.content)

    def _grpc(self, request: Request) -> tuple[int, str, int]:
        import grpc

        from service.grpc.gen import segserve_pb2

        p = request.params
        fields = {"image": request.body, "quality": p.get("quality", ""), "point": p.get("point", ""),
                  "strict": p.get("strict") == "true"}
        fields.update({key: float(p[key]) for key in ("latency_budget_ms", "timeout_ms") if key in p})
        try:
            reply = self.grpc_stub().Segment(segserve_pb2.SegmentRequest(**fields), timeout=180)
        except grpc.RpcError as exc:
            statuses = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
                        grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
                        grpc.StatusCode.DEADLINE_EXCEEDED: 504}
            return statuses.get(exc.code(), 500), "", 0
        return 200, reply.receipt.cache, len(reply.mask)


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares bytes per request."""
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    return float(np.polyfit(x, y, 1)[0]) if len(points) >= 2 and np.ptp(x) > 0 else 0.0


def plot(samples: list[tuple[int, int, int, int]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=110)
    requests = [s[0] for s in samples]
    axis.plot(requests, [s[1] / MiB for s in samples], marker="o", markersize=3, label="resident (VmRSS)")
    axis.plot(requests, [s[2] / MiB for s in samples], linestyle="--", label="peak so far (VmHWM)")
    axis.plot(requests, [(s[1] - s[3]) / MiB for s in samples], linestyle=":",
              label="resident less the answers cached")
    axis.set(xlabel="requests answered", ylabel="server memory (MiB)", ylim=(0, None))
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--sample-every", type=int, default=50)
    parser.add_argument("--clients", type=int, default=3, help="client threads sending at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="the tests' small settings (random weights, short side "
                        "128) instead of the server's defaults")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="a server setting")
    parser.add_argument("--ready-timeout", type=float, default=1200, help="seconds for start-up and calibration")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/img/soak_memory.png")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs/soak.md")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 100_000 or not 1 <= args.sample_every <= args.requests or not 1 <= args.clients <= 64:
        parser.error("need 1 <= --sample-every <= --requests <= 100000 and 1 <= --clients <= 64")
    env = dict(FAST) if args.fast else {}
    env.update(item.split("=", 1) for item in args.env)

    load_before = os.getloadavg()
    server = Server(env)
    try:
        started = time.monotonic()
        server.wait_ready(args.ready_timeout)
        print(f"ready after {time.monotonic() - started:.0f} s; planning {args.requests} requests", flush=True)
        listing = httpx.get(f"{server.url}/v1/models", timeout=60).json()
        points = [p["name"] for m in listing["models"] for p in m["points"]]
        requests = plan(args.requests, args.seed, points, grpc=True)
        tally = Tally()
        sender = Sender(server, tally)
        rss, hwm = memory(server.process.pid)
        samples = [(0, rss, hwm, 0)]
        print(f"{'requests':>8} {'RSS MiB':>8} {'peak MiB':>8} {'hits':>5} {'answers MiB':>11} {'s':>6}  statuses")
        began = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            for start in range(0, len(requests), args.sample_every):
                list(pool.map(sender.send, requests[start:start + args.sample_every]))
                rss, hwm = memory(server.process.pid)
                done = min(len(requests), start + args.sample_every)
                samples.append((done, rss, hwm, tally.answer_bytes))
                print(f"{done:>8} {rss / MiB:>8.0f} {hwm / MiB:>8.0f} {tally.hits:>5} "
                      f"{tally.answer_bytes / MiB:>11.1f} {time.monotonic() - began:>6.0f}  "
                      f"{dict(sorted(tally.statuses.items()))}", flush=True)
        elapsed = time.monotonic() - began
    finally:
        server.stop()
    load_after = os.getloadavg()

    at = {n: r for n, r, _, _ in samples}
    after_100 = at.get(100, min(samples, key=lambda s: abs(s[0] - 100))[1])
    per_request = slope([(n, r) for n, r, _, _ in samples if n >= 100])
    # The in-memory result cache grows by design (up to SEGSERVE_CACHE_BYTES): what is left is what could leak.
    net_per_request = slope([(n, r - cached) for n, r, _, cached in samples if n >= 100])
    peak = max(h for _, _, h, _ in samples)
    config = "the tests' small settings (--fast)" if args.fast else "the server's defaults"
    if args.env:
        config += " with " + ", ".join(args.env)
    title = (f"segserve soak: {args.requests} varied requests, {args.clients} clients; slope "
             f"{per_request * 1000 / MiB:+.1f} MiB per 1,000 requests, {net_per_request * 1000 / MiB:+.1f} "
             "less the cache")
    plot(samples, args.plot, title)
    rows = "\n".join(f"| {n} | {r / MiB:.0f} | {h / MiB:.0f} | {c / MiB:.1f} |" for n, r, h, c in samples)
    figures = (
        f"| RSS at start (ready, before any request) | {samples[0][1] / MiB:.0f} MiB |\n"
        f"| RSS after 100 requests | {after_100 / MiB:.0f} MiB |\n"
        f"| RSS after {args.requests} requests | {samples[-1][1] / MiB:.0f} MiB |\n"
        f"| slope from request 100 on (least squares) | {per_request / 1024:+.1f} KiB per request "
        f"({per_request * 1000 / MiB:+.1f} MiB per 1,000) |\n"
        f"| slope less the answers cached (by design, up to the cache's bound) | {net_per_request / 1024:+.1f} KiB per "
        f"request ({net_per_request * 1000 / MiB:+.1f} MiB per 1,000) |\n"
        f"| peak (VmHWM) | {peak / MiB:.0f} MiB |\n"
        f"| answers computed (what the result cache may hold) | {tally.answer_bytes / MiB:.1f} MiB |\n"
        f"| statuses | {dict(sorted(tally.statuses.items()))}; cache hits {tally.hits} |\n"
        f"| failures (5xx other than 503/504, no answer, bad input accepted) | {len(tally.failures)} |\n"
        f"| duration | {elapsed / 60:.1f} min ({args.requests / elapsed:.1f} requests/s) |\n"
        f"| machine | {os.cpu_count()} CPUs, {platform.machine()}, load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (1 min) |")
    markdown = (
        "<!-- written by scripts/soak.py: the lead merges these figures into docs/benchmarks.md -->\n"
        "## Soak: memory over varied requests\n\n"
        f"`{' '.join(['nice python scripts/soak.py', *(argv if argv is not None else sys.argv[1:])])}`: one server "
        f"({config}), HTTP and gRPC, {args.clients} client threads; sizes 64x64 to 3000x4000, JPEG/PNG/WebP, budgets, "
        "quality caps, explicit points, strict budgets, every output format, ~15 % repeats (cache hits) and ~5 % "
        "bad inputs (each must get a 4xx).\n\n"
        f"| figure | value |\n|---|---|\n{figures}\n\n"
        f"![server memory against requests]({os.path.relpath(args.plot, args.markdown.parent)})\n\n"
        "<details><summary>samples</summary>\n\n| requests | RSS MiB | peak MiB | answers cached MiB |\n"
        f"|---|---|---|---|\n{rows}\n\n"
        "</details>\n")
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(markdown)
    print("\n" + figures)
    for problem in tally.failures[:20]:
        print("FAILURE:", problem)
    print(f"wrote {args.plot} and {args.markdown}")
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
