"""Where one request's time goes: a 512x512 JPEG end to end, stage by stage, HTTP against in-process.

    python -m loadtest.breakdown [--runs 15] [--level 1111-111] [--json PATH] [--doc docs/benchmarks.md]

It starts a checkpoint-free segserve (the reference ADE20K pipeline: a 512x512 image is a 512x512 network
input; the result cache off, so every request computes) and, alternately, sends the image over HTTP with
an explicit level and runs the same plan in this process with the functions the service uses:

    decode          service.images.read_header + decode_rgb
    preprocess      models.predict.preprocess at models.predict.network_input_size
    model forward   TorchBackend.logits (the worker's backend), on a worker thread as in the service
    resize+argmax   models.postprocess.labels_from_logits (to the input, then the original size), same thread
    encoding        service.encoding.encode (PNG label map)

Queue time comes from the server's receipt (`X-Segserve-Queue-Ms`): the in-process path has no queue.
Service overhead = median HTTP round trip - median in-process total (the sum of the five stages). On a machine
shared with other work the model forward alone varies by 10-20% from run to run, which swamps a few percent;
so a compute-matched figure is reported too: per run, HTTP round trip - the server's own compute for that
request (X-Segserve-Compute-Ms: forward + resize + argmax) - the in-process decode, preprocess and encoding,
i.e. what the service adds around the same computation (queueing, HTTP, thread hand-offs); its median.
Both sides use the same number of intra-op threads (cores // 1 worker), and run one at a time.

Targets (issue 3): service overhead <= 5% of end-to-end, and resize+argmax + encoding <= 15% of end-to-end,
at the median, end-to-end being the HTTP round trip. Prints a table, writes JSON, and replaces (or appends)
its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from loadtest.servers import ManagedServer

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Service: one request's time, end to end"
STAGES = ("decode", "preprocess", "forward", "postprocess", "encode")
STAGE_LABELS = {
    "decode": "decode (header + RGB)",
    "preprocess": "preprocess (resize + normalize)",
    "queue": "queue (server receipt)",
    "forward": "model forward",
    "postprocess": "resize to original + argmax",
    "encode": "encoding (PNG)",
}
OVERHEAD_TARGET, TAIL_TARGET = 0.05, 0.15


def make_jpeg(size: int = 512, seed: int = 0, quality: int = 90) -> bytes:
    """A real JPEG with smooth structure (gradients, waves, blobs) and some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.stack([
        xx * 255 / (size - 1),
        yy * 255 / (size - 1),
        128 + 100 * np.sin(xx / 23) * np.cos(yy / 17),
    ], axis=-1) + rng.normal(0, 8, (size, size, 3))
    for _ in range(6):
        (cy, cx), radius = rng.uniform(0, size, 2), rng.uniform(size / 16, size / 5)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        image[blob] = rng.uniform(0, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ----- the server -----

def _segserve(env: dict[str, str], unset: Sequence[str]) -> ManagedServer:
    """`python -m service serve` on a free loopback port (the load test's launcher)."""
    server = ManagedServer(name="breakdown", kind="segserve", command=[sys.executable, "-m", "service", "serve"],
                           env=dict(env), ready_path="/readyz", unset_env=tuple(unset))
    server.env.update({"SEGSERVE_HOST": "127.0.0.1", "SEGSERVE_PORT": str(server.port)})
    return server


def stage_sums(metrics_text: str) -> dict[str, tuple[float, float]]:
    """segserve_stage_seconds per stage: (sum, count)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in ("segserve_stage_seconds_sum", "segserve_stage_seconds_count"):
                entry = out.setdefault(sample.labels["stage"], [0.0, 0.0])
                entry[0 if sample.name.endswith("_sum") else 1] += sample.value
    return {stage: (total, count) for stage, (total, count) in out.items()}


# ----- the in-process path -----

class InProcess:
    """The service's own stage functions, timed one by one."""

    def __init__(self, level_name: str, threads: int) -> None:
        import torch

        from models import create_model, level_by_name
        from models.datasets import dataset_for
        from service.workers.backends.torch_backend import TorchBackend

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = create_model("edaformer-t").eval()
        self.meta = model.meta
        self.dataset = dataset_for(model.meta.dataset, model.meta.num_classes)
        self.backend = TorchBackend(model, self.dataset, "cpu")
        self.level = level_by_name(level_name)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="breakdown-worker")

    def run(self, data: bytes) -> tuple[dict[str, float], np.ndarray]:
        import torch

        from models.postprocess import labels_from_logits
        from models.predict import network_input_size, preprocess
        from service import encoding
        from service.images import decode_rgb, read_header

        times: dict[str, float] = {}

        def timed(stage: str, fn: Callable[[], object]) -> object:
            start = time.perf_counter()
            result = fn()
            times[stage] = time.perf_counter() - start
            return result

        start = time.perf_counter()
        header = read_header(data, max_pixels=40_000_000, min_side=32)
        rgb = decode_rgb(data, header)
        times["decode"] = time.perf_counter() - start
        size = network_input_size(header.height, header.width, self.dataset)
        images = timed("preprocess", lambda: preprocess(rgb, size))
        def model_stages() -> np.ndarray:  # on a worker thread, as the service runs them
            with torch.inference_mode():
                logits = timed("forward", lambda: self.backend.forward_with_stats(images, isr=self.level.isr)[0])
                return timed("postprocess", lambda: labels_from_logits(logits, size, (header.height, header.width))[0])

        labels = self.worker.submit(model_stages).result()
        timed("encode", lambda: encoding.encode("png", labels, num_classes=self.meta.num_classes,
                                                class_names=self.meta.class_names, palette=self.meta.palette))
        return times, labels


