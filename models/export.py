"""ONNX export of any registered model at one level of its knob, and a parity check against torch.

    path = export_onnx(model, "edaformer_t_2211-222.onnx", model.spec.level("2211/222"))
    diffs = check_parity(model, path)  # raises OnnxParityError above 1e-4

The knob is an argument of `forward`, so each exported graph holds exactly one setting (EDAFormer's ISR
pools become static kernels, kernel = stride = pool ratio) and every other size is derived at run time from
the input's shape, which makes batch, height and width truly dynamic. A knob marked `runtime_input` (DoViT's
exit threshold) is instead a scalar input of the graph, so one file serves every value; statistics a family
reports (`ModelSpec.stats`) are extra outputs. Pooling kernels computed from shapes
and adaptive pooling export silently wrong (the kernel is frozen at the example's size), which is why
`check_parity` runs ONNX Runtime against torch at several sizes, non-square and not multiples of 32.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from models.spec import Level

log = logging.getLogger(__name__)

DEFAULT_OPSET = 20  # opset 20 has a native Gelu op: one node where opset 18 needs an Erf chain of five
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
PARITY_TOLERANCE = 1e-4
# (batch, height, width): square, non-square, non-multiples of 32 (odd stride-8 grids), batch 2. A family whose
# inputs obey other rules (LRFormer) names its own sizes in `ModelSpec.parity_sizes`.
PARITY_SIZES: tuple[tuple[int, int, int], ...] = ((1, 512, 512), (1, 384, 640), (1, 200, 328), (2, 256, 256))
# Keys of `ModelProto.metadata_props`; `models.onnx_runner` reads them back.
META_LEVEL, META_KNOB, META_MODEL, META_NUM_CLASSES, META_EXPORTER, META_RUNTIME_KNOB = (
    "segserve.level", "segserve.knob", "segserve.model", "segserve.num_classes", "segserve.exporter",
    "segserve.runtime_knob",
)
KNOB_INPUT_NAME = "knob"  # the scalar input of a graph whose knob is a runtime input
STATS_PREFIX = "stats_"  # output names of per-image statistics: stats_<key>
# The example batch must be > 1: torch.export specializes a dimension whose example size is 0 or 1.
_EXAMPLE_SIZE = (2, 256, 320)
# Warnings the dynamo exporter prints on every export that say nothing about this model.
# (onnxscript's optimizer logs every rewrite at INFO, which floods an application's INFO log.)
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir")


class OnnxParityError(AssertionError):
    """ONNX Runtime and torch disagree beyond the tolerance (or in shape) for some input size."""


class KnobBound(nn.Module):
    """`model(images, **level.kwargs)` with the level fixed, so the exported graph takes images only."""

    def __init__(self, model: nn.Module, level: Level, stats: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.kwargs = level.kwargs
        self.stats = stats

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not self.stats:
            return self.model(images, **self.kwargs)
        logits, stats = self.model.forward_with_stats(images, **self.kwargs)
        return (logits, *(stats[key] for key in self.stats))


class KnobInput(nn.Module):
    """`model(images, **{knob: value})` with the knob value a scalar graph input (`runtime_input` knobs)."""

    def __init__(self, model: nn.Module, knob: str, stats: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.knob = knob
        self.stats = stats

    def forward(self, images: torch.Tensor, value: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not self.stats:
            return self.model(images, **{self.knob: value})
        logits, stats = self.model.forward_with_stats(images, **{self.knob: value})
        return (logits, *(stats[key] for key in self.stats))


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None lets tqdm hide the bar when stderr is not a terminal (CI, logs)."""
    return None if progress is None else not progress


@contextlib.contextmanager
def _fused_attention(model: nn.Module, fused: bool) -> Iterator[None]:
    """Temporarily choose the attention form of every module with a `fused` switch; restored afterwards."""
    modules = [m for m in model.modules() if isinstance(getattr(m, "fused", None), bool)]
    before = [m.fused for m in modules]
    for m in modules:
        m.fused = fused
    try:
        yield
    finally:
        for m, was in zip(modules, before, strict=True):
            m.fused = was


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # torch.export's own pytree deprecations (FutureWarning) are not actionable for callers.
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@dataclass(frozen=True)
class _Signature:
    """Names of the graph's inputs and outputs, and the example arguments."""

    inputs: list[str]
    outputs: list[str]
    args: tuple[torch.Tensor, ...]


