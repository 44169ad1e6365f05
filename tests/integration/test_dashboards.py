"""The Grafana dashboard (deploy/grafana/switchyard.json) and the Prometheus rules
(deploy/prometheus/rules.yaml) against a live gateway: every metric their queries name is
one a running gateway serves on /metrics (or one the rules record); the dashboard's shape
(variables, rows, a title and a description on every panel, the price-change
annotation); the rules' alerts carry a severity and their annotations; `promtool check
rules` on the rules and on every dashboard query, and `promtool test rules` on
rules.test.yaml (Debian's prometheus package, which `make test` installs as root)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import PoliciesSettings
from gateway.server import Gateway, start_gateway
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, fleet_config, raw_request, samples

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "switchyard.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules.test.yaml"

# --------------------------------------------------------------------------- PromQL names

_TOKEN = re.compile(
    r"""(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<range>\[[^\]]*\])
    |(?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])\d*)*)
    |(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<space>\s+)
    |(?P<other>.)""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_GRAFANA_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.DOTALL)


def grafana_to_promql(query: str) -> str:
    """A Grafana query as Prometheus would get it: `label_values(expr, label)` is its
    expression, and `$__rate_interval` and the like are durations (variables inside label
    matchers are in strings, which the name scan passes over)."""
    matched = _LABEL_VALUES.match(query)
    if matched:
        query = matched.group(1)
    return _GRAFANA_VARIABLE.sub("5m", query)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: names not called as functions or
    aggregations, outside label matchers (`{...}`) and label lists (`by (...)`,
    `on (...)`, ...), and not keywords. Strings, ranges and numbers are skipped."""
    tokens = [
        (m.lastgroup, m.group())
        for m in _TOKEN.finditer(expr)
        if m.lastgroup not in ("space", "string")
    ]
    names: set[str] = set()
    braces = 0
    skip_list = False
    for i, (kind, text) in enumerate(tokens):
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "other":
            if text == "{":
                braces += 1
            elif text == "}":
                braces -= 1
            elif text == ")" and skip_list:
                skip_list = False
            continue
        if kind != "name" or braces or skip_list:
            continue
        lowered = text.lower()
        if lowered in _LABEL_LISTS:
            skip_list = following == "("
            continue
        if lowered in _KEYWORDS or following == "(" or following.lower() in ("by", "without"):
            continue  # a keyword, a function, or an aggregation (`sum by (...) (...)`)
        names.add(text)
    return names


@pytest.mark.parametrize(
    "expr, names",
    [
        ("up", {"up"}),
        ('rate(a_total{model=~"$model", job="x"}[5m])', {"a_total"}),
        (
            "sum by (model, le) (rate(h_bucket[1m])) / ignoring (le) group_left () c * 1e6",
            {"h_bucket", "c"},
        ),
        ("sum(rate(x[5m])) without (instance) > bool 0.5e-3", {"x"}),
        ("histogram_quantile(0.99, sum by (le) (rate(b_bucket[5m]))) * 1000", {"b_bucket"}),
        ("a offset 1h and on (backend) b unless c or d", {"a", "b", "c", "d"}),
        ('label_replace(x, "dst", "$1", "src", "(.*)")', {"x"}),
        (
            "level:metric:rate5m > 14.4 * other:metric:ratio",
            {"level:metric:rate5m", "other:metric:ratio"},
        ),
        ('count_values("v", m) + time() - vector(1) + Inf', {"m"}),
        ("rate(c[5m:1m]) + d @ 1609746000", {"c", "d"}),
    ],
)
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_grafana_queries_read_as_promql() -> None:
    assert grafana_to_promql('label_values(m{a=~"$model"}, sla_class)') == 'm{a=~"5m"}'
    assert grafana_to_promql("rate(x[$__rate_interval]) * ${factor}") == "rate(x[5m]) * 5m"


# --------------------------------------------------------------------------- the files


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def load_rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return rules


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' own collapsed panels included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard: panel targets, annotations and
    the template variables' queries."""
    queries = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            queries.append((f"variable {variable['name']!r}", text))
    return [(where, grafana_to_promql(text)) for where, text in queries]


def rule_queries(rules: dict[str, Any]) -> tuple[list[tuple[str, str]], set[str]]:
    """(where, PromQL) for every rule, and the names the recording rules define."""
    queries = []
    recorded = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule["alert"]
            queries.append((f"rule {name}", rule["expr"]))
            if "record" in rule:
                recorded.add(rule["record"])
    return queries, recorded


