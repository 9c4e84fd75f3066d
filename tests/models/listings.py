"""The official parameter listings (`tests/data/listings/<model>_state_dict.txt`, copied from the spec) and the
models the tests hold against them, built on the meta device (shapes without memory or compute)."""

from __future__ import annotations

import torch

from models import create_model
from tests.paths import DATA

Entry = tuple[str, tuple[int, ...]]  # (parameter name, shape)
LISTING_DIR = DATA / "listings"


def parse_listing(text: str) -> list[Entry]:
    """The spec's format: `name [d0,d1,...]` per line (`[]` for scalars); blank lines are skipped."""
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, shape = line.split()
        assert shape.startswith("[") and shape.endswith("]"), line
        entries.append((name, tuple(int(d) for d in shape[1:-1].split(",") if d)))
    return entries


def read_listing(name: str) -> list[Entry]:
    """The official listing of one model, e.g. `read_listing("segformer-b0")`."""
    return parse_listing((LISTING_DIR / f"{name}_state_dict.txt").read_text())


def meta_model(name: str, num_classes: int = 150) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes)


def state_dict_entries(model: torch.nn.Module) -> list[Entry]:
    return [(key, tuple(t.shape)) for key, t in model.state_dict().items()]
