"""Model commands of `segserve`: `predict`, `export-onnx`, `bench` and `evaluate`.

`service/cli.py` registers them with `add_model_subcommands(subparsers)`; each parser's `handler`
takes the parsed arguments and returns an exit code. `python -m models.cli ...` runs the same
commands without the service package:

    python -m models.cli predict street.jpg --model edaformer-t --checkpoint t_ade.pth --level 2211-222 -o mask.png
    python -m models.cli predict street.jpg --model lrformer-t --level s12 --scale 0.75 -o mask.png
    python -m models.cli export-onnx --model edaformer-t --level 2211/222 -o t_2211-222.onnx
    python -m models.cli bench --quick --json bench.json
    python -m models.cli evaluate data/ade_val --model edaformer-t --checkpoint t_ade.pth --json quality.json
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from models.spec import Level

log = logging.getLogger(__name__)
DATASET_CHOICES = ("ade20k", "cityscapes", "coco-stuff", "demo")


def _setup_logging(verbose: bool = False) -> None:
    # basicConfig is a no-op when the caller configured logging already; warnings always show.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        logging.getLogger("models").setLevel(logging.INFO)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="edaformer-t", help="registered model name (default edaformer-t)")
    parser.add_argument("--checkpoint", help="official mmseg .pth, a plain state dict or .safetensors")
    parser.add_argument("--dataset", choices=DATASET_CHOICES, help="class names, palette and test pipeline "
                        "(default: from the class count; ADE20K without a checkpoint)")
    parser.add_argument("--num-classes", type=int, help="head size without a checkpoint (default: the dataset's)")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--level", help="a value of the model's compute knob, by level name or as its family writes "
                       "it: EDAFormer 2211-222 or 2211/222, SegFormer 2211, LRFormer s12, DoViT t0.96 or dense "
                       "(default: the training setting; `segserve bench --list` shows each model's ladder)")
    level.add_argument("--isr", help="ISR setting as the official tools write it, e.g. 2211/222 (EDAFormer, SegFormer)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO")


def _level_from_args(args: argparse.Namespace) -> Level | None:
    """The knob level the user asked for (checked against the model's knob); None when none was given."""
    from models.registry import get_spec

    text = args.isr or args.level
    if not text:
        return None
    spec = get_spec(args.model)
    if args.isr and (spec.knob is None or spec.knob.name != "isr"):
        raise ValueError(f"{args.model} has no ISR knob; use --level (its levels: "
                         f"{', '.join(level.name for level in spec.ladder())})")
    try:
        return spec.level(text)
    except KeyError as unknown:
        if spec.knob is None:
            raise
        try:  # a valid value off the default ladder (e.g. ISR 4421/222) is accepted too
            return spec.knob.level(spec.knob.parse(text))
        except ValueError as invalid:
            if any(ch.isdigit() for ch in text) and "/" in text:
                raise invalid from None  # a malformed value: say what is wrong with it
            raise unknown from None


def _load_model(args: argparse.Namespace):  # -> EdaFormer; untyped to keep torch imports lazy
    import torch

    from models.registry import create_model

    if args.checkpoint is None:
        # Without a checkpoint the weights are random: seed them, so that two runs give the same mask.
        torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.num_classes, checkpoint=args.checkpoint, dataset=args.dataset)
    return model.eval()


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3), upright as viewers show it (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def save_mask(labels: np.ndarray, path: str | Path, palette: Sequence[Sequence[int]] | None = None) -> None:
    """A label map as PNG: 8-bit grey (class ids), 16-bit above 256 classes, or a palette PNG."""
    from PIL import Image

    if palette is not None:
        if len(palette) > 256:
            raise ValueError(f"a palette PNG holds at most 256 colours, the model has {len(palette)} classes")
        image = Image.fromarray(labels.astype(np.uint8))  # "L"; putpalette turns it into "P"
        image.putpalette([channel for color in palette for channel in color])
    elif labels.max(initial=0) < 256:
        image = Image.fromarray(labels.astype(np.uint8))
    else:
        image = Image.fromarray(labels.astype(np.uint16))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def save_overlay(image: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]], path: str | Path,
                 alpha: float = 0.5) -> None:
    """The image blended with its mask's class colours (PNG, or JPEG by the file's extension)."""
    from PIL import Image

    from models.postprocess import overlay

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, labels, palette, alpha)).save(path)