def test_dashboard_shape() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "switchyard"
    assert dashboard["schemaVersion"] == 39  # Grafana 10.4, as __requires says
    grafana = [r for r in dashboard["__requires"] if r["id"] == "grafana"]
    assert grafana and grafana[0]["version"].startswith("10.4")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "sla_class", "backend"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"]["uid"] == "${datasource}", name
    rows = [p["title"].split(":")[0] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Traffic", "Cost", "SLA", "Decisions", "Backends", "Prices", "Load shedding"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        where = f"panel {panel['title']!r}"
        assert panel["title"].strip() and len(panel["description"]) > 40, where
        assert panel["datasource"]["uid"] == "${datasource}", where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", where
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["w"] > 0 and pos["h"] > 0, where
    prices = [a for a in dashboard["annotations"]["list"] if a.get("name") == "Price changes"]
    assert prices and "changes(switchyard_backend_price_usd_per_hour" in prices[0]["expr"]


def test_every_alert_has_severity_and_says_what_happened() -> None:
    alerts = {}
    for group in load_rules()["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                alerts[rule["alert"]] = rule
    assert set(alerts) == {
        "SwitchyardSLABurnRateFast",
        "SwitchyardSLABurnRateSlow",
        "SwitchyardModelUnavailable",
        "SwitchyardBackendsEjected",
        "SwitchyardStateStoreDown",
        "SwitchyardFeedStale",
    }
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


# --------------------------------------------------------------------------- a live gateway

POLICIES = {
    "default": {"latency_ms": 200},
    "classes": {"gold": {"latency_ms": 50, "percentile": 95}},
    "models": {"digits": {"latency_ms": 100}},
}


@pytest.fixture
async def live(two_workers: tuple[Worker, Worker]) -> AsyncIterator[Gateway]:
    a, b = two_workers
    config = fleet_config({"cheap": (a.address, 0.04), "dear": (b.address, 0.08)})
    config = config.model_copy(update={"policies": PoliciesSettings.model_validate(POLICIES)})
    gw = await start_gateway(config)
    yield gw
    await gw.stop()


async def scrape(gw: Gateway) -> str:
    url = f"http://127.0.0.1:{gw.metrics_port}/metrics"
    return await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())


_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "gauge": ("",),
    "stateset": ("",),
    "unknown": ("",),
}


def exported_names(text: str) -> set[str]:
    """The sample names a /metrics text can hold, from its `# TYPE` lines (a labelled
    family with no children yet shows those lines but no samples)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES[family.type])
    return names


def target_values(text: str, family: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["model"], s.labels["sla_class"]): s.value
        for f in text_string_to_metric_families(text)
        if f.name == family
        for s in f.samples
    }


async def test_every_query_names_a_metric_the_gateway_serves(
    live: Gateway, repository: Path
) -> None:
    inputs, _ = samples(repository, "digits")
    request = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})
    gold = pb.ModelInferRequest.FromString(request.SerializeToString())
    gold.parameters["sla_class"].string_param = "gold"
    async with grpc.aio.insecure_channel(live.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            await stub.ModelInfer(request)
            await stub.ModelInfer(gold)
    text = await scrape(live)
    exported = exported_names(text)
    assert "switchyard_request_latency_seconds_bucket" in exported
    assert 'switchyard_sla_requests_total{model="digits",outcome="met",sla_class="gold"}' in text

    rule_exprs, recorded = rule_queries(load_rules())
    missing: dict[str, list[str]] = {}
    for where, expr in dashboard_queries(load_dashboard()) + rule_exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names - exported - recorded:
            missing.setdefault(name, []).append(where)
    assert not missing, f"queries name metrics the gateway does not serve: {missing}"

    # The SLA targets: per known model, for the default class and each class.
    latency = target_values(text, "switchyard_sla_target_latency_ms")
    percentile = target_values(text, "switchyard_sla_target_percentile")
    assert latency[("digits", "default")] == 100 and percentile[("digits", "default")] == 99
    assert latency[("digits", "gold")] == 50 and percentile[("digits", "gold")] == 95
    others = {model for model, _ in latency} - {"digits"}
    assert others, "only digits has a target: the other models of the repository are missing"
    for model in others:
        assert latency[(model, "default")] == 200 and latency[(model, "gold")] == 50, model

    # They follow the policies in force: a class changed, one added, one gone.
    changed = {**POLICIES, "classes": {"tin": {"latency_ms": 5}}}
    live.control.set_policies(PoliciesSettings.model_validate(changed), "test")
    latency = target_values(await scrape(live), "switchyard_sla_target_latency_ms")
    assert latency[("digits", "tin")] == 5 and latency[("digits", "default")] == 100
    assert math.isnan(latency[("digits", "gold")])  # no target any more


# --------------------------------------------------------------------------- promtool


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        reason = (
            "promtool is not installed (Debian: apt-get install --no-install-recommends "
            "prometheus, which `make test` runs as root)"
        )
        print(f"skipped: {reason}")
        pytest.skip(reason)
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_checks_the_rules() -> None:
    done = run_promtool("check", "rules", str(RULES))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_rules() -> None:
    done = run_promtool("test", "rules", str(RULES_TEST))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each dashboard query, as Prometheus would get it, written as a recording rule
    that promtool checks: a query that does not parse fails here, naming its panel."""
    queries = dashboard_queries(load_dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = run_promtool("check", "rules", str(path))
    listed = "\n".join(f"dashboard:query_{i}: {where}" for i, (where, _) in enumerate(queries))
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{listed}"
    assert f"{len(queries)} rules found" in done.stdout
