"""Baseline (a): the same model behind a plain FastAPI endpoint, as a user would write it.

One request at a time (an `asyncio.Lock` around a thread running the model), always at full compute,
no batching, no queue bound, no cache, no budget. Same model, same weights (random unless a
checkpoint is given), same test pipeline (`models.predict.Predictor`) and the same output (an 8-bit
label-map PNG) as segserve, so the comparison is about serving, not about the model.

    python -m loadtest.baseline_server --port 8090 --resize-scale 1024x256

`GET /inflight` exists only for the load test, which waits for the server to go idle between steps.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response
from PIL import Image, UnidentifiedImageError

from models import create_model
from models.datasets import dataset_for
from models.predict import Predictor, pipeline_for


def build_app(model_name: str = "edaformer-t", checkpoint: str | None = None, dataset: str = "ade20k",
              resize_scale: tuple[int, int] | None = None, device: str = "cpu") -> FastAPI:
    model = create_model(model_name, checkpoint=checkpoint, dataset=dataset).eval().to(device)
    info = dataset_for(model.meta.dataset, model.meta.num_classes)
    if resize_scale is not None:
        # The same override segserve applies for SEGSERVE_RESIZE_SCALE, so both see the same inputs.
        info = dataclasses.replace(info, resize_scale=resize_scale)
    predictor = Predictor(lambda images, **knob: model(images.to(device), **knob).float().cpu(),
                          pipeline_for(model.spec, info))
    full = model.spec.training_level()
    lock = asyncio.Lock()
    state = {"inflight": 0}

    def segment_bytes(data: bytes) -> bytes:
        try:
            rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise HTTPException(400, f"not an image: {exc}") from exc
        labels = predictor.predict(rgb, full).labels
        buffer = io.BytesIO()
        # zlib level 1, as segserve writes its PNGs: the comparison should not hinge on PNG settings.
        Image.fromarray(labels.astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    app = FastAPI(title="plain segmentation endpoint")

    @app.post("/v1/segment")
    async def segment(request: Request) -> Response:
        state["inflight"] += 1
        try:
            data = await request.body()
            async with lock:  # one request at a time: the model gets all cores, as in a notebook
                body = await asyncio.to_thread(segment_bytes, data)
            return Response(body, media_type="image/png")
        finally:
            state["inflight"] -= 1

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/inflight")
    async def inflight() -> dict:
        return {"inflight": state["inflight"]}

    # One warm-up pass so the first measured request does not pay one-time allocation costs.
    predictor.predict(np.zeros((256, 256, 3), dtype=np.uint8), full)
    return app


def parse_size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    long_side, short_side = (int(v) for v in text.lower().split("x"))
    return long_side, short_side


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.baseline_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--model", default="edaformer-t")
    parser.add_argument("--checkpoint")
    parser.add_argument("--dataset", default="ade20k")
    parser.add_argument("--resize-scale", help="LONGxSHORT keep-ratio scale, as SEGSERVE_RESIZE_SCALE")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    app = build_app(args.model, args.checkpoint, args.dataset, parse_size(args.resize_scale), args.device)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
