"""The committed gRPC stubs (service/grpc/gen) are what scripts/gen_grpc.sh makes of service/grpc/*.proto, and
they stay loadable on every protobuf major version the project's pins admit.

After editing a .proto, run `scripts/gen_grpc.sh` and commit the result. The script runs a pinned grpcio-tools
(1.64.3) in a venv of its own; the first check below needs only the grpcio-tools of the dev extra (any version).
Imports are checked in subprocesses, each with a clean protobuf default pool and warnings as errors.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tests.paths import ROOT
from tests.tools import missing

GEN = ROOT / "service" / "grpc" / "gen"
PROTOS = ("segserve", "grpc_predict_v2")
STUBS = tuple(f"{name}{suffix}" for name in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
HINT = "the committed stubs are stale: run scripts/gen_grpc.sh and commit service/grpc/gen"


def serialized_descriptor(pb2_source: str) -> bytes:
    """The FileDescriptorProto bytes a generated *_pb2.py registers (its API, independent of the generator)."""
    for node in ast.walk(ast.parse(pb2_source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return ast.literal_eval(node.args[0])
    raise AssertionError("no AddSerializedFile(...) in the generated module")


def without_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    # protoc's descriptor sets carry json_name; the gencode it embeds leaves it out. Nothing else differs.
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        without_json_names(nested)


def lower_bound(requirement: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([\d.]+)", requirement)
    assert match, f"{requirement!r} has no lower bound"
    return tuple(int(part) for part in match.group(1).split("."))


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gen_grpc.sh"), str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0:
        if "pip" in result.stderr and ("Could not" in result.stderr or "No matching" in result.stderr):
            missing(f"scripts/gen_grpc.sh could not install its pinned grpcio-tools:\n{result.stderr[-2000:]}")
        raise AssertionError(f"scripts/gen_grpc.sh failed:\n{result.stderr[-4000:]}")
    return out


@pytest.mark.parametrize("name", PROTOS)
def test_committed_stubs_describe_the_proto(name: str, tmp_path: Path) -> None:
    """Fast, with whatever grpcio-tools is installed: the committed module describes the .proto as it is now."""
    try:
        import grpc_tools.protoc  # noqa: F401
    except ImportError:
        missing("grpcio-tools is not installed (pip install -e '.[dev]')")
    out = tmp_path / "set.bin"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={ROOT / 'service' / 'grpc'}",
                    f"--descriptor_set_out={out}", str(ROOT / "service" / "grpc" / f"{name}.proto")],
                   check=True, capture_output=True, timeout=120)
    expected = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(
        serialized_descriptor((GEN / f"{name}_pb2.py").read_text()))
    for message in (*expected.message_type, *committed.message_type):
        without_json_names(message)
    assert committed == expected, HINT


@pytest.mark.parametrize("name", STUBS)
def test_committed_stubs_match_the_pinned_generator(regenerated: Path, name: str) -> None:
    assert (GEN / name).read_text() == (regenerated / name).read_text(), HINT


@pytest.mark.parametrize("name", PROTOS)
def test_stubs_carry_no_protobuf_runtime_pin(name: str) -> None:
    """Gencode with ValidateProtobufRuntimeVersion refuses other protobuf majors: the stubs must not have it."""
    source = (GEN / f"{name}_pb2.py").read_text()
    assert "runtime_version" not in source, f"{name}_pb2.py checks the protobuf runtime version: {HINT}"


def test_dependency_floors_admit_the_gencode() -> None:
    """The protobuf and grpcio floors in pyproject.toml are at least what the generated code needs."""
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    by_name = {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower(): r for r in requirements}
    for name in PROTOS:
        gencode = re.search(r"^# Protobuf Python Version: ([\d.]+)$", (GEN / f"{name}_pb2.py").read_text(), re.M)
        assert gencode, f"{name}_pb2.py names no protobuf version"
        assert lower_bound(by_name["protobuf"]) >= version(gencode.group(1)), by_name["protobuf"]
        grpc_gen = re.search(r"^GRPC_GENERATED_VERSION = '([\d.]+)'$", (GEN / f"{name}_pb2_grpc.py").read_text(),
                             re.M)
        assert grpc_gen, f"{name}_pb2_grpc.py names no grpcio version"
        assert lower_bound(by_name["grpcio"]) >= version(grpc_gen.group(1)), by_name["grpcio"]


def test_grpc_stubs_import_their_messages_from_the_package() -> None:
    code = (
        "from service.grpc.gen import segserve_pb2, segserve_pb2_grpc, grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc\n"
        "assert segserve_pb2_grpc.segserve__pb2 is segserve_pb2\n"
        "assert grpc_predict_v2_pb2_grpc.grpc__predict__v2__pb2 is grpc_predict_v2_pb2\n"
        "print(segserve_pb2.DESCRIPTOR.services_by_name['Segmentation'].full_name)\n"
        "print(grpc_predict_v2_pb2.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name)\n"
    )
    # Warnings as errors: a stub that warns about its protobuf or grpcio runtime fails here.
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["segserve.v1.Segmentation", "inference.GRPCInferenceService"]


@pytest.mark.parametrize("client", ["tritonclient.grpc", "kserve"])
@pytest.mark.parametrize("segserve_first", [True, False], ids=["segserve-first", "client-first"])
def test_oip_stubs_load_beside_the_clients_own(client: str, segserve_first: bool) -> None:
    """tritonclient.grpc and kserve define `inference.*` in protobuf's default pool: segserve's stubs keep theirs
    in a pool of their own, so both load into one process, in either order, and speak the same wire format."""
    if importlib.util.find_spec(client.split(".")[0]) is None:  # found, not imported: this process may hold the other
        missing(f"{client} is not installed (pip install -e '.[dev]')")
    ours = "from service.grpc.gen import grpc_predict_v2_pb2 as pb\n"
    theirs = f"import {client}\n"
    code = (ours + theirs if segserve_first else theirs + ours) + (
        "from google.protobuf import descriptor_pool\n"
        "theirs = descriptor_pool.Default().FindMessageTypeByName('inference.ModelInferRequest')\n"
        "request = pb.ModelInferRequest(model_name='m', raw_input_contents=[b'abc'],\n"
        "                               parameters={'b': pb.InferParameter(int64_param=7)})\n"
        "from google.protobuf import message_factory\n"
        "decoded = message_factory.GetMessageClass(theirs).FromString(request.SerializeToString())\n"
        "assert decoded.model_name == 'm' and decoded.raw_input_contents[0] == b'abc'\n"
        "assert decoded.parameters['b'].int64_param == 7\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
