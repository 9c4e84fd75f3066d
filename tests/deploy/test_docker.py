"""The Dockerfile: installs the project the way the README does, follows the image conventions the
deployment relies on (non-root numeric user, ports, readiness healthcheck, /models), and passes hadolint.

No Docker engine is needed: the Dockerfile is parsed here, stage by stage.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.paths import ROOT
from tests.tools import require_tool

DOCKERFILE = ROOT / "Dockerfile"
README_INSTALL_MARKER = "pip install -c constraints/cpu.txt"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions (keyword upper-cased; continuation lines joined; comments dropped)."""
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(" ".join(current.split()))
        current = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages


def effective(stages: list[Stage], name: str) -> list[tuple[str, str]]:
    """A stage's instructions, its parent stages' first (what the image built from it inherits)."""
    by_name = {stage.name: stage for stage in stages}
    stage = by_name[name]
    inherited = effective(stages, stage.base) if stage.base in by_name else []
    return inherited + stage.instructions


def run_commands(instructions: list[tuple[str, str]]) -> list[str]:
    """Shell commands of the RUN instructions, split at `&&`."""
    return [part.strip() for kw, args in instructions if kw == "RUN" for part in args.split("&&")]


def venv_source(stages: list[Stage], target: str) -> str:
    """The build stage a target copies its virtual environment from."""
    for keyword, args in effective(stages, target):
        match = re.match(r"--from=(\S+)\s+/opt/venv\s", args)
        if keyword == "COPY" and match:
            return match.group(1)
    raise AssertionError(f"stage {target} copies no /opt/venv")


def readme_install_command() -> str:
    """The README's install command: the `pip install ...` part of the line in a ```bash block."""
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", readme, flags=re.S):
        for line in block.splitlines():
            if README_INSTALL_MARKER in line:
                command = next(p for p in re.split(r"&&|;|\|\|", line) if README_INSTALL_MARKER in p)
                return " ".join(command[command.index("pip install") :].split())
    raise AssertionError(f"README.md has no ```bash line with `{README_INSTALL_MARKER}`")


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_cpu_image_installs_exactly_like_the_readme(stages: list[Stage]) -> None:
    command = readme_install_command()
    source = venv_source(stages, "cpu")
    assert command in run_commands(effective(stages, source)), (
        f"stage {source} (the CPU image's environment) must run the README's `{command}`"
    )


def test_cpu_is_the_default_target(stages: list[Stage]) -> None:
    assert stages[-1].name == "cpu", "a plain `docker build .` builds the last stage"
    external = [s.base for s in stages if s.base not in {t.name for t in stages}]
    assert external and all(base.startswith("python:3.11-slim") for base in external), external


def test_gpu_target_installs_cuda_torch_and_onnxruntime_gpu(stages: list[Stage]) -> None:
    assert "gpu" in {stage.name for stage in stages}
    source = venv_source(stages, "gpu")
    commands = run_commands(effective(stages, source))
    assert "pip install -c constraints/gpu.txt ." in commands
    assert "pip uninstall -y onnxruntime" in commands
    assert "pip install -c constraints/gpu.txt onnxruntime-gpu" in commands
    env = " ".join(args for kw, args in effective(stages, "gpu") if kw == "ENV")
    assert "SEGSERVE_DEVICE=cuda" in env


def _pin(path: Path, package: str) -> str:
    for line in path.read_text().splitlines():
        match = re.fullmatch(rf"{re.escape(package)}==(\S+)", line.split("#")[0].strip())
        if match:
            return match.group(1)
    raise AssertionError(f"{path.name} pins no {package}")


def test_gpu_constraints_pin_the_cuda_build_of_the_cpu_torch_release(stages: list[Stage]) -> None:
    cpu_torch = _pin(ROOT / "constraints/cpu.txt", "torch")
    gpu_torch = _pin(ROOT / "constraints/gpu.txt", "torch")
    release, _, flavour = gpu_torch.partition("+")
    assert release == cpu_torch.partition("+")[0] and re.fullmatch(r"cu\d+", flavour), gpu_torch
    _pin(ROOT / "constraints/gpu.txt", "onnxruntime-gpu")
    # The CUDA wheel comes from the matching PyTorch index.
    args = [a for kw, a in effective(stages, venv_source(stages, "gpu")) if kw == "ARG"]
    assert any(a.startswith("PIP_EXTRA_INDEX_URL=") and a.endswith(f"/{flavour}") for a in args), args


def test_runtime_conventions(stages: list[Stage]) -> None:
    instructions = effective(stages, "cpu")
    keywords = ("USER", "EXPOSE", "ENV", "CMD", "VOLUME")
    values = {kw: [a for k, a in instructions if k == kw] for kw in keywords}
    user = values["USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric non-root user, so runAsNonRoot can check it"
    assert set(" ".join(values["EXPOSE"]).split()) >= {"8080", "50051"}
    env = " ".join(values["ENV"]).split()
    assert {"SEGSERVE_HOST=0.0.0.0", "SEGSERVE_GRPC_PORT=50051"} <= set(env)
    assert "SEGSERVE_AUTH=on" in env, "the image listens on every interface: API keys are required"
    assert values["CMD"][-1] == '["segserve", "serve"]'
    assert "/models" in values["VOLUME"][-1]
    healthcheck = [a for k, a in instructions if k == "HEALTHCHECK"][-1]
    assert "/readyz" in healthcheck and '"python"' in healthcheck and "curl" not in healthcheck


def test_dockerignore_lets_every_copied_path_in() -> None:
    # The .dockerignore is an allowlist: a new COPY without its `!path` line would fail at build time.
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for stage in parse_dockerfile(DOCKERFILE.read_text()):
        for keyword, args in stage.instructions:
            if keyword == "COPY" and not args.startswith("--from"):
                copied.update(p.rstrip("/") for p in shlex.split(args)[:-1])
    assert copied and copied <= allowed, copied - allowed


def _hadolint() -> str:
    return require_tool("hadolint", "run scripts/install-deploy-tools.sh")


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_config_catches_a_bad_dockerfile() -> None:
    # Proves the linter and its config really lint (a no-op wrapper would pass the test above).
    result = subprocess.run(
        [_hadolint(), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), "-"],
        input="FROM ubuntu\nRUN apt-get install -y curl\n", capture_output=True, text=True,
    )
    assert result.returncode != 0 and "DL3006" in result.stdout, result.stdout


def test_hadolint_ignores_carry_a_reason() -> None:
    config_text = (ROOT / ".hadolint.yaml").read_text()
    ignored = yaml.safe_load(config_text).get("ignored") or []
    for rule in ignored:
        lines = [line for line in config_text.splitlines() if re.search(rf"\b{rule}\b", line)]
        assert any("#" in line for line in lines), f"ignored rule {rule} needs a comment saying why"
