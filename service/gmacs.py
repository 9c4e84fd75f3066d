"""GMACs per (model, level, network input shape): counted once, in the background, and remembered on disk.

The planner needs GMACs for every shape a request brings (to scale latency from the reference shape), but a
count costs ~0.2 s of CPU: a new shape is counted on a background thread and estimated meanwhile from the
point's reference count by pixel ratio. Counts do not depend on the machine or the weights, so they are kept
in a small JSON file and a restart counts nothing it has counted before.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from models.spec import Level

log = logging.getLogger(__name__)
Shape = tuple[int, int]
Counter = Callable[[str, int, Shape, Level], float]  # (architecture, classes, shape, level) -> GMACs
MAX_ENTRIES = 20_000  # bound the table (and its file): a long-lived server meets many image shapes


def _key(architecture: str, num_classes: int, shape: Shape, level: Level) -> str:
    return f"{architecture}|{num_classes}|{shape[0]}x{shape[1]}|{level.name}"


class GmacTable:
    def __init__(self, count: Counter, path: Path | None) -> None:
        self._count = count
        self._path = path
        self._values: dict[str, float] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segserve-gmacs")
        self._dirty = False
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text())
                self._values = {str(k): float(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
            except (OSError, ValueError, TypeError):
                log.warning("ignoring the unreadable GMAC cache %s", path)

    def exact(self, architecture: str, num_classes: int, shape: Shape, level: Level) -> float:
        """Count now (blocking) unless known."""
        key = _key(architecture, num_classes, shape, level)
        if key not in self._values:
            value = self._count(architecture, num_classes, shape, level)
            with self._lock:
                if len(self._values) < MAX_ENTRIES:
                    self._values[key] = value
                    self._dirty = True
            return value
        return self._values[key]

    def estimate(self, architecture: str, num_classes: int, shape: Shape, level: Level, reference: Shape) -> float:
        """Known counts at once; an unknown shape is counted in the background and scaled from `reference`."""
        key = _key(architecture, num_classes, shape, level)
        value = self._values.get(key)
        if value is not None:
            return value
        with self._lock:
            if key not in self._pending and len(self._values) < MAX_ENTRIES:
                self._pending.add(key)
                self._executor.submit(self._background, architecture, num_classes, shape, level, key)
        base = self.exact(architecture, num_classes, reference, level)
        return base * (shape[0] * shape[1]) / (reference[0] * reference[1])

    def _background(self, architecture: str, num_classes: int, shape: Shape, level: Level, key: str) -> None:
        try:
            self.exact(architecture, num_classes, shape, level)
        except Exception as exc:  # e.g. a knob level that cannot run at this shape: the pixel-ratio estimate stays
            log.warning("GMAC count failed for %s (%s: %s); the pixel-ratio estimate stays", key,
                        type(exc).__name__, exc)
        finally:
            with self._lock:
                self._pending.discard(key)

    def save(self) -> None:
        if self._path is None or not self._dirty:
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._path.with_suffix(".tmp")
            with self._lock:
                tmp.write_text(json.dumps(self._values, sort_keys=True))
                self._dirty = False
            tmp.replace(self._path)
        except OSError as exc:
            log.warning("could not save the GMAC cache %s: %s", self._path, exc)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.save()