def _export_dynamo(wrapper: nn.Module, sig: _Signature, path: Path, opset: int, dynamic: bool) -> None:
    dim = torch.export.Dim.DYNAMIC
    shapes = None
    if dynamic:
        shapes = {INPUT_NAME: {0: dim, 2: dim, 3: dim}}
        if KNOB_INPUT_NAME in sig.inputs:
            shapes["value"] = None  # a scalar: no dynamic dimension
    with _quiet_exporter():
        program = torch.onnx.export(
            wrapper, sig.args, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
            input_names=sig.inputs, output_names=sig.outputs, verbose=False, optimize=True,
        )
    assert program is not None  # dynamo=True always returns the ONNXProgram
    program.save(str(path), external_data=False)


def _export_torchscript(wrapper: nn.Module, sig: _Signature, path: Path, opset: int, dynamic: bool) -> None:
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 2: "h", 3: "w"}}
    with warnings.catch_warnings():  # its deprecation notice is expected here: we chose the fallback, and logged why
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper, sig.args, str(path), dynamo=False, opset_version=min(opset, 17),
            input_names=sig.inputs, output_names=sig.outputs, dynamic_axes=axes if dynamic else None,
        )


def _level_of(model: nn.Module, level: Level | None) -> Level:
    spec = getattr(model, "spec", None)
    if level is not None:
        return level
    return spec.training_level() if spec is not None else Level("base", 0)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    level: Level | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    fused_attention: bool = False,
    progress: bool | None = None,
) -> Path:
    """Export `model` at `level` (default: the training setting) to ONNX with dynamic batch, height, width.

    Uses the dynamo exporter (`torch.export`); the TorchScript exporter is only a fallback when that
    fails, and the reason is logged (never for a family whose spec forbids it: DoViT's data-dependent
    token counts would be baked in). The explicit softmax attention (`fused_attention=False`) is the
    default: it exports to a plain MatMul/Softmax/MatMul chain with fewer shape ops than the decomposed
    SDPA (ONNX Runtime ran both equally fast, within noise). The level, model name and class count are
    stored in the file's `metadata_props`. A `runtime_input` knob becomes the scalar input `knob`.

    The model is switched to eval mode (an export of training-mode BatchNorm would be wrong).
    Returns the path written. Call `check_parity` afterwards (the CLI does).
    """
    spec = getattr(model, "spec", None)
    level = _level_of(model, level)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch, height, width = _EXAMPLE_SIZE
    example = torch.randn(batch, 3, height, width)
    stats = tuple(spec.stats) if spec is not None else ()
    outputs = [OUTPUT_NAME, *(STATS_PREFIX + key for key in stats)]
    runtime_knob = spec is not None and spec.knob is not None and spec.knob.runtime_input
    if runtime_knob:
        wrapper: nn.Module = KnobInput(model, spec.knob.name, stats).eval()
        value = torch.tensor(float(spec.knob.training), dtype=torch.float32)
        sig = _Signature([INPUT_NAME, KNOB_INPUT_NAME], outputs, (example, value))
    else:
        wrapper = KnobBound(model, level, stats).eval()
        sig = _Signature([INPUT_NAME], outputs, (example,))
    name = getattr(getattr(model, "meta", None), "name", type(model).__name__)
    what = f"{spec.knob.name} as an input" if runtime_knob else level.name
    steps = tqdm(total=2, desc=f"export {name} {what}", unit="step", disable=_no_bar(progress))
    with steps, _fused_attention(model, fused_attention), torch.no_grad():
        log.info("exporting %s at %s to %s (opset %d, dynamo exporter)", name, what, path, opset)
        try:
            _export_dynamo(wrapper, sig, path, opset, dynamic)
            exporter = "dynamo"
        except Exception as exc:  # any failure of torch.export or the translation: try the legacy path
            if spec is not None and not spec.torchscript_export_ok:
                raise
            log.warning("dynamo export failed (%s: %s); falling back to the TorchScript exporter",
                        type(exc).__name__, exc)
            _export_torchscript(wrapper, sig, path, opset, dynamic)
            exporter = "torchscript"
        steps.update()
        knob_name = spec.knob.name if spec is not None and spec.knob is not None else ""
        _write_metadata(path, {
            META_LEVEL: "" if runtime_knob else level.name, META_KNOB: knob_name, META_MODEL: name,
            META_NUM_CLASSES: str(_num_classes(model)), META_EXPORTER: exporter,
            META_RUNTIME_KNOB: knob_name if runtime_knob else "",
        })
        steps.update()
    log.info("wrote %s (%.1f MB, %s exporter)", path, path.stat().st_size / 1e6, exporter)
    return path


