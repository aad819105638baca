#!/usr/bin/env python3
"""Checks of the chart's monitoring pieces that no schema validator makes.

Usage: monitoring.py METRICS_RS DASHBOARD_JSON RENDERED.yaml...

- the dashboard file is valid JSON, a Grafana dashboard (title, uid, panels with targets), and
  every ConfigMap labelled grafana_dashboard=1 in the renderings carries exactly that JSON;
- every PrometheusRule has the shape of monitoring.coreos.com/v1 (groups of named rules, each
  an alert or a record with an expr; only the fields the Prometheus Operator knows);
- every metric name (`twosite_...`) used in an alert or a dashboard query is one the controller
  exports: the names registered in METRICS_RS (prefix `twosite_`), with `_total` for counters
  and `_bucket`/`_sum`/`_count` for histograms.
Prints each failure and exits 1 if there is any. With --expect-failures N, exits 0 only when
exactly N failures were found (the self-test on a planted fault).
"""
import json
import re
import sys
from pathlib import Path

import yaml

failures = []


def fail(where, what):
    failures.append(f"MONITORING {where}: {what}")


def exported_names(metrics_rs):
    """The series names the controller's /metrics can show."""
    src = Path(metrics_rs).read_text()
    kinds = {}
    for var, ctor in re.findall(r"let (\w+) = ([A-Za-z:<>, ]+?)(?:::default\(\)|::new\()", src):
        kinds[var] = "histogram" if "Histogram" in ctor else "counter" if "Counter" in ctor else "gauge"
    names = set()
    for name, var in re.findall(r'registry\.register\(\s*"(\w+)",.*?(\w+)\.clone\(\)', src, re.S):
        kind = kinds.get(var)
        if kind is None:
            fail(metrics_rs, f"cannot tell the type of metric {name} (variable {var})")
            continue
        base = f"twosite_{name}"
        if kind == "counter":
            names.add(f"{base}_total")
        elif kind == "histogram":
            names.update(f"{base}_{s}" for s in ("bucket", "sum", "count"))
        else:
            names.add(base)
    if not names:
        fail(metrics_rs, "no metric registered: the parser no longer understands the file")
    return names


def used_names(expr):
    return set(re.findall(r"\btwosite_[a-z0-9_]+\b", expr))


def check_names(where, expr, exported):
    for n in sorted(used_names(expr) - exported):
        fail(where, f"metric {n} is not exported by the controller (in: {expr})")


RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
GROUP_KEYS = {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset", "labels"}


def check_rule_object(obj, where, exported):
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(where, f"apiVersion {obj.get('apiVersion')}, want monitoring.coreos.com/v1")
    spec = obj.get("spec")
    if not isinstance(spec, dict) or set(spec) - {"groups"}:
        fail(where, "spec must hold only `groups`")
        return
    groups = spec.get("groups") or []
    if not groups:
        fail(where, "no rule groups")
    for g in groups:
        if not isinstance(g, dict) or not isinstance(g.get("name"), str):
            fail(where, f"a group without a name: {g}")
            continue
        for k in set(g) - GROUP_KEYS:
            fail(where, f"group {g['name']}: unknown field {k}")
        for r in g.get("rules") or []:
            name = r.get("alert") or r.get("record")
            if not isinstance(name, str) or ("alert" in r) == ("record" in r):
                fail(where, f"a rule must have exactly one of alert/record: {r}")
                continue
            for k in set(r) - RULE_KEYS:
                fail(where, f"rule {name}: unknown field {k}")
            if not isinstance(r.get("expr"), str) or not r["expr"].strip():
                fail(where, f"rule {name}: no expr")
                continue
            if "for" in r and not re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", str(r["for"])):
                fail(where, f"rule {name}: `for` {r['for']!r} is not a Prometheus duration")
            for k in ("labels", "annotations"):
                if k in r and not all(isinstance(v, str) for v in (r[k] or {}).values()):
                    fail(where, f"rule {name}: {k} values must be strings")
            check_names(f"{where} rule {name}", r["expr"], exported)


def check_dashboard(dash, where, exported):
    for k in ("title", "uid", "panels"):
        if k not in dash:
            fail(where, f"no `{k}`: not a Grafana dashboard")
    queries = 0
    for p in dash.get("panels") or []:
        for t in p.get("targets") or []:
            expr = t.get("expr")
            if isinstance(expr, str):
                queries += 1
                check_names(f"{where} panel {p.get('title')!r}", expr, exported)
    if queries == 0:
        fail(where, "no panel queries anything")


def main(args):
    expect = None
    if args[:1] == ["--expect-failures"]:
        expect, args = int(args[1]), args[2:]
    metrics_rs, dashboard_path, renders = args[0], args[1], args[2:]
    exported = exported_names(metrics_rs)
    text = Path(dashboard_path).read_text()
    try:
        dashboard = json.loads(text)
    except json.JSONDecodeError as e:
        fail(dashboard_path, f"not valid JSON: {e}")
        dashboard = None
    if dashboard is not None:
        check_dashboard(dashboard, dashboard_path, exported)
    rules = configmaps = 0
    for path in renders:
        for obj in (d for d in yaml.safe_load_all(Path(path).read_text()) if d):
            where = f"{Path(path).name}: {obj['kind']}/{obj['metadata']['name']}"
            if obj["kind"] == "PrometheusRule":
                rules += 1
                check_rule_object(obj, where, exported)
            labels = obj["metadata"].get("labels") or {}
            if obj["kind"] == "ConfigMap" and labels.get("grafana_dashboard") == "1":
                configmaps += 1
                for key, value in (obj.get("data") or {}).items():
                    try:
                        shipped = json.loads(value)
                    except json.JSONDecodeError as e:
                        fail(where, f"{key} is not valid JSON: {e}")
                        continue
                    if shipped != dashboard:
                        fail(where, f"{key} is not {dashboard_path}")
                    check_dashboard(shipped, f"{where} {key}", exported)
    for f in failures:
        print(f, file=sys.stderr)
    if expect is not None:
        ok = len(failures) == expect
        print(f"monitoring.py: {len(failures)} failures, expected {expect}")
        return 0 if ok else 1
    print(f"monitoring.py: {len(exported)} exported series names; {rules} PrometheusRule(s), "
          f"{configmaps} dashboard ConfigMap(s) checked")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
