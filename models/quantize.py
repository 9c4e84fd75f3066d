"""int8 ONNX graphs: static quantization with ONNX Runtime, calibrated on generated photo-like images.

    paths = int8_graphs(model, model.spec.ladder()[:2])       # cached next to the fp32 graphs
    runner = OnnxRunner(paths)                                # runs them like the fp32 ones
    agreement = mask_agreement(OnnxRunner(fp32_paths), runner, model, level)  # fraction of pixels, per image

Each int8 graph is quantized from the level's fp32 graph (`models.onnx_cache.cached_graphs`) by
`onnxruntime.quantization.quantize_static`: QDQ format, uint8 activations with min-max ranges from the
calibration images, int8 weights per output channel. The calibration images are photo-like (smooth colour
fields, edges and mild noise; white noise would give ranges no photo produces) and preprocessed exactly as
the model's test pipeline does (resize, alignment, normalization; the first sliding window for families that
slide). Which ops are quantized is part of the recipe: convolutions and matrix products for the transformer
families, where quantizing adds, softmax and norms costs agreement and buys no speed; every op ORT can
quantize for SeaFormer, whose convolutions only pay off when the int8 tensors flow between them; DoViT's mask
head stays fp32 (`FP32_SCOPES`). Measured on this machine, see docs/benchmarks.md. The recipe's digest, with
the ONNX Runtime release, is part of the cache key, and the graph keeps the fp32 graph's segserve metadata plus
its precision and recipe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from tqdm.auto import tqdm

from models.datasets import DatasetInfo, dataset_for
from models.onnx_cache import DEFAULT_CACHE_DIR, cached_graphs, int8_graph_path
from models.onnx_runner import META_INT8_RECIPE, META_PRECISION
from models.predict import LogitsFn, Predictor, network_input_size, pipeline_for, preprocess, slide_windows
from models.spec import Level, ModelSpec

log = logging.getLogger(__name__)

# Families whose int8 graph quantizes every op ORT can (a conv-only network: int8 flows between the convs);
# the others quantize convolutions and matrix products only.
ALL_OPS_FAMILIES = ("seaformer",)
MATMUL_CONV_OPS = ("Conv", "MatMul", "Gemm")
# Modules kept in fp32. DoViT's Segmenter mask head ends in a LayerNorm over the class masks, which magnifies the
# int8 error of the patch-class products: DoViT-S's masks agreed with fp32 on 13-79% of pixels with the head in
# int8, 94-97% with it in fp32, at the same speed (the head is a few % of the MACs). EDAFormer-T gained 1 point
# from the same exclusion of its (much heavier) decoder: not worth its speed.
FP32_SCOPES = {"dovit": ("decode_head",)}


@dataclass(frozen=True)
class Int8Recipe:
    """How an int8 graph is made; every field is part of its cache key.

    Args:
        op_types: ONNX op types to quantize (empty: every op ORT can quantize).
        quant_format: "qdq" (QuantizeLinear/DequantizeLinear pairs ORT fuses into QLinear kernels) or "qoperator".
        per_channel: one weight scale per output channel (else one per tensor).
        fp32_scopes: module paths (e.g. "decode_head") whose nodes stay fp32, found by the name scopes the dynamo
            exporter records on every node.
        images: calibration images per size; sizes: their (H, W) before the test pipeline resizes them.
        seed: of the generated images.
    """

    op_types: tuple[str, ...] = MATMUL_CONV_OPS
    quant_format: str = "qdq"
    per_channel: bool = True
    activations: str = "uint8"
    weights: str = "int8"
    calibration: str = "minmax"
    fp32_scopes: tuple[str, ...] = ()
    images: int = 2
    sizes: tuple[tuple[int, int], ...] = ((512, 512), (384, 640))
    seed: int = 0

    def digest(self) -> str:
        """12 hex digits over the fields and the ONNX Runtime release (its quantizer writes the graph)."""
        text = json.dumps({**asdict(self), "onnxruntime": ort.__version__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_recipe(spec: ModelSpec) -> Int8Recipe:
    """The recipe measured best for the family (see the module docstring)."""
    return Int8Recipe(op_types=() if spec.family in ALL_OPS_FAMILIES else MATMUL_CONV_OPS,
                      fp32_scopes=FP32_SCOPES.get(spec.family, ()))


def photo_like_images(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """RGB uint8 (H, W, 3) images with what photos have and noise lacks: smooth colour gradients, a few flat
    regions with sharp edges (ellipses and a horizon), fine texture and mild sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for index in range(count):
        phase = index * 0.7 + rng.uniform(0, 3)
        rgb = np.stack([
            127 + 110 * np.sin(xx / (37 + 5 * index) + phase),
            127 + 110 * np.cos(yy / (29 + 3 * index) - phase),
            255 * (xx + yy) / (height + width),
        ], axis=-1)
        horizon = int(height * rng.uniform(0.3, 0.6))
        rgb[horizon:] = 0.5 * rgb[horizon:] + 0.5 * rng.uniform(40, 200, 3)
        for _ in range(4):
            centre = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
            axes = (int(rng.uniform(0.05, 0.25) * width) + 1, int(rng.uniform(0.05, 0.25) * height) + 1)
            cv2.ellipse(rgb, centre, axes, float(rng.uniform(0, 180)), 0, 360, rng.uniform(0, 255, 3).tolist(), -1)
        rgb += 12 * np.sin(xx * 1.3 + yy * 0.7)[..., None] + rng.normal(0, 5, (height, width, 3))
        images.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return images


