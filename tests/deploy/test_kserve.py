"""deploy/kserve: the InferenceService validates offline against KServe's own CRD schema, strictly, and keeps
the promises the service makes (v2 protocol, ports, probes on the protocol's health endpoints, a drain that
fits the grace period, non-root, Guaranteed resources, valid segserve settings).

InferenceService is a custom resource, which kubernetes-validate does not know, so the schema is vendored:
`tests/data/kserve/` holds the `openAPIV3Schema` of KServe v0.20.0's CRD (its README says where it comes from).
It is made strict the way kubeconform does it: an object that lists its properties accepts no others, unless
the CRD marks it `x-kubernetes-preserve-unknown-fields`; the API server's strict field validation (kubectl's
default) refuses unknown fields the same way. The pod part is also checked by kubernetes-validate --strict.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.paths import ROOT
from tests.tools import find_tool, missing

MANIFEST = ROOT / "deploy/kserve/inferenceservice.yaml"
SCHEMA = ROOT / "tests/data/kserve/inferenceservice-v1beta1.schema.json.gz"
SCHEMA_SHA256 = "59b9526065d4b4dec884b2b48723225af63bc15980abb4a72e766aef5f6723f2"  # of the JSON, as in the README
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,43}[a-z0-9])?$")  # KServe appends "-predictor-..." to the name
# PodSpec fields KServe adds beside the pod's own in `spec.predictor` (ComponentExtensionSpec and predictor keys).
KSERVE_PREDICTOR_KEYS = {
    "minReplicas", "maxReplicas", "scaleMetric", "scaleMetricType", "scaleTarget", "autoScaling",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
    "deploymentStrategy", "storageUris", "workerSpec", "model",
}


def strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists properties (kubeconform -strict)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if "items" in out:
        out["items"] = strict(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    return out


@functools.cache
def validator() -> Any:
    try:
        import jsonschema
    except ImportError:
        missing("jsonschema missing (kubernetes-validate brings it): run scripts/install-deploy-tools.sh")
    text = gzip.decompress(SCHEMA.read_bytes())
    assert hashlib.sha256(text).hexdigest() == SCHEMA_SHA256, "the vendored schema differs from the README's"
    return jsonschema.Draft7Validator(strict(json.loads(text)))


def errors(document: dict) -> list[str]:
    found = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
             for e in validator().iter_errors(document)]
    if not DNS_1035.match(document["metadata"]["name"]):
        found.append(f"metadata.name {document['metadata']['name']!r} is not a DNS-1035 label of <= 45 characters")
    return found


@pytest.fixture(scope="module")
def isvc() -> dict:
    documents = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    assert len(documents) == 1
    return documents[0]


def container(isvc: dict) -> dict:
    (only,) = isvc["spec"]["predictor"]["containers"]
    return only


def env(isvc: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(isvc)["env"]}


def test_matches_the_kserve_crd_schema(isvc: dict) -> None:
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert errors(isvc) == []


@pytest.mark.parametrize("mistake", [
    ("a misspelt probe", lambda c, p: c.__setitem__("readinesProbe", c["readinessProbe"])),
    ("a port number as text", lambda c, p: c["ports"][0].__setitem__("containerPort", "8080")),
    ("an unknown scale metric", lambda c, p: p.__setitem__("scaleMetric", "queue")),
    ("a field of the wrong level", lambda c, p: p.__setitem__("replicas", 2)),
    ("a malformed quantity", lambda c, p: c["resources"]["limits"].__setitem__("memory", "3 gigs")),
])
def test_the_validation_bites(isvc: dict, mistake: tuple[str, Any]) -> None:
    # Proves the check above is not a validator that accepts anything.
    broken = copy.deepcopy(isvc)
    mistake[1](container(broken), broken["spec"]["predictor"])
    assert errors(broken), f"{mistake[0]} passed"


def test_pod_part_passes_kubernetes_validate_strict(isvc: dict, tmp_path: Path) -> None:
    validate = find_tool("kubernetes-validate")
    if validate is None:
        missing("kubernetes-validate not found: run scripts/install-deploy-tools.sh")
    pod_spec = {k: v for k, v in isvc["spec"]["predictor"].items() if k not in KSERVE_PREDICTOR_KEYS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "segserve-predictor"}, "spec": pod_spec}
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(pod))
    result = subprocess.run([validate, "--strict", str(manifest)], capture_output=True, text=True)
    assert result.returncode == 0 and " passed " in result.stdout + result.stderr, result.stdout + result.stderr


def test_custom_predictor_speaks_v2_on_the_ports_segserve_listens_on(isvc: dict) -> None:
    main = container(isvc)
    settings = env(isvc)
    assert main["name"] == "kserve-container"  # the name KServe looks for
    assert settings["PROTOCOL"] == "v2"  # KServe's custom predictors default to v1
    ports = main["ports"]
    # KServe maps the first port to the Service's port 80 and gives a port named *grpc* appProtocol grpc.
    assert (ports[0]["name"], ports[0]["containerPort"]) == ("http", int(settings["SEGSERVE_PORT"]))
    assert "grpc" in ports[1]["name"] and ports[1]["containerPort"] == int(settings["SEGSERVE_GRPC_PORT"])
    assert settings["SEGSERVE_HOST"] == "0.0.0.0"
    annotations = isvc["metadata"]["annotations"]
    mode = annotations["serving.kserve.io/deploymentMode"]
    assert mode in {"RawDeployment", "Standard"}, "Knative allows one port per container"
    assert annotations["prometheus.kserve.io/port"] == settings["SEGSERVE_PORT"]
    assert annotations["prometheus.kserve.io/path"] == "/metrics"


def test_settings_are_valid_segserve_settings(isvc: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    settings = {k: v for k, v in env(isvc).items() if k.startswith("SEGSERVE_")}
    fields = {f"SEGSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(settings) <= fields, f"not a segserve setting: {set(settings) - fields}"
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    parsed = Settings()  # raises on a value out of bounds
    assert parsed.grpc_port == 8081 and parsed.log_format == "json"
    assert parsed.threads_per_worker == int(float(container(isvc)["resources"]["limits"]["cpu"]))


def test_probes_use_the_protocol_health_endpoints_and_the_drain_fits(isvc: dict) -> None:
    main = container(isvc)
    assert main["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    startup = main["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "calibration needs minutes on a CPU"
    command = main["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = int(command[1]) + float(env(isvc)["SEGSERVE_SHUTDOWN_GRACE_S"])
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > drain, "SIGKILL would cut the drain short"


def test_runs_non_root_with_guaranteed_resources(isvc: dict) -> None:
    predictor = isvc["spec"]["predictor"]
    main = container(isvc)
    dockerfile_user = re.findall(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), flags=re.M)[-1]
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert predictor["securityContext"]["runAsUser"] == int(dockerfile_user)
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in predictor["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must stay writable"
    resources = main["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and resources["requests"] == resources["limits"]
    assert predictor["minReplicas"] >= 2 and predictor["maxReplicas"] >= predictor["minReplicas"]
