"""GPU measurements for issue 14, in one run: per model and knob level, ms per batch and images per second at
512x512 and 1024x2048 for batch 1, 8 and 32 in fp32 (TF32 off and on), bf16 and fp16 autocast; the full-resolution
mask's pixel agreement of bf16/fp16 with fp32; ONNX Runtime's CUDA provider for the smallest variants.

    python scripts/gpu_bench.py --out results/ [--models segformer-b0,edaformer-t] [--quick] [--device cpu]

`--device cpu --quick` checks the script itself on a machine without a GPU. Every case is time-boxed and skipped
(with its reason) when it would not fit in memory or time; results go to `gpu_bench.json` and `gpu_bench.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import create_model, list_models

PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = {"512x512": (512, 512), "1024x2048": (1024, 2048)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def precision(name: str, device: str):
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    dtype = PRECISIONS[name]
    with torch.autocast(device_type=device, dtype=dtype) if dtype is not None else contextlib.nullcontext():
        yield


def time_forward(model, images, level, device: str, name: str, repeats: int, budget_s: float) -> list[float]:
    with torch.inference_mode(), precision(name, device):
        model(images, **level.kwargs)  # warm-up: kernel selection, allocation
        sync(device)
        samples = []
        start = time.perf_counter()
        while len(samples) < repeats and time.perf_counter() - start < budget_s:
            begin = time.perf_counter()
            model(images, **level.kwargs)
            sync(device)
            samples.append(time.perf_counter() - begin)
    return samples


def agreement(model, images, level, device: str, name: str, reference: torch.Tensor) -> float:
    with torch.inference_mode(), precision(name, device):
        logits = model(images, **level.kwargs).float()
    size = images.shape[-2:]
    labels = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)
    return float((labels == reference).float().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default=",".join(list_models()))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--quick", action="store_true", help="one tiny case per model (a check of the script)")
    parser.add_argument("--case-budget-s", type=float, default=4.0)
    parser.add_argument("--render", default=None, help="measure nothing: print the table of this JSON-lines log "
                        "(the rows the script prints, one per line)")
    args = parser.parse_args()
    if args.render:
        lines = Path(args.render).read_text().splitlines()
        print(render([json.loads(line) for line in lines if line.startswith("{")]), end="")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    sizes = {"256x256": (256, 256)} if args.quick else SIZES
    batches = [1] if args.quick else [int(b) for b in args.batches.split(",")]
    precisions = ["fp32"] if args.quick and device == "cpu" else list(PRECISIONS)
    rows, started = [], time.time()
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = create_model(name).eval().to(device)
        ladder = model.spec.ladder()
        for level in dict.fromkeys([ladder[0], ladder[-1]]):
            for size_name, (height, width) in sizes.items():
                probe = torch.randn(1, 3, height, width, device=device)
                with torch.inference_mode():
                    logits = model(probe, **level.kwargs).float()
                    reference = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear",
                                                                align_corners=False).argmax(1)
                for batch in batches:
                    images = probe.expand(batch, -1, -1, -1).contiguous()
                    for prec in precisions:
                        row = {"model": name, "level": level.name, "size": size_name, "batch": batch,
                               "precision": prec}
                        try:
                            samples = time_forward(model, images, level, device, prec, 20, args.case_budget_s)
                            ms = statistics.median(samples) * 1e3
                            row.update(ms_per_batch=round(ms, 3), images_per_s=round(batch * 1e3 / ms, 1),
                                       runs=len(samples))
                            if batch == 1 and prec in ("bf16", "fp16"):
                                row["pixel_agreement"] = round(agreement(model, probe, level, device, prec,
                                                                         reference), 5)
                        except torch.OutOfMemoryError:
                            row["note"] = "out of memory"
                            torch.cuda.empty_cache()
                        except RuntimeError as exc:
                            row["note"] = f"{type(exc).__name__}: {str(exc)[:80]}"
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "elapsed_s": round(time.time() - started, 1), "rows": rows}
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_bench.md").write_text(render(rows))
    print(f"wrote {out}/gpu_bench.json and .md in {report['elapsed_s']} s")
    return 0


def render(rows: list[dict]) -> str:
    """One line per model, level, size and batch: ms per batch (images/s) per precision, and the bf16/fp16
    masks' pixel agreement with fp32 (measured at batch 1)."""
    names = list(PRECISIONS)
    lines = ["| model | level | size | batch | " + " | ".join(f"{p} ms (img/s)" for p in names)
             + " | agreement bf16 / fp16 |", "|---|---|---|---:|" + "---:|" * len(names) + "---|"]
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cases.setdefault((row["model"], row["level"], row["size"], row["batch"]), {})[row["precision"]] = row
    agreement_of = {(m, lv, size): cell for (m, lv, size, b), cell in cases.items() if b == 1}
    for (model, level, size, batch), cell in cases.items():
        timings = [f"{cell[p]['ms_per_batch']:.1f} ({cell[p]['images_per_s']:.0f})" if "ms_per_batch" in
                   cell.get(p, {}) else cell.get(p, {}).get("note", "–") for p in names]
        ones = agreement_of.get((model, level, size), {})
        agree = " / ".join(f"{ones[p]['pixel_agreement']:.4f}" if "pixel_agreement" in ones.get(p, {}) else "–"
                           for p in ("bf16", "fp16")) if batch == 1 else ""
        lines.append(f"| {model} | {level} | {size} | {batch} | " + " | ".join(timings) + f" | {agree} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
