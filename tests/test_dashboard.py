"""The Grafana dashboard (k8s/grafana/distzo-dashboard.json) only queries metrics the services export.

Every PromQL expression of the dashboard (panel targets, also inside collapsed rows, and the
template variables' queries) is tokenized; each metric name in it must be a sample name in
prometheus_client's registry once the services' metrics modules are imported. A Counter ``X_total``
is exposed as ``X_total``; a Histogram ``H`` as ``H_bucket``, ``H_sum`` and ``H_count``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "k8s" / "grafana" / "distzo-dashboard.json"
UID = "distzo-training"

PROMQL_FUNCTIONS = frozenset("""
abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max clamp_min
cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv
double_exponential_smoothing exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase info irate label_join
label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label
sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp
vector year start end
""".split())
PROMQL_AGGREGATIONS = frozenset("""
sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio
""".split())
PROMQL_KEYWORDS = frozenset("""
by without on ignoring group_left group_right bool offset and or unless atan2 inf nan
""".split())

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+(?::\w+)?\]\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_OFFSET = re.compile(r"\boffset\s+-?[\w.]+", re.IGNORECASE)
_AT = re.compile(r"@\s*-?[\d.]+")
_NUMBER = re.compile(r"(?<![\w:.])(?:0[xX][0-9a-fA-F]+|\.?\d[\w.]*(?:[eE][+-]?\d+)?)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<expr>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$", re.DOTALL)


class PromQLError(ValueError):
    pass


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (raises PromQLError for an unknown function)."""
    text = _GRAFANA_VAR.sub(" ", _STRING.sub(" ", expr))  # strings first: variables live in label values too
    text = _MATCHERS.sub(" ", text)
    while True:  # ranges and subqueries; nested subqueries from the inside out
        stripped = _RANGE.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    text = _CLAUSE.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _AT.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group(0)
        followed_by_call = text[m.end():].lstrip().startswith("(")
        if followed_by_call:
            if word not in PROMQL_FUNCTIONS and word not in PROMQL_AGGREGATIONS:
                raise PromQLError(f"unknown PromQL function {word!r} in {expr!r}")
            continue
        if word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def template_query_names(query: str) -> set[str]:
    """Metric names of a Grafana Prometheus variable query (label_values(expr, label) or plain PromQL)."""
    m = _LABEL_VALUES.match(query)
    if m:
        return metric_names(m.group("expr")) if m.group("expr") else set()
    return metric_names(query)


def exported_sample_names() -> set[str]:
    """Every sample name the services can expose: prometheus_client's default registry after importing
    the services' metrics modules. A labelled metric without children yet has no samples, so the
    names a family's type implies are added to the sample names it has."""
    import coordinator.metrics  # noqa: F401
    import distzo.infra.metrics  # noqa: F401
    import gpuworker.metrics  # noqa: F401
    import paramserver.metrics  # noqa: F401
    from prometheus_client import REGISTRY

    by_type = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
               "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "stateset": ("",),
               "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "unknown": ("",)}
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in by_type.get(family.type, ("",)))
    return names


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels") or [])  # collapsed rows hold their panels


def expressions(dash: dict) -> Iterator[tuple[str, str]]:
    for p in all_panels(dash.get("panels", [])):
        for t in p.get("targets") or []:
            if t.get("expr"):
                yield p.get("title", "?"), t["expr"]


