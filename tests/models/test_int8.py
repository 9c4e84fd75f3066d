"""int8 ONNX graphs (`models.quantize`): they run, keep their metadata, agree with fp32, and are cached by recipe.

SeaFormer-T is the smallest model (one fp32 export for the module, ~30 s on 2 cores; each quantization a few
seconds). Its random weights get BatchNorm statistics from photo-like images (`calibrate_batchnorm_`): with
random statistics the network collapses to one class and agreement would say nothing. DoViT-S (the graph whose
exit threshold is a runtime input) is checked in a slow test: the int8 graph must keep the knob input and the
kept-fraction output, its tokens must still stop where fp32's do, and its mask head must stay fp32.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from models import create_model
from models.onnx_cache import cached_graphs
from models.onnx_runner import META_INT8_RECIPE, OnnxRunner, read_graph_info
from models.quantize import (
    Int8Recipe,
    calibrate_batchnorm_,
    default_recipe,
    int8_graphs,
    mask_agreement,
    network_inputs,
    nodes_in_scopes,
    photo_like_images,
    quantize_graph,
)

# Measured 0.88-0.90 per image (26-30 classes in the fp32 mask) with these weights; a 150-way random classifier
# has many near ties, which makes this bound far stricter than trained weights need (the demo-trained SeaFormer-T
# and EDAFormer-T agree on >= 99% of pixels).
AGREEMENT_BOUND = 0.8
SIZES = ((150, 210), (201, 163))  # photo-like images of odd sizes; the ADE20K pipeline resizes them to short side 512


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_model("seaformer-t", num_classes=150).eval()
    return calibrate_batchnorm_(net, torch.cat(network_inputs(net, photo_like_images(2, 256, 256, seed=7))))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def graphs(model: torch.nn.Module, cache: Path) -> tuple[Path, Path]:
    level = model.spec.training_level()
    (int8_path,) = int8_graphs(model, [level], cache, progress=False)
    (fp32_path,) = cached_graphs(model, [level], cache, progress=False)  # exported by int8_graphs, cached
    return fp32_path, int8_path


def test_int8_graph_runs_and_is_quantized(graphs: tuple[Path, Path]) -> None:
    fp32_path, int8_path = graphs
    fp32, int8 = OnnxRunner(fp32_path), OnnxRunner(int8_path)
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    images = torch.randn(2, 3, 96, 160)
    expected, actual = fp32(images), int8(images)
    assert actual.shape == expected.shape and torch.isfinite(actual).all()
    proto = onnx.load(str(int8_path))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) >= 50  # every conv weight (SeaFormer-T has 77 convs)
    assert int8_path.stat().st_size < 0.5 * fp32_path.stat().st_size


def test_metadata_round_trips(model: torch.nn.Module, graphs: tuple[Path, Path]) -> None:
    fp32_path, int8_path = graphs
    fp32, int8 = read_graph_info(fp32_path), read_graph_info(int8_path)
    assert (int8.model_name, int8.level, int8.num_classes) == (fp32.model_name, fp32.level, fp32.num_classes)
    assert (int8.model_name, int8.num_classes, int8.precision) == ("seaformer-t", 150, "int8")
    recipe = json.loads({p.key: p.value for p in onnx.load(str(int8_path)).metadata_props}[META_INT8_RECIPE])
    assert recipe == json.loads(json.dumps(asdict(default_recipe(model.spec))))
    with pytest.raises(ValueError, match="different precisions"):
        OnnxRunner([fp32_path, int8_path])


def test_mask_agrees_with_fp32_on_structured_images(model: torch.nn.Module, graphs: tuple[Path, Path]) -> None:
    fp32_path, int8_path = graphs
    results = mask_agreement(OnnxRunner(fp32_path), OnnxRunner(int8_path), model, model.spec.training_level(), SIZES)
    for agreement, classes in results:
        assert classes >= 5  # the reference mask is structured, so agreement means something
        assert agreement >= AGREEMENT_BOUND, results
    # The full-resolution mask: agreement is over the image's own pixels (a perfect score needs the same labels).
    assert all(agreement < 1.0 for agreement, _ in results)  # int8 really changes something


def test_cache_key_follows_the_recipe(model: torch.nn.Module, cache: Path, graphs: tuple[Path, Path]) -> None:
    level = model.spec.training_level()
    recipe = default_recipe(model.spec)
    digests = {recipe.digest(), *(replace(recipe, **change).digest() for change in (
        {"per_channel": False}, {"quant_format": "qoperator"}, {"op_types": ("Conv",)}, {"images": 3},
        {"sizes": ((256, 256),)}, {"seed": 1}, {"calibration": "percentile"},
    ))}
    assert len(digests) == 8
    _, int8_path = graphs
    before = int8_path.stat().st_mtime_ns
    assert int8_graphs(model, [level], cache, progress=False) == [int8_path]  # cached: not quantized again
    assert int8_path.stat().st_mtime_ns == before
    (other,) = int8_graphs(model, [level], cache, replace(recipe, per_channel=False), progress=False)
    assert other != int8_path and other.is_file() and int8_path.is_file()
    assert other.name.split("-int8-")[0] == int8_path.name.split("-int8-")[0]  # same fp32 key, another recipe
    assert len(list(cache.glob("*.onnx"))) == 3  # one fp32 graph, two int8 graphs


def test_fp32_scopes_are_found_or_refused(graphs: tuple[Path, Path], tmp_path: Path) -> None:
    fp32_path, _ = graphs
    proto = onnx.load(str(fp32_path))
    head = nodes_in_scopes(proto, ("decode_head",))
    backbone = nodes_in_scopes(proto, ("backbone",))
    assert head and backbone and not set(head) & set(backbone)
    assert nodes_in_scopes(proto, ("decode_hea",)) == []  # whole module names only
    with pytest.raises(ValueError, match="has no node under"):
        quantize_graph(fp32_path, tmp_path / "x.onnx", [], Int8Recipe(fp32_scopes=("no_such_module",)))


def test_recipe_fields_are_checked() -> None:
    assert Int8Recipe().op_types == ("Conv", "MatMul", "Gemm")
    assert default_recipe(create_model("seaformer-t").spec).op_types == ()  # every op: see models.quantize
    assert default_recipe(create_model("dovit-s").spec).fp32_scopes == ("decode_head",)
    images = photo_like_images(2, 40, 60, seed=3)
    assert [i.shape for i in images] == [(40, 60, 3)] * 2 and images[0].dtype == np.uint8
    assert not np.array_equal(images[0], images[1]) and images[0].std() > 20


@pytest.mark.slow
def test_dovit_runtime_knob_survives_quantization(tmp_path: Path) -> None:
    from tests.models.reference_dovit import randomize_, structured_images

    torch.manual_seed(0)
    model = randomize_(create_model("dovit-s", num_classes=150), seed=1, aux_scale=30.0).eval()
    (int8_path,) = int8_graphs(model, model.spec.ladder(), tmp_path, progress=False)  # one graph for every level
    (fp32_path,) = cached_graphs(model, model.spec.ladder(), tmp_path, progress=False)
    fp32, int8 = OnnxRunner(fp32_path), OnnxRunner(int8_path)
    assert int8.levels == [] and int8.precision == "int8"  # the threshold is still an input
    graph = onnx.load(str(int8_path)).graph
    producer = {output: node.op_type for node in graph.node for output in node.output}
    head = set(nodes_in_scopes(onnx.load(str(int8_path)), ("decode_head",)))
    inputs = [name for node in graph.node if node.name in head for name in node.input]
    assert head and "DequantizeLinear" not in {producer.get(name) for name in inputs}  # the mask head stays fp32
    assert "DequantizeLinear" in producer.values()
    images = structured_images(2, 96, 128, seed=3)
    kept_at = {}
    for threshold in (0.96, 0.9):
        _, expected = fp32.forward_with_stats(images, exit_threshold=threshold)
        logits, stats = int8.forward_with_stats(images, exit_threshold=threshold)
        kept, kept_fp32 = stats["kept_fraction"], expected["kept_fraction"]
        assert logits.shape == (2, 150, 6, 8)
        assert ((kept > 0) & (kept < 1)).any()  # tokens stop in the int8 graph too
        # 48 tokens per image, many near the threshold with random weights: measured up to 0.15 apart, 0.07 mean.
        assert (kept - kept_fp32).abs().max() <= 0.25 and (kept - kept_fp32).abs().mean() <= 0.12, (kept, kept_fp32)
        kept_at[threshold] = kept
    assert (kept_at[0.9] <= kept_at[0.96]).all() and (kept_at[0.9] < kept_at[0.96]).any()  # the knob still acts
    _, dense = int8.forward_with_stats(images, exit_threshold=math.inf)
    assert torch.equal(dense["kept_fraction"], torch.ones(2, 3, dtype=dense["kept_fraction"].dtype))
