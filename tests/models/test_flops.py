"""GMACs (convs + linears + the two attention matmuls) against the spec's table, and the ladder's order.

Expected values are the external reference figures of /work/shared/specs/edaformer.md §4 ("Stand-in for
Tables 1/3: our computed GMACs [C]"), counted on the official module tree; they are hard-coded here, not
produced by our code.
"""

from __future__ import annotations

import itertools
from functools import cache

import pytest
import torch

from models import LADDER, IsrConfig, create_model
from models.flops import count_gmacs

# spec §4: (height, width, num_classes) -> {enc/dec: (T GMACs, B GMACs)}
SPEC_TABLE = {
    (512, 512, 150): {
        "1111/111": (5.59, 31.82),
        "2111/111": (5.19, 30.61),
        "2211/111": (4.99, 30.00),
        "1111/222": (5.27, 31.09),
        "2211/222": (4.66, 29.26),
        "4211/222": (4.56, 28.96),
        "2221/222": (4.13, 26.77),
    },
    (1024, 2048, 19): {
        "1111/111": (151.30, 604.52),
        "2211/222": (94.55, 451.60),
        "2221/222": (62.09, 307.65),
        "2222/222": (58.66, 296.78),
    },
}
VARIANTS = ("edaformer-t", "edaformer-b")
CASES = [
    (variant, key, code, values[index])
    for key, rows in SPEC_TABLE.items()
    for code, values in rows.items()
    for index, variant in enumerate(VARIANTS)
]


@cache
def _model(variant: str, num_classes: int) -> torch.nn.Module:
    with torch.device("meta"):  # counting needs shapes only
        return create_model(variant, num_classes=num_classes)


@cache
def _gmacs(variant: str, height: int, width: int, num_classes: int, code: str) -> float:
    return count_gmacs(_model(variant, num_classes), height, width, isr=IsrConfig.parse(code))


@pytest.mark.parametrize(
    ("variant", "key", "code", "expected"),
    CASES,
    ids=[f"{v}-{h}x{w}-{c}" for v, (h, w, _), c, _ in CASES],
)
def test_gmacs_match_spec_table(variant, key, code, expected):
    height, width, num_classes = key
    got = _gmacs(variant, height, width, num_classes, code)
    assert got == pytest.approx(expected, rel=0.01), f"{variant} {height}x{width} {code}: {got:.2f} vs {expected}"


def test_isr_saving_at_1024x2048_reaches_the_papers_61_percent_for_t():
    """spec §4 / abstract: ISR cuts up to ~61% of the compute on Cityscapes (T, 2222/222 vs training)."""
    full = _gmacs("edaformer-t", 1024, 2048, 19, "1111/111")
    cheapest = _gmacs("edaformer-t", 1024, 2048, 19, "2222/222")
    assert 1 - cheapest / full == pytest.approx(0.612, abs=0.005)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("height", "width", "num_classes"), [(512, 512, 150), (1024, 2048, 19)])
def test_ladder_gmacs_strictly_decrease(variant, height, width, num_classes):
    assert LADDER[0].isr == IsrConfig()
    values = [_gmacs(variant, height, width, num_classes, level.isr.code) for level in LADDER]
    assert all(a > b for a, b in itertools.pairwise(values)), dict(zip([lv.name for lv in LADDER], values, strict=True))


def test_count_does_not_touch_the_model():
    model = create_model("edaformer-t", num_classes=19)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_gmacs(model, 64, 64, isr=IsrConfig())
    assert all(v.device.type == "cpu" for v in model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