def _num_classes(model: nn.Module) -> int:
    value = getattr(model, "num_classes", None)
    if isinstance(value, int):
        return value
    return int(getattr(model, "meta").num_classes)  # noqa: B009  (a clear AttributeError when neither exists)


def _write_metadata(path: Path, values: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(values)
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `metadata_props` of an ONNX file (without loading the weights)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _normalize_sizes(sizes: Iterable[Sequence[int]]) -> list[tuple[int, int, int]]:
    out = []
    for size in sizes:
        if len(size) == 2:
            out.append((1, int(size[0]), int(size[1])))
        elif len(size) == 3:
            out.append((int(size[0]), int(size[1]), int(size[2])))
        else:
            raise ValueError(f"parity size {size!r} is neither (H, W) nor (B, H, W)")
    return out


def check_parity(
    model: nn.Module,
    path: str | Path,
    level: Level | None = None,
    sizes: Iterable[Sequence[int]] | None = None,
    *,
    tolerance: float = PARITY_TOLERANCE,
    seed: int = 0,
    progress: bool | None = None,
) -> list[tuple[tuple[int, int, int], float]]:
    """Run ONNX Runtime and torch on the same random inputs; max |difference| / std of the torch logits.

    `sizes` are (H, W) or (B, H, W) (default: the family's `parity_sizes`). `level` defaults to the one
    stored in the file (for a runtime-input knob: the training value). Raises `OnnxParityError` when any
    relative difference exceeds `tolerance`, a shape differs, or a statistic differs; the message lists
    every size, so one bad size does not hide the others.
    """
    from models.onnx_runner import OnnxRunner  # the runner imports this module's metadata keys

    spec = getattr(model, "spec", None)
    runner = OnnxRunner(path)
    level = level or (runner.levels[0] if runner.levels else _level_of(model, None))
    checks = _normalize_sizes(sizes if sizes is not None else (spec.parity_sizes if spec else PARITY_SIZES))
    if spec is not None:
        for _, height, width in checks:
            if not spec.fits(level, height, width):
                raise ValueError(f"{height}x{width} is too small for {spec.name} at level {level.name}")
    generator = torch.Generator().manual_seed(seed)
    results: list[tuple[tuple[int, int, int], float]] = []
    failures: list[str] = []
    for batch, height, width in tqdm(checks, desc=f"parity {level.name}", unit="size", disable=_no_bar(progress)):
        images = torch.randn(batch, 3, height, width, generator=generator)
        where = f"{batch}x{height}x{width}"
        with torch.inference_mode():
            expected, expected_stats = model.forward_with_stats(images, **level.kwargs)
        actual, actual_stats = runner.forward_with_stats(images, **level.kwargs)
        if actual.shape != expected.shape:
            failures.append(f"{where}: shape {tuple(actual.shape)} != torch {tuple(expected.shape)}")
            results.append(((batch, height, width), float("inf")))
            continue
        scale = max(float(expected.std()), 1e-12)
        diff = float(np.abs(actual.numpy() - expected.numpy()).max()) / scale
        log.info("parity %s at %s: max |diff| / std %.3g", level.name, where, diff)
        results.append(((batch, height, width), diff))
        if not diff <= tolerance:  # also catches NaN
            failures.append(f"{where}: max |diff| / std {diff:.3g} > {tolerance:g}")
        for key, value in expected_stats.items():
            if key not in actual_stats or not torch.allclose(actual_stats[key].float(), value.float(), atol=1e-6):
                failures.append(f"{where}: statistic {key} differs ({actual_stats.get(key)} != torch {value})")
    if failures:
        raise OnnxParityError(f"ONNX ({path}) disagrees with torch at level {level.name}: " + "; ".join(failures))
    return results
