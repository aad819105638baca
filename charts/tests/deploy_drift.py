#!/usr/bin/env python3
"""deploy/ (the plain-manifest install) against the Helm chart rendered with its default values.

Usage: deploy_drift.py RENDERED.yaml DEPLOY_DIR CHART_DIR

RENDERED.yaml is `helm template twosite charts/twosite -n twosite-system` (default values). Every
object of deploy/*.yaml must equal the chart's object of the same kind, namespace and name, after
dropping the labels only Helm adds; every chart object must be in deploy/. The only exceptions
are listed below with their reason. deploy/crd.yaml must be byte-identical to the chart's crds/.
Exit status 1 with a field-level diff on any difference.
"""
import sys
from pathlib import Path

import yaml

HELM_ONLY_LABELS = {
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}
# Objects only one side has, and why.
ONLY_IN_CHART = {
    ("Secret", "twosite-system", "twosite-peer-key"):
        "generated at install by the chart; with deploy/ the user creates it (see deploy/agent.yaml)",
}
ONLY_IN_DEPLOY = {
    ("Namespace", None, "twosite-system"): "Helm installs into an existing namespace (--create-namespace)",
}
# Annotations only the chart carries.
HELM_ONLY_ANNOTATIONS = {"helm.sh/resource-policy"}


def strip(obj):
    """The object without what only Helm adds (labels, also in pod templates)."""
    def clean_meta(meta):
        if not isinstance(meta, dict):
            return
        labels = meta.get("labels")
        if isinstance(labels, dict):
            for k in HELM_ONLY_LABELS:
                labels.pop(k, None)
            if not labels:
                meta.pop("labels")
        ann = meta.get("annotations")
        if isinstance(ann, dict):
            for k in HELM_ONLY_ANNOTATIONS:
                ann.pop(k, None)
            if not ann:
                meta.pop("annotations")

    clean_meta(obj.get("metadata"))
    template = obj.get("spec", {}).get("template") if isinstance(obj.get("spec"), dict) else None
    if isinstance(template, dict):
        clean_meta(template.get("metadata"))
    return obj


def key(obj):
    meta = obj.get("metadata", {})
    return (obj.get("kind"), meta.get("namespace"), meta.get("name"))


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def diff(a, b, path=""):
    """Field-level differences between two JSON-like values."""
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}"
            if k not in a:
                out.append(f"{p}: only in the chart: {b[k]!r}")
            elif k not in b:
                out.append(f"{p}: only in deploy/: {a[k]!r}")
            else:
                out += diff(a[k], b[k], p)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: deploy/ has {len(a)} items, the chart {len(b)}: {a!r} vs {b!r}")
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                out += diff(x, y, f"{path}[{i}]")
    elif a != b:
        out.append(f"{path}: deploy/ {a!r}, chart {b!r}")
    return out


def main():
    rendered, deploy_dir, chart_dir = map(Path, sys.argv[1:4])
    failures = []

    crd_deploy = (deploy_dir / "crd.yaml").read_bytes()
    chart_crds = sorted((chart_dir / "crds").glob("*.yaml"))
    if len(chart_crds) != 1 or chart_crds[0].read_bytes() != crd_deploy:
        failures.append(f"{chart_dir}/crds/ must hold exactly one file, identical to deploy/crd.yaml "
                        f"(found {[p.name for p in chart_crds]}); copy deploy/crd.yaml there")

    deploy = {}
    for f in sorted(deploy_dir.glob("*.yaml")):
        if f.name == "crd.yaml":
            continue  # compared byte for byte above
        for obj in load(f):
            k = key(obj)
            if k in deploy:
                failures.append(f"{f.name}: {k} defined twice in deploy/")
            deploy[k] = (f.name, strip(obj))
    chart = {}
    for obj in load(rendered):
        k = key(obj)
        if k in chart:
            failures.append(f"chart: {k} rendered twice")
        chart[k] = strip(obj)

    for k in sorted(set(deploy) | set(chart), key=str):
        if k not in chart:
            if k in ONLY_IN_DEPLOY:
                print(f"skip {k}: only in deploy/: {ONLY_IN_DEPLOY[k]}")
            else:
                failures.append(f"{k} (deploy/{deploy[k][0]}) is not in the chart")
            continue
        if k not in deploy:
            if k in ONLY_IN_CHART:
                print(f"skip {k}: only in the chart: {ONLY_IN_CHART[k]}")
            else:
                failures.append(f"{k} is in the chart but in no deploy/*.yaml")
            continue
        d = diff(deploy[k][1], chart[k])
        if d:
            failures.append(f"{k} (deploy/{deploy[k][0]}) differs from the chart:\n    " + "\n    ".join(d))
        else:
            print(f"same {k}")

    # The exceptions must still be needed: a stale exception hides nothing but misleads.
    for k in ONLY_IN_CHART:
        if k not in chart or k in deploy:
            failures.append(f"stale exception ONLY_IN_CHART {k}")
    for k in ONLY_IN_DEPLOY:
        if k not in deploy or k in chart:
            failures.append(f"stale exception ONLY_IN_DEPLOY {k}")

    if failures:
        print("deploy/ and the chart have drifted apart:", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        sys.exit(1)
    print(f"deploy/ matches the chart: {len(deploy)} objects compared, crd.yaml identical")


if __name__ == "__main__":
    main()
