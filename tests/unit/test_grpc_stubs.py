"""The committed gRPC stubs (service/grpc/gen) are what scripts/gen_grpc.sh makes of service/grpc/segserve.proto.

After editing the .proto, run `scripts/gen_grpc.sh` and commit the result.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools import missing

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "service" / "grpc" / "gen"
STUBS = ("segserve_pb2.py", "segserve_pb2.pyi", "segserve_pb2_grpc.py")
HINT = "the committed stubs are stale: run scripts/gen_grpc.sh and commit service/grpc/gen"

# Stamps of the generator's version, which differ between grpcio-tools releases without any change of API.
VERSION_STAMPS = (
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (re.compile(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*\d+,\s*\d+,\s*\d+,"),
     "ValidateProtobufRuntimeVersion(_runtime_version.Domain.PUBLIC, X, Y, Z,"),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), "GRPC_GENERATED_VERSION = X"),
)


def normalized(text: str) -> str:
    for pattern, replacement in VERSION_STAMPS:
        text = pattern.sub(replacement, text)
    return text


def serialized_descriptor(pb2_source: str) -> bytes:
    """The FileDescriptorProto bytes a generated *_pb2.py registers (its API, independent of the generator)."""
    match = re.search(r"AddSerializedFile\((b'.*?')\)\n", pb2_source, re.S)
    assert match, "no AddSerializedFile(...) in the generated module"
    return ast.literal_eval(match.group(1))


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        import grpc_tools.protoc  # noqa: F401
    except ImportError:
        missing("grpcio-tools is not installed (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("gen")
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_grpc.sh"), str(out)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHON": sys.executable}, capture_output=True, timeout=120)
    return out


def test_committed_stubs_describe_the_proto(regenerated: Path) -> None:
    committed = serialized_descriptor((GEN / "segserve_pb2.py").read_text())
    assert committed == serialized_descriptor((regenerated / "segserve_pb2.py").read_text()), HINT


@pytest.mark.parametrize("name", STUBS)
def test_committed_stubs_match_the_generator(regenerated: Path, name: str) -> None:
    assert normalized((GEN / name).read_text()) == normalized((regenerated / name).read_text()), HINT


def test_grpc_stub_imports_its_messages_from_the_package() -> None:
    from service.grpc.gen import segserve_pb2, segserve_pb2_grpc

    assert segserve_pb2_grpc.segserve__pb2 is segserve_pb2
    assert "segserve.v1.Segmentation" in segserve_pb2.DESCRIPTOR.services_by_name["Segmentation"].full_name