def _user_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report a bad argument or file as one line and exit code 2, not as a traceback."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from models.checkpoint import CheckpointError

        try:
            return handler(args)
        except (ValueError, KeyError, FileNotFoundError, CheckpointError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"segserve {args.command}: error: {message}", file=sys.stderr)
            return 2

    return run


@_user_errors
def cmd_predict(args: argparse.Namespace) -> int:
    """segserve predict IMAGE [-o mask.png]: the official test pipeline on one image."""
    _setup_logging(args.verbose)
    from models.datasets import dataset_for
    from models.predict import Predictor, pipeline_for

    level = _level_from_args(args)  # argument and file errors first, before seconds of model loading
    if not 0 < args.scale <= 4:
        raise ValueError(f"--scale {args.scale} must be in (0, 4]")
    image = load_rgb(args.image)
    model = _load_model(args)
    if model.meta.weights == "random":
        print(f"segserve predict: warning: no --checkpoint, so {args.model} runs on seeded RANDOM weights; the mask "
              "shows the mechanics, not real classes", file=sys.stderr)
    dataset = pipeline_for(model.spec, dataset_for(args.dataset, model.num_classes))
    run = model
    if args.onnx:
        from models.onnx_runner import OnnxRunner

        run = OnnxRunner(args.onnx)
        if run.model_name != model.meta.name or run.num_classes not in (None, model.num_classes):
            raise ValueError(f"{args.onnx} holds {run.model_name} with {run.num_classes} classes, not "
                             f"{model.meta.name} with {model.num_classes}")
        if level is not None and run.levels and level not in run.levels:
            raise ValueError(f"{args.onnx} was exported at level {run.levels[0].name}, not {level.name}")
        level = level or (run.levels[0] if run.levels else None)
    level = level or model.spec.training_level()
    start = time.perf_counter()
    prediction = Predictor(run, dataset).predict(image, level, scale=args.scale)
    seconds = time.perf_counter() - start
    if args.overlay:
        save_overlay(image, prediction.labels, model.meta.palette, args.output)
    else:
        save_mask(prediction.labels, args.output, model.meta.palette if args.color else None)
    classes, counts = np.unique(prediction.labels, return_counts=True)
    top = sorted(zip(counts.tolist(), classes.tolist(), strict=True), reverse=True)[:5]
    names = model.meta.class_names
    share = ", ".join(f"{names[c] if c < len(names) else c} {n / prediction.labels.size:.0%}" for n, c in top)
    stats = "".join(f", {key} {[round(v, 3) for v in values]}" for key, values in prediction.stats.items())
    print(f"{args.image}: {image.shape[1]}x{image.shape[0]} -> network {prediction.input_size[1]}x"
          f"{prediction.input_size[0]} ({dataset.name}, {dataset.test_mode}), level {level.name}, scale "
          f"{args.scale:g}, {seconds * 1000:.0f} ms{stats}; wrote {args.output} ({share})")
    return 0


def _parse_parity_sizes(text: str) -> list[tuple[int, int, int]]:
    """'512x512,384x640,2x256x256' -> [(1, 512, 512), (1, 384, 640), (2, 256, 256)] (B x H x W or H x W)."""
    sizes = []
    for item in text.split(","):
        parts = [int(p) for p in item.lower().split("x")]
        if len(parts) not in (2, 3):
            raise argparse.ArgumentTypeError(f"parity size {item!r} is neither HxW nor BxHxW")
        sizes.append(tuple(parts) if len(parts) == 3 else (1, *parts))
    return sizes  # type: ignore[return-value]


