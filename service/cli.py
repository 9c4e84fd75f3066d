"""The `segserve` command: `serve`, plus the model tools (`predict`, `export-onnx`, `bench`) and `loadtest`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the HTTP (and gRPC) server",
        description="Every option is also an environment variable SEGSERVE_<NAME> (e.g. SEGSERVE_PORT).",
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--grpc-port", type=int, help="also serve gRPC on this port")
    serve.add_argument("--config", help="model repository file (TOML or YAML): several models at once")
    serve.add_argument("--model", dest="models", action="append", metavar="NAME[:CHECKPOINT]",
                       help="serve this model (repeatable; default: edaformer-t with its demo weights)")
    serve.add_argument("--checkpoint", help="official .pth, .bin or .safetensors of the single model")
    serve.add_argument("--random-weights", action="store_true", default=None,
                       help="serve random weights even where demo weights exist (architecture only)")
    serve.add_argument("--dataset", choices=["ade20k", "cityscapes", "coco-stuff", "demo"])
    serve.add_argument("--scales", help="input scales offered, e.g. 1,0.75,0.5 (default)")
    serve.add_argument("--quality-table", help="quality table (segserve evaluate --json) of the single model")
    serve.add_argument("--device", choices=["cpu", "cuda"])
    serve.add_argument("--workers", type=int)
    serve.add_argument("--backend", choices=["torch", "onnx"])
    serve.add_argument("--levels", help="comma-separated knob level names to serve (default: the whole ladder)")
    serve.add_argument("--redis-url", help="share the result cache through Redis")
    serve.add_argument("--max-batch-size", type=int)
    serve.add_argument("--calibration-shape", help="HxW at which levels are calibrated, e.g. 512x512")
    serve.add_argument("--log-level")
    serve.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from service.server import serve
    from service.settings import Settings

    # Only options given on the command line override the environment and the defaults.
    overrides = {
        key: value for key, value in vars(args).items()
        if key not in {"command", "handler"} and value is not None
    }
    if "models" in overrides:
        models = tuple(overrides.pop("models"))
        if len(models) == 1 and ":" not in models[0]:
            overrides["model"] = models[0]  # one plain --model: the single-model settings (levels, checkpoint) apply
        else:
            overrides["models"] = models
    try:
        settings = Settings(**overrides)
    except ValueError as exc:  # pydantic's ValidationError: name the setting, no traceback
        first = exc.errors()[0] if hasattr(exc, "errors") and exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        print(f"segserve serve: error: {where}: {first.get('msg', exc)}", file=sys.stderr)
        return 2
    return serve(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segserve", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    from models.cli import add_model_subcommands

    add_model_subcommands(subparsers)
    # Always registered: loadtest.cli imports only the standard library, and its commands name the extra
    # ("loadtest") to install when matplotlib or httpx are missing.
    from loadtest.cli import add_loadtest_subcommand

    add_loadtest_subcommand(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch loads OpenMP: spinning OpenMP threads starve the event loop, decoding and encoding
    # threads that share the cores with the model, and make latency erratic (measured: forward passes
    # 0.35 s steady with PASSIVE, 0.9-5.7 s with the default spin under concurrent CPU work).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
