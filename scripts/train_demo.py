"""Train the demo weights: a registered model on procedurally generated scenes (models/demo_scenes.py), on the CPU.

    nice -n 10 python scripts/train_demo.py --model edaformer-t            # -> models/weights/demo/edaformer-t.*
    python scripts/train_demo.py --model seaformer-t --steps 50 --out /tmp/x.safetensors   # a quick smoke run

Reproducible: the initial weights come from `--seed`, and sample i of the run is scene `TRAIN_SEED + i`
(drawn at a random size and cropped or padded to `--size`, an mmseg-style multi-scale crop), so the same
command on the same torch build gives the same weights up to floating-point reduction order across thread
counts. AdamW with a linear warm-up and mmseg's poly schedule (power 1), cross-entropy on the logits resized to
the crop. The weights are written as fp16 safetensors with the demo classes and palette in the metadata (what
`create_model(name, checkpoint=path)` reads; the model runs them in fp32), next to a `.train.json` that
records the run (settings, wall time, machine load, held-out mIoU at the training setting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.demo_scenes import DEMO, DEMO_HELDOUT_SEED, TRAIN_SEED, generate_scene
from models.metrics import MetricAccumulator
from models.predict import Predictor, pipeline_for
from models.registry import create_model, list_models

IGNORE = 255
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "models" / "weights" / "demo"


def training_sample(index: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample `index` of a run: a scene drawn at 0.6-1.5x the crop size (aspect jittered), flipped, sometimes
    JPEG-compressed (served images are), cropped or padded (label IGNORE) to size x size; RGB uint8 and labels."""
    rng = np.random.default_rng([seed, index])
    ratio, aspect = rng.uniform(0.6, 1.5), rng.uniform(0.85, 1.15)
    height, width = max(64, round(size * ratio * aspect)), max(64, round(size * ratio / aspect))
    image, labels = generate_scene(TRAIN_SEED + index, height, width)
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if rng.random() < 0.5:
        _, encoded = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]),
                                   [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 96))])
        image = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]
    top, left = int(rng.integers(0, max(1, height - size + 1))), int(rng.integers(0, max(1, width - size + 1)))
    image, labels = image[top:top + size, left:left + size], labels[top:top + size, left:left + size]
    padded_image = np.zeros((size, size, 3), np.uint8)
    padded_labels = np.full((size, size), IGNORE, np.uint8)
    padded_image[:image.shape[0], :image.shape[1]] = image
    padded_labels[:labels.shape[0], :labels.shape[1]] = labels
    return padded_image, padded_labels


def training_batch(start: int, batch_size: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized images (B, 3, size, size) and labels (B, size, size); padding is ignored by the loss."""
    samples = [training_sample(start + i, size, seed) for i in range(batch_size)]
    images = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2).float()
    mean, std = torch.tensor(DEMO.mean).view(1, 3, 1, 1), torch.tensor(DEMO.std).view(1, 3, 1, 1)
    labels = torch.from_numpy(np.stack([s[1] for s in samples])).long()
    return (images - mean) / std, labels


class _Batches(torch.utils.data.Dataset):
    """Batch i of a run, a pure function of i: loader workers change the speed, never the data."""

    def __init__(self, steps: int, batch_size: int, size: int, seed: int) -> None:
        self.steps, self.batch_size, self.size, self.seed = steps, batch_size, size, seed

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return training_batch(step * self.batch_size, self.batch_size, self.size, self.seed)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up from 1e-6 x peak, then mmseg's poly decay (power 1, min 0)."""
    poly = peak * (1 - step / total)
    if step < warmup:
        return poly * (1e-6 + (1 - 1e-6) * step / warmup)
    return poly


def heldout_miou(model: torch.nn.Module, count: int) -> float:
    """mIoU (percent) at the training setting on `count` held-out scenes, through the serving pipeline."""
    predictor = Predictor(model.eval(), pipeline_for(model.spec, DEMO))
    accumulator = MetricAccumulator(DEMO.num_classes)
    for index in tqdm(range(count), desc="held-out", leave=False):
        image, labels = generate_scene(DEMO_HELDOUT_SEED + index)
        accumulator.update(predictor.predict(image).labels, labels)
    return accumulator.scores().miou


def save_fp16(model: torch.nn.Module, path: Path, extra: dict[str, str]) -> None:
    """fp16 safetensors (integer buffers kept as they are) with the demo classes and palette as metadata."""
    from safetensors.torch import save_file

    tensors = {key: (value.half() if value.is_floating_point() else value).contiguous()
               for key, value in model.state_dict().items()}
    metadata = {"classes": json.dumps(list(DEMO.class_names)), "palette": json.dumps([list(c) for c in DEMO.palette]),
                "dataset": "demo", **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = create_model(args.model, num_classes=DEMO.num_classes, dataset="demo").train().to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    load_before, started = os.getloadavg(), time.perf_counter()
    losses: list[float] = []
    batches = torch.utils.data.DataLoader(_Batches(args.steps, args.batch_size, args.size, args.seed), batch_size=None,
                                          num_workers=args.workers, prefetch_factor=4 if args.workers else None)
    bar = tqdm(batches, desc=f"train {args.model}", unit="step")
    for step, (images, labels) in enumerate(bar):
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = images.to(args.device), labels.to(args.device)
        logits = F.interpolate(model(images), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", lr=f"{lr:.2e}", load=f"{os.getloadavg()[0]:.1f}")
    train_seconds = time.perf_counter() - started
    load_after = os.getloadavg()
    model = model.cpu()
    with torch.inference_mode():
        miou = heldout_miou(model, args.eval_count)
    record = {
        "model": args.model, "dataset": "demo", "steps": args.steps, "batch_size": args.batch_size, "size": args.size,
        "lr": args.lr, "weight_decay": args.weight_decay, "warmup": args.warmup, "seed": args.seed,
        "threads": args.threads, "device": args.device, "workers": args.workers,
        "train_seconds": round(train_seconds, 1),
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in load_after],
        "cpus": os.cpu_count(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__, "final_loss": round(float(np.mean(losses[-50:])), 4),
        "loss_every_100": [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)],
        "heldout_images": args.eval_count, "heldout_miou_training_level": round(miou, 2),
    }
    out = Path(args.out) if args.out else WEIGHTS_DIR / f"{args.model}.safetensors"
    save_fp16(model, out, {"model": args.model, "trained_on": "synthetic scenes (models/demo_scenes.py)",
                           "train_steps": str(args.steps), "seed": str(args.seed)})
    out.with_suffix(".train.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.model}: {args.steps} steps in {train_seconds / 60:.1f} min (load {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f}), held-out mIoU {miou:.1f} on {args.eval_count} scenes; wrote {out} "
          f"({out.stat().st_size / 1e6:.1f} MB)")
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="edaformer-t", help=f"one of {', '.join(list_models())}")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="training crop side (pixels)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and sampling")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device to train on (the weights are saved for the CPU)")
    parser.add_argument("--workers", type=int, default=0, help="scene-generating loader processes")
    parser.add_argument("--eval-count", type=int, default=64, help="held-out scenes scored at the end")
    parser.add_argument("--out", help="the .safetensors to write (default models/weights/demo/MODEL.safetensors)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
