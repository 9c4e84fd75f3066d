"""Every PromQL expression shipped in deploy/ names only series that segserve exports.

The Grafana dashboard, the Prometheus alert rules and the prometheus-adapter rules (which feed the
HorizontalPodAutoscaler) all query metrics by name; a renamed metric would leave an empty panel, an
alert that never fires or an autoscaler stuck at its minimum, none of which fails loudly. The names are
pulled out of each expression by a small PromQL scanner and compared with the series a running server
exposes (the `live_server` fixture from tests/conftest.py) and, offline, with the families declared
in service/metrics.py. promtool, Prometheus's own parser, checks that every expression parses.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml

from tests.paths import ROOT
from tests.tools import require_tool

DASHBOARD = ROOT / "deploy/grafana/dashboards/segserve.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ADAPTER_RULES = ROOT / "deploy/k8s/prometheus-adapter/rules.yaml"

# Series that Prometheus writes itself for every scrape target; segserve cannot export them.
PROMETHEUS_SYNTHETIC = {"up"}

# Series each metric type exposes, by suffix (counters are named without `_total` in the registry).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([^"]+)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\b\s*(?:\([^()]*\))?")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "inf", "nan"}
_GRAFANA_INTERVAL = re.compile(r"\$(?:__rate_interval|__interval|__range)\b")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects.

    Label matchers `{...}`, ranges `[...]`, groupings `by (...)`/`on (...)`, strings, numbers and
    `offset` are removed first, so label names and durations cannot pass for metrics; of the
    identifiers left, those followed by `(` are functions or aggregations, the rest are selectors.
    """
    names = set(_NAME_MATCHER.findall(expr))
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    for name, call in _IDENTIFIER.findall(text):
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def series_names(families: Iterable[tuple[str, str]]) -> set[str]:
    """Series names exposed for (family name, type) pairs, e.g. a histogram's `_bucket`, `_count`..."""
    names = set()
    for name, kind in families:
        base = name.removesuffix("_total") if kind == "counter" else name
        names.update(base + suffix for suffix in _SUFFIXES.get(kind, ("",)))
    return names


def exposition_series_names(text: str) -> set[str]:
    """Series names in Prometheus text exposition: declared families (with or without samples yet)
    plus every sample name."""
    families, samples = [], set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families.append((name, kind.strip()))
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return series_names(families) | samples


def _render_adapter_query(rule: dict) -> list[str]:
    """A prometheus-adapter rule's queries, templates filled in as the adapter would for one pod."""
    series = promql_metric_names(rule["seriesQuery"])
    assert len(series) == 1, f"seriesQuery should select one series: {rule['seriesQuery']}"
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series.pop())
        .replace("<<.LabelMatchers>>", 'namespace="default",pod="segserve-0"')
        .replace("<<.GroupBy>>", "pod")
    )
    assert "<<" not in query, f"unrendered template in {query}"
    return [rule["seriesQuery"], query]


def deploy_expressions() -> list[tuple[str, str]]:
    """(where, expression) for every PromQL query under deploy/."""
    exprs = []
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append((f"dashboard panel {panel['title']!r}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        assert match, f"dashboard variable {variable['name']}: unsupported query {query!r}"
        exprs.append((f"dashboard variable {variable['name']!r}", match.group(1)))
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            exprs.append((f"alert {rule['alert']}", rule["expr"]))
    for rule in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]:
        for query in _render_adapter_query(rule):
            exprs.append((f"adapter rule {rule['name']['as']}", query))
    return exprs


def _unknown_names(exported: set[str]) -> dict[str, set[str]]:
    unknown: dict[str, set[str]] = {}
    for where, expr in deploy_expressions():
        missing = promql_metric_names(expr) - exported - PROMETHEUS_SYNTHETIC
        if missing:
            unknown.setdefault(where, set()).update(missing)
    return unknown


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up == 0", {"up"}),
        ('sum by (status) (rate(a_total{status!~"2..", route="/x"}[5m]))', {"a_total"}),
        ("histogram_quantile(0.95, sum by (le, level) (rate(h_bucket[$__rate_interval])))", {"h_bucket"}),
        ("rate(s_sum[1m]) / clamp_min(rate(s_count[1m]), 1e-9)", {"s_sum", "s_count"}),
        ("a / on (pod) group_left (model) b offset 5m > bool 0.5", {"a", "b"}),
        ("sum(x) without (instance) and ignoring (job) y unless z", {"x", "y", "z"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
        ('{__name__="named_series", job="j"}', {"named_series"}),
        ("max_over_time(g[1h:5m]) + 0x1f - .5 * Inf", {"g"}),
        ("job:request_rate:sum5m > 3", {"job:request_rate:sum5m"}),
    ],
)
def test_extractor_finds_metric_names(expr: str, expected: set[str]) -> None:
    assert promql_metric_names(expr) == expected


def test_series_names_add_the_suffixes_of_each_type() -> None:
    names = series_names([("a", "counter"), ("b_total", "counter"), ("h", "histogram"), ("g", "gauge")])
    assert names == {
        "a_total", "a_created", "b_total", "b_created", "h_bucket", "h_count", "h_sum", "h_created", "g",
    }


def test_deploy_expressions_use_the_metrics_operators_need() -> None:
    # Guards against a scanner or loader that quietly finds nothing, which would make the checks
    # below pass vacuously.
    used = set().union(*(promql_metric_names(expr) for _, expr in deploy_expressions()))
    assert {
        "segserve_requests_total", "segserve_request_duration_seconds_bucket",
        "segserve_budget_outcomes_total", "segserve_point_chosen_total", "segserve_batch_size_sum",
        "segserve_delivered_quality_sum",
        "segserve_queue_depth", "segserve_cache_requests_total", "segserve_queue_wait_seconds_sum",
        "segserve_queue_wait_seconds_count",
    } <= used


def test_deploy_metrics_are_declared_in_service_metrics() -> None:
    from service.metrics import Metrics

    exported = series_names((family.name, family.type) for family in Metrics().registry.collect())
    assert _unknown_names(exported) == {}


def test_deploy_metrics_are_exported_by_a_running_server(live_server) -> None:
    with urllib.request.urlopen(f"{live_server.base_url}/metrics", timeout=10) as response:
        exported = exposition_series_names(response.read().decode())
    assert "segserve_requests_total" in exported, "no segserve metrics at /metrics"
    assert _unknown_names(exported) == {}


def test_deploy_expressions_parse(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "run scripts/install-deploy-tools.sh")
    rules, origins = [], []
    for i, (where, expr) in enumerate(deploy_expressions()):
        # Grafana's interval variables are the only `$` outside strings; promtool needs a duration.
        rules.append({"record": f"check:expr_{i}", "expr": _GRAFANA_INTERVAL.sub("5m", expr)})
        origins.append(f"expr_{i}: {where}")
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "deploy", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode == 0, "\n".join([result.stdout + result.stderr, *origins])
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