# ----- measurement -----

def measure(runs: int, warmup: int, level: str, size: int) -> dict:
    threads = max(1, os.cpu_count() or 1)
    data = make_jpeg(size)
    env = {
        "SEGSERVE_LEVELS": level,
        "SEGSERVE_SCALES": "1",  # the level at the reference scale only: nothing else to calibrate
        "SEGSERVE_CALIBRATION_SHAPE": f"{size}x{size}",
        "SEGSERVE_CALIBRATION_BATCH_SIZES": "1",
        "SEGSERVE_CALIBRATION_REPEATS": "1",
        "SEGSERVE_CACHE_BYTES": "0",  # every request computes
        "SEGSERVE_WORKERS": "1",
        "SEGSERVE_THREADS_PER_WORKER": str(threads),
        "SEGSERVE_LOG_LEVEL": "warning",
    }
    # The reference pipeline, random weights and no shared cache, whatever the caller's environment says.
    unset = ("SEGSERVE_RESIZE_SCALE", "SEGSERVE_CHECKPOINT", "SEGSERVE_REDIS_URL")
    local = InProcess(level, threads)
    http_ms: list[float] = []
    receipts: dict[str, list[float]] = {"queue": [], "compute": [], "total": []}
    stage_ms: dict[str, list[float]] = {stage: [] for stage in STAGES}
    local_total_ms: list[float] = []
    print(f"starting segserve (level {level}, {threads} threads, reference pipeline, no cache) ...", file=sys.stderr)
    with _segserve(env, unset) as server, httpx.Client(timeout=120, trust_env=False) as client:
        url = f"{server.base_url}/v1/segment"
        models = client.get(f"{server.base_url}/v1/models").json()["models"][0]
        server_stages_before = None
        for run in range(warmup + runs):
            if run == warmup:
                server_stages_before = stage_sums(client.get(f"{server.base_url}/metrics").text)
            start = time.perf_counter()
            response = client.post(url, content=data, params={"level": level},
                                   headers={"Content-Type": "image/jpeg"})
            elapsed = time.perf_counter() - start
            response.raise_for_status()
            if (response.headers["X-Segserve-Level"], response.headers["X-Segserve-Cache"]) != (level, "miss"):
                raise RuntimeError(f"expected a computed answer at {level}, got {dict(response.headers)}")
            times, labels = local.run(data)
            served = np.asarray(Image.open(io.BytesIO(response.content)))
            if not served.shape == labels.shape == (size, size):
                raise RuntimeError(f"mask shapes {served.shape} (served), {labels.shape} (in-process)")
            if run < warmup:
                continue
            http_ms.append(elapsed * 1e3)
            for key in receipts:
                receipts[key].append(float(response.headers[f"X-Segserve-{key.title()}-Ms"]))
            for stage in STAGES:
                stage_ms[stage].append(times[stage] * 1e3)
            local_total_ms.append(sum(times.values()) * 1e3)
            print(f"run {run - warmup + 1}/{runs}: http {elapsed * 1e3:.1f} ms, in-process "
                  f"{local_total_ms[-1]:.1f} ms", file=sys.stderr)
        server_stages_after = stage_sums(client.get(f"{server.base_url}/metrics").text)
    server_means = {}
    for stage, (total, count) in server_stages_after.items():
        before_total, before_count = (server_stages_before or {}).get(stage, (0.0, 0.0))
        if count > before_count:
            server_means[stage] = (total - before_total) / (count - before_count) * 1e3
    return summarize(http_ms, receipts, stage_ms, local_total_ms, server_means, threads=threads, level=level,
                     size=size, jpeg_bytes=len(data), runs=runs,
                     gmacs=next(p["gmacs"] for p in models["points"] if p["level"] == level and p["scale"] == 1))