# ----------------------------------------------------------------------------- the tokenizer itself
def test_tokenizer_finds_metric_names() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, method) (rate(distzo_grpc_server_handling_seconds_bucket'
            '{namespace=~"$namespace", method!="Fetch"}[$__rate_interval])))')
    assert metric_names(expr) == {"distzo_grpc_server_handling_seconds_bucket"}
    expr = ('sum(rate(distzo_train_received_bytes_total{job="x"}[5m] offset 1h)) by (pod) / on (pod) group_left '
            'max without (instance) (distzo_train_model_bytes) * 2.5e3 > bool 0x10 unless sum_over_time(up[1h:5m] @ 1609746000)')
    assert metric_names(expr) == {"distzo_train_received_bytes_total", "distzo_train_model_bytes", "up"}
    expr = 'label_replace(max(distzo_workers{state="busy"}), "dst", "$1", "state", "(.*)") and on() vector(1) or Inf'
    assert metric_names(expr) == {"distzo_workers"}
    assert metric_names('topk(5, count_values("v", distzo_train_step)) / ${datasource_scale}') == {"distzo_train_step"}
    assert template_query_names("label_values(distzo_paramserver_applied_version, namespace)") == {"distzo_paramserver_applied_version"}
    assert template_query_names("label_values(namespace)") == set()
    with pytest.raises(PromQLError):
        metric_names("rates(distzo_train_tokens_total[5m])")


def test_tokenizer_reports_an_unknown_metric() -> None:
    exported = exported_sample_names()
    expr = 'sum(rate(distzo_train_tokens_total[$__rate_interval])) / sum(rate(distzo_made_up_widgets_total{pod=~"a.*"}[5m]))'
    names = metric_names(expr)
    assert names == {"distzo_train_tokens_total", "distzo_made_up_widgets_total"}
    assert names - exported == {"distzo_made_up_widgets_total"}
    # a Histogram's base name is not a sample name, nor is a Counter's name without _total
    assert "distzo_train_step_duration_seconds" not in exported
    assert {"distzo_train_step_duration_seconds_bucket", "distzo_train_step_duration_seconds_sum",
            "distzo_train_step_duration_seconds_count", "distzo_train_tokens_total"} <= exported
    assert "distzo_train_tokens" not in exported


# ----------------------------------------------------------------------------- the dashboard
def test_dashboard_identity_and_datasource() -> None:
    dash = load()
    assert dash["uid"] == UID
    assert dash.get("title")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus"
    ids = []
    for p in all_panels(dash["panels"]):
        ids.append(p["id"])
        assert {"x", "y", "w", "h"} <= set(p.get("gridPos", {})), f"panel {p.get('title')}: no gridPos"
        if p["type"] == "row":
            continue
        assert p.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, f"panel {p['title']}: datasource"
        assert p.get("targets"), f"panel {p['title']}: no queries"
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"])["uid"] == "${datasource}"
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"


def test_every_metric_is_exported() -> None:
    dash = load()
    exported = exported_sample_names()
    unknown: list[str] = []
    used: set[str] = set()
    for title, expr in expressions(dash):
        names = metric_names(expr)
        assert names, f"panel {title}: no metric in {expr!r}"
        used |= names
        unknown += [f"panel {title!r}: {n}" for n in sorted(names - exported)]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            names = template_query_names(q)
            used |= names
            unknown += [f"variable {v['name']!r}: {n}" for n in sorted(names - exported)]
    assert not unknown, "metrics the services do not export:\n" + "\n".join(unknown)
    assert all(n.startswith("distzo_") for n in used)


def test_counters_and_histograms_are_rated() -> None:
    """A counter or histogram series is only meaningful through rate()/increase()."""
    exported = exported_sample_names()
    for title, expr in expressions(load()):
        for name in metric_names(expr) & exported:
            if not name.endswith(("_total", "_bucket", "_sum", "_count")):
                continue
            uses = len(re.findall(rf"\b{name}\b", expr))
            rated = len(re.findall(rf"\b(?:rate|irate|increase)\(\s*{name}\b", expr))
            assert uses == rated, f"panel {title!r}: {name} outside rate()/increase() in {expr!r}"


def test_dashboard_covers_the_services() -> None:
    used = set()
    for _title, expr in expressions(load()):
        used |= metric_names(expr)
    wanted = {
        "distzo_train_loss", "distzo_train_tokens_total", "distzo_train_step_duration_seconds_bucket",
        "distzo_train_step_phase_seconds_sum", "distzo_train_worker_seconds_total",
        "distzo_paramserver_served_bytes_total", "distzo_worker_received_bytes_total",
        "distzo_train_received_bytes_total", "distzo_train_model_bytes",
        "distzo_paramserver_version_lag", "distzo_paramserver_applied_version", "distzo_paramserver_journal_bytes",
        "distzo_paramserver_snapshot_duration_seconds_sum", "distzo_paramserver_snapshot_bytes",
        "distzo_workers", "distzo_reassignments_total", "distzo_skipped_steps_total", "distzo_late_reports_total",
        "distzo_eval_dev_accuracy", "distzo_eval_dev_loss", "distzo_perturbation_rms_error_ratio",
        "distzo_grpc_server_handled_total", "distzo_grpc_server_handling_seconds_bucket",
    }
    assert wanted <= used, f"not on the dashboard: {sorted(wanted - used)}"


def test_expressions_parse_with_promtool(tmp_path: Path) -> None:
    """Prometheus' own parser accepts every expression (Grafana's variables substituted)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH: run scripts/install-test-tools.sh (Debian's prometheus package has it)")
    subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$namespace": ".*"}
    rules = []
    for i, (_title, expr) in enumerate(expressions(load())):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:expr{i}", "expr": expr})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "distzo-dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
