"""Everything measured and shown for the demo weights: held-out quality tables, their docs, the README examples.

    python scripts/demo_assets.py                                  # every model with demo weights
    python scripts/demo_assets.py --models edaformer-t --count 128 --set /tmp/demo_heldout
    python scripts/demo_assets.py --heldout-only /tmp/demo_heldout # just write the held-out set

For each model with weights in models/weights/demo/, `segserve evaluate` runs on a generated held-out set
(ADE20K layout, scene seeds from DEMO_HELDOUT_SEED, never used in training; 256x256 and 320x240 images) over
the model's ladder x scales 1, 0.75, 0.5 and writes:

- models/weights/demo/<model>.quality.json   the quality table the server uses with the demo weights;
- docs/img/demo_quality_<model>.png          quality against latency, Pareto front highlighted;
- docs/demo_quality.md                       every model's table, with its training record.

Then examples/: a few generated scenes (JPEG) with the demo model's colour mask and overlay next to each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.cli import load_rgb, main, save_mask, save_overlay  # noqa: E402
from models.demo_scenes import (  # noqa: E402
    DEMO_HELDOUT_SEED,
    WEIGHTS_DIR,
    demo_weights_path,
    generate_scene,
    write_labelled_set,
)
from models.metrics import QualityTable, load_quality_table, markdown_table  # noqa: E402
from models.registry import list_models  # noqa: E402

DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
HELDOUT_SIZES = ((256, 256), (240, 320))
# (file stem, scene seed, height, width): seeds picked for varied content; one odd, non-square size.
EXAMPLE_SCENES = (("street", 20_000_005, 240, 320), ("lake", 20_000_003, 240, 320), ("town", 20_000_010, 240, 320),
                  ("park", 20_000_041, 217, 301))


def evaluate_model(model: str, heldout: Path, count: int, threads: int | None = None) -> Path:
    """`segserve evaluate` on the held-out set: the quality table and the plot for one model."""
    table_path = WEIGHTS_DIR / f"{model}.quality.json"
    code = main(["evaluate", str(heldout), "--model", model, "--checkpoint", str(demo_weights_path(model)),
                 "--limit", str(count), "--json", str(table_path), "--plot",
                 str(DOCS / "img" / f"demo_quality_{model}.png"), *(["--threads", str(threads)] if threads else [])])
    if code != 0:
        raise SystemExit(f"evaluate failed for {model} (exit code {code})")
    return table_path


def training_note(model: str) -> str:
    record_path = WEIGHTS_DIR / f"{model}.train.json"
    if not record_path.is_file():
        return ""
    record = json.loads(record_path.read_text())
    load = record["loadavg_before"][0], record["loadavg_after"][0]
    return (f"Trained by `scripts/train_demo.py --model {model}`: {record['steps']} steps of {record['batch_size']} "
            f"generated scenes ({record['size']}x{record['size']} crops), seed {record['seed']}, "
            f"{record['train_seconds'] / 60:.0f} min on {record['cpus']} shared CPU cores ({record['threads']} torch "
            f"thread(s); 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end).\n")


def spread_note(table: QualityTable) -> str:
    """What moves quality here: the knob's levels at scale 1 against the input scales at the training level."""
    levels = [e.miou for e in table.points if e.scale == 1.0]
    best_level = table.points[0].level
    by_scale = ", ".join(f"{e.miou:.1f} at scale {e.scale:g}" for e in table.points if e.level == best_level)
    knob = (f"Across the {len(levels)} levels at scale 1, mIoU stays within {min(levels):.1f}-{max(levels):.1f} "
            f"(agreement with the best point {min(e.agreement_miou for e in table.points if e.scale == 1.0):.1f} "
            "or more). " if len(levels) > 1 else "")
    return f"{knob}At the training level the input scale decides: {by_scale}.\n"


