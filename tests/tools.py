"""External tools the tests need (redis-server, promtool, hadolint, ...): found, or a clear verdict.

CI installs every one of them (`.ci/run`, `scripts/install-deploy-tools.sh`), so there a missing tool is a
failure; on a developer's machine the test is skipped with the install hint.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> None:
    """Fail in CI, skip elsewhere."""
    if in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


def find_tool(name: str) -> str | None:
    """`name` from the virtual environment's bin directory, then PATH."""
    return shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def require_tool(name: str, hint: str) -> str:
    found = find_tool(name)
    if found is None:
        missing(f"{name} not found: {hint}")
    assert found is not None
    return found
