"""Model commands of `segserve`: `predict`, `export-onnx` and `bench`.

`service/cli.py` registers them with `add_model_subcommands(subparsers)`; each parser's `handler`
takes the parsed arguments and returns an exit code. `python -m models.cli ...` runs the same
commands without the service package:

    python -m models.cli predict street.jpg --model edaformer-t --checkpoint t_ade.pth --level 2211-222 -o mask.png
    python -m models.cli export-onnx --model edaformer-t --isr 2211/222 -o t_2211-222.onnx
    python -m models.cli bench --quick --json bench.json
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

from models.isr import LADDER, IsrConfig, level_by_name

log = logging.getLogger(__name__)
DATASET_CHOICES = ("ade20k", "cityscapes", "coco-stuff")


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
    isr = parser.add_mutually_exclusive_group()
    isr.add_argument("--isr", help="ISR setting as the official tools write it, e.g. 2211/222 (default 1111/111)")
    isr.add_argument("--level", help="a named ISR level: " + ", ".join(level.name for level in LADDER))
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO")


def _isr_from_args(args: argparse.Namespace) -> IsrConfig | None:
    """The ISR the user asked for; None when neither --isr nor --level was given."""
    if args.isr:
        return IsrConfig.parse(args.isr)
    if args.level:
        try:
            return level_by_name(args.level).isr
        except KeyError:
            if "/" in args.level:  # a code such as '2211/222' passed to --level is accepted too
                return IsrConfig.parse(args.level)
            raise
    return None


def _load_model(args: argparse.Namespace):  # -> EdaFormer; untyped to keep torch imports lazy
    from models.registry import create_model

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
    from models.predict import Predictor

    isr = _isr_from_args(args)  # argument and file errors first, before seconds of model loading
    image = load_rgb(args.image)
    model = _load_model(args)
    dataset = dataset_for(args.dataset, model.num_classes)
    run = model
    if args.onnx:
        from models.onnx_runner import OnnxRunner

        run = OnnxRunner(args.onnx, isr)
        if run.num_classes not in (None, model.num_classes):
            raise ValueError(f"{args.onnx} has {run.num_classes} classes, the model {model.num_classes}")
        isr = isr or run.isr_configs[0]
    start = time.perf_counter()
    prediction = Predictor(run, dataset).predict(image, isr or IsrConfig())
    seconds = time.perf_counter() - start
    save_mask(prediction.labels, args.output, model.meta.palette if args.color else None)
    classes, counts = np.unique(prediction.labels, return_counts=True)
    top = sorted(zip(counts.tolist(), classes.tolist(), strict=True), reverse=True)[:5]
    names = model.meta.class_names
    share = ", ".join(f"{names[c] if c < len(names) else c} {n / prediction.labels.size:.0%}" for n, c in top)
    print(f"{args.image}: {image.shape[1]}x{image.shape[0]} -> network {prediction.input_size[1]}x"
          f"{prediction.input_size[0]} ({dataset.name}, {dataset.test_mode}), ISR {(isr or IsrConfig()).code}, "
          f"{seconds * 1000:.0f} ms; wrote {args.output} ({share})")
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

    model = _load_model(args)
    isr = _isr_from_args(args) or IsrConfig()
    sizes = _parse_parity_sizes(args.parity_sizes)
    path = export_onnx(model, args.output, isr, opset=args.opset, progress=True)
    print(f"exported {args.model} with ISR {isr.code} to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    try:
        diffs = check_parity(model, path, isr, sizes, tolerance=args.tolerance, progress=True)
    except OnnxParityError as exc:
        print(f"PARITY FAILED: {exc}\n{path} does not compute what the torch model does; do not serve it.",
              file=sys.stderr)
        return 1
    print(f"parity with torch (ONNX Runtime, max |logits difference|, tolerance {args.tolerance:g}):")
    for (batch, height, width), diff in diffs:
        print(f"  batch {batch} {height}x{width}: {diff:.2e}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """segserve bench: see `models.bench`."""
    _setup_logging(verbose=True)
    from models.bench import run_from_args

    return run_from_args(args)


def add_model_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `predict`, `export-onnx` and `bench`; each sets `handler(args) -> exit code`."""
    from models.bench import add_bench_arguments
    from models.export import DEFAULT_OPSET, PARITY_SIZES, PARITY_TOLERANCE

    predict = subparsers.add_parser("predict", help="segment one image and write the label map as PNG",
                                    description=cmd_predict.__doc__)
    predict.add_argument("image", help="PNG, JPEG or any format Pillow reads")
    _add_model_options(predict)
    predict.add_argument("--color", action="store_true", help="write a palette PNG in the dataset's colours")
    predict.add_argument("--onnx", help="run this exported graph (ONNX Runtime) instead of torch")
    predict.add_argument("-o", "--output", required=True, help="output PNG (the input image's size)")
    predict.set_defaults(handler=cmd_predict)

    export = subparsers.add_parser("export-onnx", help="export one ISR level to ONNX and check it against torch",
                                   description=cmd_export_onnx.__doc__)
    _add_model_options(export)
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    default_sizes = ",".join(f"{b}x{h}x{w}" for b, h, w in PARITY_SIZES)
    export.add_argument("--parity-sizes", default=default_sizes, help=f"BxHxW or HxW list (default {default_sizes})")
    export.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE, help="max |logits difference|")
    export.set_defaults(handler=cmd_export_onnx)

    bench = subparsers.add_parser("bench", help="eager torch vs ONNX Runtime per ISR level, vs the matmul ceiling")
    add_bench_arguments(bench)
    bench.set_defaults(handler=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.cli", description=__doc__.split("\n")[0])
    add_model_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
