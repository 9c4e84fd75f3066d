"""The README tells the truth: its quickstart requests, run as written against the default server (demo weights),
print what it says they print; its configuration table is the settings' own; its Python client example runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.paths import ROOT
from tests.servers import ServerProcess
from tests.tools import require_tool

README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


@pytest.fixture(scope="module")
def default_server() -> Iterator[ServerProcess]:
    """`segserve serve` with no model options: the demo weights, the reference pipeline (not the fast test one)."""
    env = {"SEGSERVE_RANDOM_WEIGHTS": "false", "SEGSERVE_RESIZE_SCALE": "", "SEGSERVE_CALIBRATION_SHAPE": "512x512",
           "SEGSERVE_CALIBRATION_BATCH_SIZES": "1,4", "SEGSERVE_LOG_LEVEL": "warning"}
    with ServerProcess(env=env) as server:
        yield server


def test_the_quickstart_requests_print_what_the_readme_says(default_server: ServerProcess, tmp_path) -> None:
    require_tool("curl", "apt-get install curl")
    quickstart = next(block for block in code_blocks("bash") if "examples/street.jpg" in block)
    commands = re.findall(r"(curl .*?\| grep -i x-segserve-point)\n# (x-segserve-point: \S+)", quickstart.replace(
        "\\\n", ""), re.S)
    assert len(commands) == 2, quickstart
    for command, expected in commands:
        command = command.replace("http://127.0.0.1:8080", default_server.base_url)
        done = subprocess.run(["bash", "-c", command], cwd=ROOT if "@examples" in command else tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.stdout.strip().lower() == expected.lower(), (command, done.stdout, done.stderr)
    for written in ("mask.png", "overlay.png"):
        (ROOT / written).unlink(missing_ok=True)  # the commands write into the working directory


def test_the_configuration_table_is_the_settings_own() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "settings_table.py")], capture_output=True,
                          text=True, check=True, timeout=60)
    start, end = README.index("<!-- settings:start -->"), README.index("<!-- settings:end -->")
    assert README[start:end].strip().removeprefix("<!-- settings:start -->").strip() == done.stdout.strip(), (
        "README's configuration table is stale: run python scripts/settings_table.py --write")


def test_the_python_client_example_runs(default_server: ServerProcess) -> None:
    example = next(block for block in code_blocks("python") if "from segserve_client import Client" in block)
    code = example.replace("http://127.0.0.1:8080", default_server.base_url)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"\(240, 320\) edaformer-t/\S+ True\n", done.stdout), done.stdout
