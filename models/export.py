"""ONNX export of EDAFormer with one ISR setting baked in, and a parity check against torch.

    path = export_onnx(model, "edaformer_t_2211-222.onnx", IsrConfig.parse("2211/222"))
    diffs = check_parity(model, path)  # raises OnnxParityError above 1e-4

ISR is an argument of `forward`, so each exported graph holds exactly one setting: its average pools
have static kernels (kernel = stride = pool ratio) and every other size is derived at run time from the
input's shape, which makes batch, height and width truly dynamic. Pooling kernels computed from shapes
and adaptive pooling export silently wrong (the kernel is frozen at the example's size), which is why
`check_parity` runs ONNX Runtime against torch at several sizes, non-square and not multiples of 32.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from models.isr import IsrConfig
from models.layers import EmbeddingFreeAttention

log = logging.getLogger(__name__)

DEFAULT_OPSET = 20  # opset 20 has a native Gelu op: one node where opset 18 needs an Erf chain of five
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
PARITY_TOLERANCE = 1e-4
# (batch, height, width): square, non-square, non-multiples of 32 (odd stride-8 grids), batch 2.
PARITY_SIZES: tuple[tuple[int, int, int], ...] = ((1, 512, 512), (1, 384, 640), (1, 200, 328), (2, 256, 256))
# Keys of `ModelProto.metadata_props`; `models.onnx_runner` reads them back.
META_ISR, META_MODEL, META_NUM_CLASSES, META_EXPORTER = (
    "segserve.isr", "segserve.model", "segserve.num_classes", "segserve.exporter",
)
# The example batch must be > 1: torch.export specializes a dimension whose example size is 0 or 1.
_EXAMPLE_SIZE = (2, 256, 320)
# Warnings the dynamo exporter prints on every export that say nothing about this model.
# (onnxscript's optimizer logs every rewrite at INFO, which floods an application's INFO log.)
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir")


class OnnxParityError(AssertionError):
    """ONNX Runtime and torch disagree beyond the tolerance (or in shape) for some input size."""


class IsrBound(nn.Module):
    """`model(images, isr=isr)` with the ISR fixed, so the exported graph takes images only."""

    def __init__(self, model: nn.Module, isr: IsrConfig) -> None:
        super().__init__()
        self.model = model
        self.isr = isr

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, isr=self.isr)


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None lets tqdm hide the bar when stderr is not a terminal (CI, logs)."""
    return None if progress is None else not progress


@contextlib.contextmanager
def _fused_attention(model: nn.Module, fused: bool) -> Iterator[None]:
    """Temporarily choose the attention form; the model is left as the caller had it."""
    modules = [m for m in model.modules() if isinstance(m, EmbeddingFreeAttention)]
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


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic: bool) -> None:
    dim = torch.export.Dim.DYNAMIC
    shapes = {INPUT_NAME: {0: dim, 2: dim, 3: dim}} if dynamic else None
    with _quiet_exporter():
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, opset_version=opset, dynamic_shapes=shapes,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False, optimize=True,
        )
    assert program is not None  # dynamo=True always returns the ONNXProgram
    program.save(str(path), external_data=False)


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic: bool) -> None:
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 2: "h8", 3: "w8"}}
    with warnings.catch_warnings():  # its deprecation notice is expected here: we chose the fallback, and logged why
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper, (example,), str(path), dynamo=False, opset_version=min(opset, 17),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes if dynamic else None,
        )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    isr: IsrConfig | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    fused_attention: bool = False,
    progress: bool | None = None,
) -> Path:
    """Export `model` with `isr` baked in to an ONNX file with dynamic batch, height and width.

    Uses the dynamo exporter (`torch.export`); the TorchScript exporter is only a fallback when that
    fails, and the reason is logged. The explicit softmax attention (`fused_attention=False`) is the
    default: it exports to a plain MatMul/Softmax/MatMul chain with fewer shape ops than the decomposed
    SDPA (ONNX Runtime ran both equally fast, within noise). The ISR code, model name and class count are
    stored in the file's `metadata_props`.

    The model is switched to eval mode (an export of training-mode BatchNorm would be wrong).
    Returns the path written. Call `check_parity` afterwards (the CLI does).
    """
    isr = isr or IsrConfig()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch, height, width = _EXAMPLE_SIZE
    if not isr.fits(height, width):  # cannot happen for the ladder; guards hand-written extreme ratios
        height = width = isr.min_input_side()
    example = torch.randn(batch, 3, height, width)
    wrapper = IsrBound(model, isr).eval()
    name = getattr(getattr(model, "meta", None), "name", type(model).__name__)
    steps = tqdm(total=2, desc=f"export {name} {isr.code}", unit="step", disable=_no_bar(progress))
    with steps, _fused_attention(model, fused_attention), torch.no_grad():
        log.info("exporting %s with ISR %s to %s (opset %d, dynamo exporter)", name, isr.code, path, opset)
        try:
            _export_dynamo(wrapper, example, path, opset, dynamic)
            exporter = "dynamo"
        except Exception as exc:  # any failure of torch.export or the translation: try the legacy path
            log.warning("dynamo export failed (%s: %s); falling back to the TorchScript exporter",
                        type(exc).__name__, exc)
            _export_torchscript(wrapper, example, path, opset, dynamic)
            exporter = "torchscript"
        steps.update()
        _write_metadata(path, isr, name, _num_classes(model), exporter)
        steps.update()
    log.info("wrote %s (%.1f MB, %s exporter)", path, path.stat().st_size / 1e6, exporter)
    return path


