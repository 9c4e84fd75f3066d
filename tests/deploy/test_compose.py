"""docker-compose.yml and the Prometheus / Grafana files it mounts.

`docker-compose config` validates and resolves the compose file without a Docker engine; the checks
below read its resolved output, so they see what compose would actually run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.paths import ROOT
from tests.tools import require_tool

DEPLOY = ROOT / "deploy"


def _compose_command() -> list[str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    if shutil.which("docker-compose", path=path):
        return [shutil.which("docker-compose", path=path)]
    docker = shutil.which("docker", path=path)
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    reason = "docker-compose not found: run scripts/install-deploy-tools.sh"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def compose() -> dict:
    # No SEGSERVE_* from the developer's shell may leak into the resolved file.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGSERVE_", "GRAFANA_"))}
    result = subprocess.run(
        [*_compose_command(), "-f", str(ROOT / "docker-compose.yml"), "config"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path of a resolved service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            host, container = volume.split(":")[:2]
        else:
            host, container = volume["source"], volume["target"]
        mounts[container] = host
    return mounts


def test_services_start_in_order_of_health(compose: dict) -> None:
    services = compose["services"]
    order = {"segserve": "redis", "prometheus": "segserve", "grafana": "prometheus"}
    for service, dependency in order.items():
        assert services[service]["depends_on"] == {dependency: {"condition": "service_healthy"}}
        assert services[dependency]["healthcheck"]["test"], f"{dependency} needs a healthcheck"
    assert services["redis"]["image"] == "redis:7-alpine"


def test_segserve_service(compose: dict) -> None:
    segserve = compose["services"]["segserve"]
    env = segserve["environment"]
    assert env["SEGSERVE_REDIS_URL"] == "redis://redis:6379/0"
    # Unset in the shell -> unset in the container (an empty string would name the checkpoint "").
    assert env.get("SEGSERVE_CHECKPOINT") is None
    assert _mounts(segserve)["/models"].endswith("checkpoints")
    assert segserve["build"]["target"] == "cpu"
    assert {int(port["target"]) for port in segserve["ports"]} == {8080, 50051}
    assert any("/readyz" in part for part in segserve["healthcheck"]["test"])
    grace = float(env["SEGSERVE_SHUTDOWN_GRACE_S"])
    stop = segserve["stop_grace_period"]
    assert stop.endswith("s") and float(stop[:-1]) > grace, "compose must wait longer than the drain"


def test_segserve_requires_api_keys_from_a_secret_file(compose: dict) -> None:
    from service.api.guards import read_key_file

    segserve = compose["services"]["segserve"]
    env = segserve["environment"]
    assert env["SEGSERVE_AUTH"] == "on", "the port is published: API keys are required"
    assert env.get("SEGSERVE_API_KEYS") is None  # plain keys only from the shell, never written here
    (secret,) = [s if isinstance(s, str) else s["source"] for s in segserve["secrets"]]
    assert env["SEGSERVE_API_KEYS_FILE"] == f"/run/secrets/{secret}"  # where compose mounts a service secret
    digests = Path(compose["secrets"][secret]["file"])
    assert digests.is_file()
    read_key_file(str(digests))  # digests only: a plain key there would stop the server at start


def test_prometheus_scrapes_segserve_and_loads_the_alerts(compose: dict) -> None:
    prometheus = compose["services"]["prometheus"]
    mounts = _mounts(prometheus)
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == DEPLOY / "prometheus/prometheus.yml"
    for rule_file in config["rule_files"]:
        assert Path(mounts[rule_file]).parent == DEPLOY / "prometheus"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "segserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["segserve:8080"]
    # The alert rules select job="segserve"; the job name must stay what they expect.
    assert 'job="segserve"' in (DEPLOY / "prometheus/alerts.yml").read_text()


def test_prometheus_files_pass_promtool() -> None:
    promtool = require_tool("promtool", "run scripts/install-deploy-tools.sh")
    # --syntax-only: rule_files name container paths, which do not exist here.
    for command in (["check", "config", "--syntax-only", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        result = subprocess.run(
            [promtool, *command], cwd=DEPLOY / "prometheus", capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_the_dashboard(compose: dict) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _mounts(grafana)
    assert Path(mounts["/etc/grafana/provisioning"]) == DEPLOY / "grafana/provisioning"
    provisioning = DEPLOY / "grafana/provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards/segserve.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert Path(mounts[dashboards_dir]) == DEPLOY / "grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir) and (DEPLOY / "grafana/dashboards" / Path(home).name).exists()
    dashboard = json.loads((DEPLOY / "grafana/dashboards/segserve.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}, "every panel must use the provisioned datasource"


def test_dashboard_has_the_operator_panels() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/segserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]

    def has(*needles: str) -> bool:
        return any(all(n in e for n in needles) for e in exprs)

    required = {
        "request rate": has("rate(segserve_requests_total"),
        **{
            name: has(f"histogram_quantile({q},", "segserve_request_duration_seconds_bucket")
            for name, q in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))
        },
        "budget met ratio": has('outcome="met"', "segserve_budget_outcomes_total"),
        "point mix": has("sum by (point)", "segserve_point_chosen_total"),
        "delivered quality": has("segserve_delivered_quality_sum", "segserve_delivered_quality_count"),
        "batch size": has("segserve_batch_size_"),
        "queue depth": has("segserve_queue_depth"),
        "cache hit ratio": has('result="hit"', "segserve_cache_requests_total"),
        "errors by status": has("sum by (status)", 'status!~"2.."', "segserve_requests_total"),
    }
    assert all(required.values()), [name for name, ok in required.items() if not ok]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