def summarize(http_ms, receipts, stage_ms, local_total_ms, server_means, **context) -> dict:
    median = statistics.median
    end_to_end = median(http_ms)
    in_process = median(local_total_ms)
    stages = {stage: median(values) for stage, values in stage_ms.items()}
    stages["queue"] = median(receipts["queue"])
    overhead = end_to_end - in_process
    around_model = [d + p + e for d, p, e in zip(stage_ms["decode"], stage_ms["preprocess"], stage_ms["encode"],
                                                 strict=True)]
    matched = median([h - c - a for h, c, a in zip(http_ms, receipts["compute"], around_model, strict=True)])
    tail = stages["postprocess"] + stages["encode"]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import torch

    return {
        "context": {**context, "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average": load, "postprocess": _postprocess_kind(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
        "median_ms": {"http_round_trip": end_to_end, "in_process_total": in_process, **stages,
                      "server_compute_receipt": median(receipts["compute"]),
                      "server_total_receipt": median(receipts["total"])},
        "server_stage_mean_ms": server_means,
        "service_overhead_ms": overhead,
        "service_overhead_fraction": overhead / end_to_end,
        "service_overhead_matched_ms": matched,
        "service_overhead_matched_fraction": matched / end_to_end,
        "resize_argmax_encode_ms": tail,
        "resize_argmax_encode_fraction": tail / end_to_end,
        "targets": {
            "service_overhead_at_most_5pct": overhead / end_to_end <= OVERHEAD_TARGET,
            "service_overhead_matched_at_most_5pct": matched / end_to_end <= OVERHEAD_TARGET,
            "resize_argmax_encode_at_most_15pct": tail / end_to_end <= TAIL_TARGET,
        },
        "samples_ms": {"http_round_trip": http_ms, "in_process_total": local_total_ms, **stage_ms,
                       **{f"receipt_{key}": values for key, values in receipts.items()}},
    }


def _postprocess_kind() -> str:
    from models import postprocess

    doc = postprocess.__doc__ or ""
    return "exact convex-window argmax" if "convex" in doc else "dense reference resize + argmax"


# ----- reporting -----

def table(result: dict) -> str:
    m, server = result["median_ms"], result["server_stage_mean_ms"]
    end_to_end = m["http_round_trip"]

    def row(label: str, ms: float, server_ms: float | None = None) -> str:
        shown = "" if server_ms is None else f"{server_ms:.1f}"
        return f"| {label} | {ms:.1f} | {100 * ms / end_to_end:.1f}% | {shown} |"

    lines = ["| stage | median ms | % of end-to-end | server mean ms |", "|---|---:|---:|---:|"]
    for stage in ("decode", "preprocess", "queue", "forward", "postprocess", "encode"):
        lines.append(row(STAGE_LABELS[stage], m[stage], None if stage == "queue" else server.get(stage)))
    lines.append(row("**in-process total** (the five stages, per run)", m["in_process_total"]))
    lines.append(row("**HTTP round trip** (end-to-end)", end_to_end, m["server_total_receipt"]))
    lines.append(row("**service overhead** (difference of the medians)", result["service_overhead_ms"]))
    lines.append(row("**service overhead, compute-matched** (per-run median)", result["service_overhead_matched_ms"]))
    return "\n".join(lines)


def verdicts(result: dict) -> list[str]:
    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    targets = result["targets"]
    return [
        f"- Service overhead <= 5% of end-to-end: {result['service_overhead_fraction'] * 100:.1f}% "
        f"({result['service_overhead_ms']:.1f} ms) as the difference of the medians, "
        f"{mark(targets['service_overhead_at_most_5pct'])}; compute-matched "
        f"{result['service_overhead_matched_fraction'] * 100:.1f}% ({result['service_overhead_matched_ms']:.1f} ms), "
        f"{mark(targets['service_overhead_matched_at_most_5pct'])}.",
        f"- Resize + argmax + encoding <= 15% of end-to-end: {result['resize_argmax_encode_fraction'] * 100:.1f}% "
        f"({result['resize_argmax_encode_ms']:.1f} ms), {mark(targets['resize_argmax_encode_at_most_15pct'])}.",
    ]


def section(result: dict, command: str) -> str:
    c = result["context"]
    load = ", ".join(f"{x:.1f}" for x in c["load_average"]) if c["load_average"] else "n/a"
    return "\n".join([
        SECTION,
        "",
        f"One {c['size']}x{c['size']} JPEG ({c['jpeg_bytes'] / 1024:.0f} kB), EDAFormer-T (random weights, "
        f"150 classes) at level {c['level']} ({c['gmacs']} GMACs), the reference ADE20K pipeline (network input "
        f"{c['size']}x{c['size']}), torch eager on CPU with {c['threads']} intra-op threads; the segserve server "
        "with one worker, default batching (2 ms maximum queue delay while a worker is idle) and the result "
        "cache off. Medians over "
        f"{c['runs']} runs, HTTP and in-process alternating. Postprocessing: {c['postprocess']}.",
        "",
        f"Machine: {c['cpu_count']} cores, Python {c['python']}, torch {c['torch']}, OMP_WAIT_POLICY "
        f"{c['omp_wait_policy']}, load average {load} (1, 5, 15 min) at the end of the run; {c['date']}.",
        "",
        table(result),
        "",
        "Stages are timed in-process with the service's own functions; queue is the server's receipt; the last "
        "column is the server's own per-stage mean (`segserve_stage_seconds`) over the same requests. End-to-end is "
        "the HTTP round trip on a keep-alive connection. The compute-matched overhead is, per run, the round trip "
        "minus the server's compute for that very request (`X-Segserve-Compute-Ms`: forward + resize + argmax) minus "
        "the in-process decode, preprocess and encoding: what the service adds around the same computation. It "
        "cancels the run-to-run variation of the forward pass on a shared machine, which the difference of the "
        "medians does not.",
        "",
        *verdicts(result),
        "",
        f"Reproduce: `{command}`.",
        "",
    ])


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of `path` (or append it); other sections are left as they are."""
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = current.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == SECTION), None)
    if start is None:
        updated = current.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        updated = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.breakdown", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="measured runs (medians are reported)")
    parser.add_argument("--warmup", type=int, default=3, help="runs discarded first")
    parser.add_argument("--level", default="1111-111", help="the fixed ISR level (default: full compute)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--json", type=Path, default=ROOT / "loadtest-results" / "breakdown.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="markdown file whose section to write")
    parser.add_argument("--no-doc", action="store_true", help="do not touch the markdown file")
    parser.add_argument("--omp-passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE on both sides: on a machine shared with other CPU-heavy work, "
                        "OpenMP threads spinning at barriers while a sibling is preempted can make a forward pass "
                        "several times slower, at random")
    args = parser.parse_args(argv)
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch loads OpenMP here; the server inherits it
    result = measure(args.runs, args.warmup, args.level, args.size)
    command = shlex.join(["python", "-m", "loadtest.breakdown", *(sys.argv[1:] if argv is None else argv)])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(table(result))
    print("\n".join(verdicts(result)))
    print(f"wrote {args.json}")
    if not args.no_doc:
        write_section(args.doc, section(result, command))
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