def _num_classes(model: nn.Module) -> int:
    value = getattr(model, "num_classes", None)
    if isinstance(value, int):
        return value
    return int(getattr(model, "meta").num_classes)  # noqa: B009  (a clear AttributeError when neither exists)


def _write_metadata(path: Path, isr: IsrConfig, model_name: str, num_classes: int, exporter: str) -> None:
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({
        META_ISR: isr.code, META_MODEL: model_name, META_NUM_CLASSES: str(num_classes), META_EXPORTER: exporter,
    })
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
    isr: IsrConfig | None = None,
    sizes: Iterable[Sequence[int]] = PARITY_SIZES,
    *,
    tolerance: float = PARITY_TOLERANCE,
    seed: int = 0,
    progress: bool | None = None,
) -> list[tuple[tuple[int, int, int], float]]:
    """Run ONNX Runtime and torch on the same random inputs; max |difference| of the logits per size.

    `sizes` are (H, W) or (B, H, W). `isr` defaults to the one stored in the file. Raises
    `OnnxParityError` when any difference exceeds `tolerance` or a shape differs; the message lists
    every size, so one bad size does not hide the others.
    """
    from models.onnx_runner import OnnxRunner  # the runner imports this module's metadata keys

    runner = OnnxRunner(path) if isr is None else OnnxRunner(path, isr=isr)
    (isr,) = runner.isr_configs
    checks = _normalize_sizes(sizes)
    for _, height, width in checks:
        if not isr.fits(height, width):
            raise ValueError(f"{height}x{width} is too small for ISR {isr.code} (min side {isr.min_input_side()})")
    generator = torch.Generator().manual_seed(seed)
    results: list[tuple[tuple[int, int, int], float]] = []
    failures: list[str] = []
    for batch, height, width in tqdm(checks, desc=f"parity {isr.code}", unit="size", disable=_no_bar(progress)):
        images = torch.randn(batch, 3, height, width, generator=generator)
        with torch.inference_mode():
            expected = model(images, isr=isr)
        actual = runner(images, isr)
        if actual.shape != expected.shape:
            failures.append(f"{batch}x{height}x{width}: shape {tuple(actual.shape)} != torch {tuple(expected.shape)}")
            results.append(((batch, height, width), float("inf")))
            continue
        diff = float(np.abs(actual.numpy() - expected.numpy()).max())
        log.info("parity %s at %dx%dx%d: max abs diff %.3g", isr.code, batch, height, width, diff)
        results.append(((batch, height, width), diff))
        if not diff <= tolerance:  # also catches NaN
            failures.append(f"{batch}x{height}x{width}: max abs diff {diff:.3g} > {tolerance:g}")
    if failures:
        raise OnnxParityError(f"ONNX ({path}) disagrees with torch for ISR {isr.code}: " + "; ".join(failures))
    return results
