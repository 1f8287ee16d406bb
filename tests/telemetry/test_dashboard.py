"""deploy/grafana/hermes-dashboard.json queries only what the bot exports: every metric in
every panel's PromQL is looked up in a real scrape of `Probes`' `/metrics`, so a renamed or
removed metric (or a typo in the dashboard) fails here rather than as an empty panel."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import bot.telemetry.metrics  # noqa: F401 - registers the hermes_ metrics in the process registry
from bot.telemetry.probes import Probes

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "hermes-dashboard.json"
# The bot's own metrics, and prometheus-client's process metrics (CPU, memory, files).
METRIC = re.compile(r"\b(?:hermes|process)_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels a query may group, match or name series by: the bot's low-cardinality labels and
# the ones Prometheus adds. Never a channel, user or guild id.
ALLOWED_LABELS = {"outcome", "kind", "status", "reason", "le", "instance", "job"}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels (a collapsed row keeps its own) included."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(dashboard["panels"])
            for target in panel.get("targets", []) if target.get("expr")]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        queries.append(query.get("query", "") if isinstance(query, dict) else query or "")
        queries.append(variable.get("definition", ""))
    return [query for query in queries if query]


def all_exprs(dashboard: dict[str, Any]) -> list[str]:
    return panel_exprs(dashboard) + variable_queries(dashboard)


def family_of(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def datasources(node: Any, path: str = "$") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield f"{path}.{key}", value
            yield from datasources(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from datasources(value, f"{path}[{index}]")


@pytest.fixture
async def scrape() -> AsyncIterator[dict[str, str]]:
    """The families of a real `/metrics` scrape: family name -> type (the parser names a
    counter's family without `_total`)."""
    probes = Probes("127.0.0.1", 0, {})
    await probes.start()
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{probes.port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    finally:
        await probes.close()
    yield {family.name: family.type for family in text_string_to_metric_families(text)}


def test_the_dashboard_is_grafana_json() -> None:
    dashboard = load()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["title"]
    assert dashboard.get("id") is None  # importable into any Grafana: no installation's row id
    ids = [panel["id"] for panel in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(dashboard["panels"]):
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']!r} queries nothing"
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]


async def test_every_queried_metric_is_exported(scrape: dict[str, str]) -> None:
    exprs = all_exprs(load())
    queried = {name for expr in exprs for name in METRIC.findall(expr)}
    hermes = {family_of(name).removesuffix("_total") for name in queried if name.startswith("hermes_")}
    assert len(hermes) >= 10, f"the dashboard queries only {sorted(hermes)}"

    missing, wrong_type = [], []
    for name in sorted(queried):
        if name.endswith(HISTOGRAM_SUFFIXES) and family_of(name) in scrape:
            if scrape[family_of(name)] != "histogram":
                wrong_type.append(f"{name}: {family_of(name)} is a {scrape[family_of(name)]}")
        elif name.endswith("_total") and name.removesuffix("_total") in scrape:
            if scrape[name.removesuffix("_total")] != "counter":
                wrong_type.append(f"{name}: not a counter")
        elif name in scrape:
            if scrape[name] not in ("gauge", "untyped"):  # a bare name is a gauge's sample
                wrong_type.append(f"{name}: a {scrape[name]} is queried as {name}_…")
        else:
            missing.append(name)
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"
    assert not wrong_type, wrong_type


def test_histograms_are_read_through_their_buckets() -> None:
    for expr in all_exprs(load()):
        for quantile in re.finditer(r"histogram_quantile\(", expr):
            rest = expr[quantile.end():]
            assert re.search(r"\brate\(\s*hermes_\w+_bucket\{", rest), expr
            assert re.search(r"by \([^)]*\ble\b", rest), f"the quantile must keep `le`: {expr}"


def test_queries_are_balanced_and_use_only_low_cardinality_labels() -> None:
    dashboard = load()
    exprs = all_exprs(dashboard)
    for expr in exprs:
        stack, pairs = [], {")": "(", "]": "[", "}": "{"}
        for char in re.sub(r'"[^"]*"', '""', expr):
            if char in "([{":
                stack.append(char)
            elif char in pairs:
                assert stack and stack.pop() == pairs[char], f"unbalanced: {expr}"
        assert not stack, f"unbalanced: {expr}"

        labels = set()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            labels |= {label.strip() for label in group.split(",") if label.strip()}
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        labels |= set(re.findall(r"label_values\([^)]*,\s*(\w+)\s*\)", expr))
        assert labels <= ALLOWED_LABELS, f"{expr} uses labels {sorted(labels - ALLOWED_LABELS)}"

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend <= ALLOWED_LABELS, f"{panel['title']!r} names series by {sorted(legend)}"


def test_no_datasource_is_hard_coded() -> None:
    dashboard = load()
    variables = {variable["name"]: variable for variable in dashboard.get("templating", {}).get("list", [])}
    inputs = {item["name"] for item in dashboard.get("__inputs", []) if item.get("type") == "datasource"}
    defined = set(variables) | inputs
    prometheus_sources = {name for name, variable in variables.items()
                          if variable.get("type") == "datasource" and variable.get("query") == "prometheus"}
    prometheus_sources |= {item["name"] for item in dashboard.get("__inputs", []) if item.get("pluginId") == "prometheus"}
    assert prometheus_sources, "neither a `datasource` variable of Prometheus nor a ${DS_…} input"

    found = list(datasources(dashboard))
    assert found, "no panel names its data source"
    for path, source in found:
        if isinstance(source, dict) and source.get("uid") == "-- Grafana --":
            continue  # Grafana's built-in annotations, the same in every installation
        uid = source.get("uid") if isinstance(source, dict) else source
        assert isinstance(uid, str), f"{path}: {source!r}"
        reference = VARIABLE.fullmatch(uid)
        assert reference, f"{path}: data source {uid!r} is one installation's uid, not a variable"
        assert (reference.group(1) or reference.group(2)) in prometheus_sources, f"{path}: {uid!r}"

    # Each $variable a query uses is defined (or one of Grafana's own, `$__rate_interval`).
    for expr in all_exprs(dashboard):
        for match in VARIABLE.finditer(expr):
            name = match.group(1) or match.group(2)
            assert name.startswith("__") or name in defined, f"{expr}: ${name} is not defined"