def model_pipeline(model: torch.nn.Module) -> DatasetInfo:
    """The model's test pipeline on its dataset (ADE20K when it names none)."""
    return pipeline_for(model.spec, dataset_for(model.meta.dataset, model.num_classes))


def network_inputs(model: torch.nn.Module, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """(1, 3, h, w) normalized inputs as the test pipeline makes them; the first window where it slides."""
    pipeline = model_pipeline(model)
    inputs = []
    for image in images:
        size = network_input_size(*image.shape[:2], pipeline)
        pixels = preprocess(image, size, pipeline.mean, pipeline.std)
        if pipeline.test_mode == "slide" and pipeline.slide_crop and pipeline.slide_stride:
            y1, y2, x1, x2 = slide_windows(*size, pipeline.slide_crop, pipeline.slide_stride)[0]
            pixels = pixels[:, :, y1:y2, x1:x2].contiguous()
        inputs.append(pixels)
    return inputs


def calibration_inputs(model: torch.nn.Module, recipe: Int8Recipe) -> list[torch.Tensor]:
    images = [image for index, (height, width) in enumerate(recipe.sizes)
              for image in photo_like_images(recipe.images, height, width, recipe.seed + index)]
    return network_inputs(model, images)


def calibration_feeds(model: torch.nn.Module, recipe: Int8Recipe) -> list[dict[str, np.ndarray]]:
    """The graph inputs that calibrate it. A graph whose knob is an input (one graph for every level) sees the
    ladder's values in turn, so that its ranges cover every level the service may ask for."""
    knob = model.spec.knob
    values = [level.value for level in model.spec.ladder()] if knob is not None and knob.runtime_input else []
    feeds = []
    for index, pixels in enumerate(calibration_inputs(model, recipe)):
        feed = {"images": pixels.numpy()}
        if values:
            feed["knob"] = np.asarray(float(values[index % len(values)]), np.float32)  # type: ignore[arg-type]
        feeds.append(feed)
    return feeds


def calibrate_batchnorm_(model: torch.nn.Module, images: torch.Tensor, variance_floor: float = 1.0) -> torch.nn.Module:
    """For RANDOM weights only: BatchNorm running statistics from one train-mode pass over `images` (normalized
    (B, 3, H, W)), and all-zero BN scales set to one, so that activations keep a realistic scale through the
    depth. Random running statistics let BN-only networks collapse to one class (specs/seaformer.md), which
    makes int8 calibration and mask agreement meaningless. Each variance is floored at `variance_floor` x its
    layer's mean: with per-channel variances, near-dead channels amplify float rounding through the depth of
    random networks (SeaFormer-T fp32 vs fp64: 3e-4 x std with a 0.05 floor, 5e-6 with 1.0, beyond and within
    the ONNX parity bound of 1e-4)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    with torch.no_grad():
        for norm in norms:
            if norm.weight is not None and not norm.weight.any():
                norm.weight.fill_(1.0)
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: exactly this batch's statistics
            norm.train()
        model(images)
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.running_var.clamp_(min=variance_floor * float(norm.running_var.mean()))
            norm.momentum = momentum
            norm.eval()
    return model


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _quant_type(name: str) -> QuantType:
    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def _no_preprocess_hint(record: logging.LogRecord) -> bool:
    """Drops the quantizer's advice to run its shape-inference pre-processing, logged on the root logger at every
    call: it fails on graphs with data-dependent shapes (DoViT) and measured no faster on ours."""
    return "pre-process" not in record.getMessage()


def nodes_in_scopes(proto: onnx.ModelProto, scopes: Sequence[str]) -> list[str]:
    """Names of the nodes that the dynamo exporter recorded under any of these module paths (relative to the
    exported model, whose export wrapper holds it as `model`)."""
    names = []
    for node in proto.graph.node:
        recorded = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        paths = [part.strip(" '[]") for part in recorded.split(",")]
        paths = [path.split(".", 1)[1] for path in paths if "." in path]  # drop the wrapper's `model.`
        if any(path == scope or path.startswith(scope + ".") for path in paths for scope in scopes):
            names.append(node.name)
    return names


def quantize_graph(fp32_path: Path, out_path: Path, feeds: list[dict[str, np.ndarray]], recipe: Int8Recipe) -> Path:
    """Quantize one fp32 graph with `recipe`, calibrated on `feeds` (the graph's input dicts); the result keeps
    the fp32 graph's metadata and adds its precision and recipe. Written atomically."""
    tmp = out_path.with_suffix(f".{os.getpid()}.tmp")
    excluded = nodes_in_scopes(onnx.load(str(fp32_path), load_external_data=False), recipe.fp32_scopes)
    if recipe.fp32_scopes and not excluded:
        raise ValueError(f"{fp32_path.name} has no node under {recipe.fp32_scopes} (a TorchScript export records no "
                         "module paths); the recipe cannot keep them in fp32")
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    root = logging.getLogger()
    root.addFilter(_no_preprocess_hint)
    try:
        quantize_static(
            str(fp32_path), str(tmp), _Feeds(feeds), quant_format=formats[recipe.quant_format],
            op_types_to_quantize=list(recipe.op_types) or None, per_channel=recipe.per_channel,
            activation_type=_quant_type(recipe.activations), weight_type=_quant_type(recipe.weights),
            calibrate_method=methods[recipe.calibration], nodes_to_exclude=excluded or None,
        )
        proto = onnx.load(str(tmp))
        props = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
        props.update({META_PRECISION: "int8", META_INT8_RECIPE: json.dumps(asdict(recipe), sort_keys=True)})
        del proto.metadata_props[:]
        for key, value in props.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(tmp))
        tmp.replace(out_path)  # only complete graphs enter the cache
    finally:
        root.removeFilter(_no_preprocess_hint)
        tmp.unlink(missing_ok=True)
    return out_path


def int8_graphs(
    model: torch.nn.Module, levels: Sequence[Level], cache_dir: str | Path = DEFAULT_CACHE_DIR,
    recipe: Int8Recipe | None = None, *, progress: bool | None = None,
) -> list[Path]:
    """The int8 ONNX files that serve `levels` (one per level, or one for a runtime-input knob), quantized
    only where the cache lacks them; their fp32 graphs come from (and enter) the same cache."""
    recipe = recipe or default_recipe(model.spec)
    fp32_paths = cached_graphs(model, levels, cache_dir, progress=progress)
    feeds: list[dict[str, np.ndarray]] | None = None
    paths = []
    for fp32_path in tqdm(fp32_paths, desc=f"int8 graphs {model.meta.name}", unit="graph",
                          disable=None if progress is None else not progress):
        path = int8_graph_path(fp32_path, recipe.digest())
        if not path.is_file():
            if feeds is None:  # the same images calibrate every level
                feeds = calibration_feeds(model, recipe)
            log.info("quantizing %s to %s", fp32_path.name, path.name)
            quantize_graph(fp32_path, path, feeds, recipe)
        paths.append(path)
    return paths


def mask_agreement(
    reference: LogitsFn, candidate: LogitsFn, model: torch.nn.Module, level: Level,
    sizes: Sequence[tuple[int, int]] = ((360, 480), (512, 512), (600, 400)), seed: int = 100,
) -> list[tuple[float, int]]:
    """Per generated photo-like image of each size: (fraction of the full-resolution mask's pixels where
    `candidate` agrees with `reference`, classes in the reference mask), both run through `Predictor` with
    the model's test pipeline. The seed differs from calibration's: agreement is measured on unseen images."""
    pipeline = model_pipeline(model)
    out = []
    for index, (height, width) in enumerate(sizes):
        image = photo_like_images(1, height, width, seed + index)[0]
        expected = Predictor(reference, pipeline).predict(image, level).labels
        actual = Predictor(candidate, pipeline).predict(image, level).labels
        out.append((float((expected == actual).mean()), len(np.unique(expected))))
    return out