def write_docs(models: list[str]) -> Path:
    sections = [
        "# Demo weights: measured quality per operating point\n",
        "The demo weights are trained on procedurally generated outdoor scenes (`models/demo_scenes.py`: ten "
        "classes, each a shape and a texture) so that a first run shows real masks; they know nothing of real "
        "photographs. The tables below are `segserve evaluate` on a generated held-out set (scene seeds never "
        "used in training) and are committed as `models/weights/demo/<model>.quality.json`, the quality table "
        "served with those weights. Regenerate with `python scripts/demo_assets.py`.\n",
    ]
    for model in models:
        table = load_quality_table(WEIGHTS_DIR / f"{model}.quality.json")
        sections += [markdown_table(table, heading_level=2), spread_note(table), training_note(model),
                     f"![{model}: quality against latency](img/demo_quality_{model}.png)\n"]
    path = DOCS / "demo_quality.md"
    path.write_text("\n".join(sections))
    return path


def write_examples(model: str) -> list[Path]:
    """Generated scenes as JPEG, and what the demo model returns for each: a colour mask and an overlay."""
    import torch

    from models.datasets import dataset_for
    from models.predict import Predictor, pipeline_for
    from models.registry import create_model

    net = create_model(model, checkpoint=demo_weights_path(model)).eval()
    predictor = Predictor(net, pipeline_for(net.spec, dataset_for("demo", net.num_classes)))
    EXAMPLES.mkdir(exist_ok=True)
    written = []
    for stem, seed, height, width in EXAMPLE_SCENES:
        image, _ = generate_scene(seed, height, width)
        jpeg = EXAMPLES / f"{stem}.jpg"
        Image.fromarray(image).save(jpeg, quality=90)
        decoded = np.array(load_rgb(jpeg))  # what a client sends: the JPEG, not the raw scene
        with torch.inference_mode():
            labels = predictor.predict(decoded).labels
        save_mask(labels, EXAMPLES / f"{stem}_mask.png", net.meta.palette)
        save_overlay(decoded, labels, net.meta.palette, EXAMPLES / f"{stem}_overlay.jpg")
        written += [jpeg, EXAMPLES / f"{stem}_mask.png", EXAMPLES / f"{stem}_overlay.jpg"]
    return written


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma list (default: every model with demo weights)")
    parser.add_argument("--count", type=int, default=128, help="held-out scenes (default 128)")
    parser.add_argument("--set", help="where to write the held-out set (default: a temporary folder)")
    parser.add_argument("--examples-model", default="edaformer-t", help="the model whose masks examples/ shows")
    parser.add_argument("--threads", type=int, help="torch threads while measuring (default: torch's)")
    parser.add_argument("--skip-examples", action="store_true")
    parser.add_argument("--heldout-only", metavar="DIR", help="write the held-out set to DIR and stop")
    parser.add_argument("--docs-only", action="store_true", help="rewrite docs/demo_quality.md from the tables")
    return parser.parse_args()


def documented_models() -> list[str]:
    return [m for m in list_models() if (WEIGHTS_DIR / f"{m}.quality.json").is_file()]


def run(args: argparse.Namespace) -> None:
    if args.heldout_only:
        print(f"wrote {write_labelled_set(args.heldout_only, args.count, DEMO_HELDOUT_SEED, HELDOUT_SIZES)}")
        return
    if args.docs_only:
        print(f"wrote {write_docs(documented_models())}")
        return
    models = args.models.split(",") if args.models else [m for m in list_models() if demo_weights_path(m)]
    missing = [m for m in models if demo_weights_path(m) is None]
    if missing or not models:
        raise SystemExit(f"no demo weights for {', '.join(missing) or 'any model'}; train with scripts/train_demo.py")
    with tempfile.TemporaryDirectory() as scratch:
        heldout = Path(args.set or scratch)
        if not (heldout / "annotations").is_dir():
            write_labelled_set(heldout, args.count, DEMO_HELDOUT_SEED, HELDOUT_SIZES)
        for model in models:
            print(f"wrote {evaluate_model(model, heldout, args.count, args.threads)}")
    print(f"wrote {write_docs(documented_models())}")
    if not args.skip_examples:
        for path in write_examples(args.examples_model):
            print(f"wrote {path}")


if __name__ == "__main__":
    run(parse_args())
