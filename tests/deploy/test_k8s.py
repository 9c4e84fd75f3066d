"""Kubernetes manifests under deploy/k8s: each overlay renders with kustomize, passes
kubernetes-validate --strict, and keeps the promises the service makes (probes on /healthz and /readyz,
a drain that fits in the grace period, non-root, the HPA reading metrics the adapter serves).

The ServiceMonitor is a custom resource kubernetes-validate has no schema for (it only warns), so it
lives in deploy/k8s/monitoring and is checked here against a schema of the fields we use.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.paths import ROOT
from tests.tools import find_tool, missing

K8S = ROOT / "deploy/k8s"
OVERLAYS = ("cpu", "gpu")
# Oldest Kubernetes release we promise to run on, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.28.0", None)


_tool = find_tool
_missing = missing


def _validator() -> str:
    found = _tool("kubernetes-validate")
    if found is None:
        _missing("kubernetes-validate not found: run scripts/install-deploy-tools.sh")
    return found


@functools.cache
def _kustomize_command() -> tuple[str, ...] | None:
    # kubectl embeds kustomize; releases before 1.21 embed v2, which lacks `labels` and `behavior`.
    kubectl = _tool("kubectl")
    if kubectl:
        version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True).stdout
        if re.search(r"Kustomize Version: v([4-9]|\d{2,})\.", version):
            return (kubectl, "kustomize")
    kustomize = _tool("kustomize")
    return (kustomize, "build") if kustomize else None


def render(directory: Path) -> list[dict]:
    command = _kustomize_command()
    if command is None:
        _missing("kubectl (with kustomize v4+) or kustomize not found: run scripts/install-deploy-tools.sh")
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# Ids other than the bare "gpu", which tests/conftest.py reads as the `gpu` marker (a CUDA device):
# rendering the GPU overlay needs none.
@pytest.fixture(scope="module", params=OVERLAYS, ids=lambda name: f"{name}-overlay")
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server(docs: list[dict]) -> tuple[dict, dict]:
    """segserve's pod spec and its container."""
    pod = one(docs, "Deployment", "segserve")["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "segserve")


def settings_env(docs: list[dict]) -> dict[str, str]:
    """The SEGSERVE_* variables the server container gets from its (hash-named) ConfigMap."""
    _, container = server(docs)
    (ref,) = [e["configMapRef"]["name"] for e in container["envFrom"]]
    return one(docs, "ConfigMap", ref)["data"]


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_overlay_passes_kubernetes_validate_strict(overlay, version, tmp_path: Path) -> None:
    name, docs = overlay
    validator = _validator()
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    command = [validator, "--strict", *(["-k", version] if version else []), str(manifest)]
    result = subprocess.run(command, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # An unknown kind is only a warning there; every resource must really have been checked.
    assert output.count(" passed ") == len(docs), output


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path) -> None:
    # Proves --strict bites: the checks above would pass with a validator that accepts anything.
    validator = _validator()
    docs = render(K8S / "overlays/cpu")
    one(docs, "Deployment", "segserve")["spec"]["replica"] = 2
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    assert subprocess.run([validator, "--strict", str(manifest)], capture_output=True).returncode != 0


def test_settings_are_valid_segserve_settings(overlay, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    env = settings_env(overlay[1])
    fields = {f"SEGSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"not a segserve setting: {set(env) - fields}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # raises on a value out of bounds
    assert settings.host == "0.0.0.0" and settings.grpc_port == 50051 and settings.redis_url


def test_probes_and_graceful_drain(overlay) -> None:
    docs = overlay[1]
    pod, container = server(docs)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "calibration needs minutes on a CPU"
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = int(command[1]) + float(settings_env(docs)["SEGSERVE_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > drain, "SIGKILL would cut the drain short"


def test_api_keys_are_required_and_come_from_a_mounted_secret(overlay, tmp_path: Path) -> None:
    import base64

    from service.api.guards import read_key_file

    docs = overlay[1]
    env = settings_env(docs)
    assert env["SEGSERVE_AUTH"] == "on", "pods listen on 0.0.0.0: API keys are required"
    assert "SEGSERVE_API_KEYS" not in env, "keys (even digests) belong in the Secret, not the ConfigMap"
    pod, container = server(docs)
    key_file = Path(env["SEGSERVE_API_KEYS_FILE"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    (volume,) = [v for v in pod["volumes"] if "secret" in v and mounts[v["name"]]["mountPath"] == str(key_file.parent)]
    assert mounts[volume["name"]].get("readOnly") is True
    secret = one(docs, "Secret", volume["secret"]["secretName"])  # the generated, hash-named Secret
    (tmp_path / key_file.name).write_bytes(base64.b64decode(secret["data"][key_file.name]))
    read_key_file(str(tmp_path / key_file.name))  # digests only: a plain key there would stop the server at start
    # Probes and the scrape stay open without a key (service/api/guards.py): they need no credentials here.
    assert all("httpHeaders" not in container[p]["httpGet"] for p in ("livenessProbe", "readinessProbe"))


def test_runs_non_root_on_a_read_only_root(overlay) -> None:
    pod, container = server(overlay[1])
    dockerfile_user = re.findall(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), flags=re.M)[-1]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(dockerfile_user)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must stay writable"
    assert "/models" in mounts
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


def test_service_pdb_and_redis_select_the_right_pods(overlay) -> None:
    docs = overlay[1]
    pod_labels = one(docs, "Deployment", "segserve")["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service", "segserve")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert (ports["http"]["port"], ports["grpc"]["port"]) == (8080, 50051)
    container_ports = {p["name"] for p in server(docs)[1]["ports"]}
    assert {p["targetPort"] for p in ports.values()} <= container_ports
    pdb = one(docs, "PodDisruptionBudget", "segserve")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    redis_url = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", settings_env(docs)["SEGSERVE_REDIS_URL"])
    redis_service = one(docs, "Service", redis_url.group(1))
    assert int(redis_url.group(2)) in {p["port"] for p in redis_service["spec"]["ports"]}
    redis_pods = one(docs, "Deployment", "segserve-redis")["spec"]["template"]["metadata"]["labels"]
    assert redis_service["spec"]["selector"].items() <= redis_pods.items()


def test_device_specific_settings(overlay) -> None:
    name, docs = overlay
    pod, container = server(docs)
    image_tag = container["image"].rpartition(":")[2]
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    device = settings_env(docs)["SEGSERVE_DEVICE"]
    if name == "gpu":
        assert image_tag.endswith("-gpu") and gpus == 1 and device == "cuda"
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert not image_tag.endswith("-gpu") and gpus is None and device == "cpu"


def test_hpa_scales_on_metrics_the_adapter_serves(overlay) -> None:
    docs = overlay[1]
    hpa = one(docs, "HorizontalPodAutoscaler", "segserve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "segserve"}
    assert hpa["spec"]["minReplicas"] >= 2, "the PDB needs a second pod to allow a drain"
    adapter = yaml.safe_load((K8S / "prometheus-adapter/rules.yaml").read_text())["rules"]["custom"]
    served = {rule["name"]["as"] for rule in adapter}
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["spec"]["metrics"]}
    assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"])
    assert targets and set(targets) <= served, set(targets) - served
    # Queue-depth target: one full batch per worker, which differs between the overlays.
    env = settings_env(docs)
    batch = int(env["SEGSERVE_MAX_BATCH_SIZE"]) * int(env.get("SEGSERVE_WORKERS", "1"))
    assert float(targets["segserve_queue_depth"]["averageValue"]) == batch


_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
# The ServiceMonitor fields we use, from the monitoring.coreos.com/v1 CRD; anything else is a typo.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS},
        },
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object", "required": ["matchLabels"], "additionalProperties": False,
                    "properties": {"matchLabels": _LABELS},
                },
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["port"], "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                            "interval": _DURATION, "scrapeTimeout": _DURATION,
                            "scheme": {"enum": ["http", "https"]},
                        },
                    },
                },
            },
        },
    },
}


def test_service_monitor_matches_its_schema_and_the_service() -> None:
    try:
        import jsonschema
    except ImportError:
        _missing("jsonschema missing (kubernetes-validate brings it): run scripts/install-deploy-tools.sh")
    (monitor,) = render(K8S / "monitoring")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    service = one(render(K8S / "overlays/cpu"), "Service", "segserve")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])