@_user_errors
def cmd_export_onnx(args: argparse.Namespace) -> int:
    """segserve export-onnx -o model.onnx: export one ISR level, then check parity at several sizes."""
    _setup_logging(args.verbose)
    from models.export import OnnxParityError, check_parity, export_onnx

    level = _level_from_args(args)
    model = _load_model(args)
    level = level or model.spec.training_level()
    sizes = _parse_parity_sizes(args.parity_sizes) if args.parity_sizes else None
    path = export_onnx(model, args.output, level, opset=args.opset, progress=True)
    print(f"exported {args.model} at level {level.name} to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    try:
        diffs = check_parity(model, path, level, sizes, tolerance=args.tolerance, progress=True)
    except OnnxParityError as exc:
        print(f"PARITY FAILED: {exc}\n{path} does not compute what the torch model does; do not serve it.",
              file=sys.stderr)
        return 1
    print(f"parity with torch (ONNX Runtime, max |logits difference| / std, tolerance {args.tolerance:g}):")
    for (batch, height, width), diff in diffs:
        print(f"  batch {batch} {height}x{width}: {diff:.2e}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """segserve bench: see `models.bench`."""
    _setup_logging(verbose=True)
    from models.bench import run_from_args

    return run_from_args(args)


@_user_errors
def cmd_evaluate(args: argparse.Namespace) -> int:
    """segserve evaluate FOLDER: measured quality (mIoU, or agreement without labels) and latency per operating
    point; see `models.evaluate`."""
    _setup_logging(args.verbose)
    from models.evaluate import run_from_args

    return run_from_args(args)


def add_model_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `predict`, `export-onnx`, `bench` and `evaluate`; each sets `handler(args) -> exit code`."""
    from models.bench import add_bench_arguments
    from models.evaluate import add_evaluate_arguments
    from models.export import DEFAULT_OPSET, PARITY_SIZES, PARITY_TOLERANCE

    predict = subparsers.add_parser("predict", help="segment one image and write the label map as PNG",
                                    description=cmd_predict.__doc__)
    predict.add_argument("image", help="PNG, JPEG or any format Pillow reads")
    _add_model_options(predict)
    predict.add_argument("--scale", type=float, default=1.0, help="input scale: the network input is the test "
                         "pipeline's size times this factor (default 1.0); the mask keeps the image's size")
    predict.add_argument("--color", action="store_true", help="write a palette PNG in the dataset's colours")
    predict.add_argument("--overlay", action="store_true", help="write the image blended with the class colours")
    predict.add_argument("--onnx", help="run this exported graph (ONNX Runtime) instead of torch")
    predict.add_argument("-o", "--output", required=True, help="output PNG (the input image's size)")
    predict.set_defaults(handler=cmd_predict)

    export = subparsers.add_parser("export-onnx", help="export one level to ONNX and check it against torch",
                                   description=cmd_export_onnx.__doc__)
    _add_model_options(export)
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    default_sizes = ",".join(f"{b}x{h}x{w}" for b, h, w in PARITY_SIZES)
    export.add_argument("--parity-sizes", help=f"BxHxW or HxW list (default: the model's, e.g. {default_sizes})")
    export.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE,
                        help="max |logits difference| / std of the logits")
    export.set_defaults(handler=cmd_export_onnx)

    bench = subparsers.add_parser("bench", help="eager torch vs ONNX Runtime per ISR level, vs the matmul ceiling")
    add_bench_arguments(bench)
    bench.set_defaults(handler=cmd_bench)

    evaluate = subparsers.add_parser("evaluate", help="mIoU (or agreement) and latency per operating point on a "
                                     "folder; writes the quality table the planner reads",
                                     description=cmd_evaluate.__doc__)
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.cli", description=__doc__.split("\n")[0])
    add_model_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
