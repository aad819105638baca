#!/usr/bin/env python3
"""Checks on a rendered twosite chart that a schema validator cannot make.

Usage: policy.py CRD_DIR RENDERED.yaml...

- no RBAC rule with `*` (verbs, resources, apiGroups, resourceNames, nonResourceURLs);
- the guard ClusterRole grants only get/list/watch/update/patch on coordination.k8s.io leases;
- every container of every workload has CPU and memory requests and a security context; the
  controller (and any other non-agent container) runs as non-root with a read-only root file
  system, no privilege escalation and no capabilities; only the agent is privileged;
- the agent DaemonSet tolerates node.kubernetes.io/out-of-service (NoExecute) and
  twosite.dev/unresponsive (NoSchedule) and mounts the host's /run/twosite;
- the controller has two replicas, spread over topology.kubernetes.io/zone, and a
  PodDisruptionBudget;
- the peer-key Secret is kept (helm.sh/resource-policy: keep) and holds a key of >= 32 bytes;
- no RBAC rule restricts create, list, watch or deletecollection by resourceNames (Kubernetes
  ignores resourceNames for them: the rule would silently grant nothing);
- every admission webhook (Mutating/ValidatingWebhookConfiguration) sets failurePolicy and a
  non-empty objectSelector (the API server calls it only for the pods twosite opted in, so
  failing closed stops nothing else), carries no caBundle (the controller patches its own CA
  in; a rendered one would fight it) and calls a Service of the same rendering; with a webhook
  rendered, the twosite-controller Deployment has a container port `webhook` that is the port
  of its --webhook-port flag;
- the webhook's certificate Secret (twosite-webhook-tls) is kept and shipped without data (the
  controller writes it; an upgrade must not overwrite it);
- every custom object (TwoSite) validates against the CRD's openAPIV3Schema in CRD_DIR.
Prints each failure and exits 1 if there is any.
"""
import base64
import sys
from pathlib import Path

import jsonschema
import yaml

WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "Job", "CronJob", "ReplicaSet", "Pod"}
failures = []


def fail(where, what):
    failures.append(f"{where}: {what}")


def pod_spec(obj):
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def tolerates(tolerations, key, effect):
    for t in tolerations or []:
        op = t.get("operator", "Equal")
        key_ok = (op == "Exists" and not t.get("key")) or t.get("key") == key
        effect_ok = not t.get("effect") or t.get("effect") == effect
        if key_ok and effect_ok:
            return True
    return False


def check_rbac(obj, where):
    for i, rule in enumerate(obj.get("rules") or []):
        for field in ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs"):
            if any("*" in v for v in rule.get(field) or []):
                fail(where, f"rule {i} has a wildcard in {field}: {rule}")
    if obj["kind"] == "ClusterRole" and obj["metadata"]["name"] == "twosite-guard":
        want = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                 "verbs": ["get", "list", "watch", "update", "patch"]}]
        if obj.get("rules") != want:
            fail(where, f"the guard may touch only Leases (get/list/watch/update/patch): {obj.get('rules')}")


def check_resource_names(obj, where):
    for i, rule in enumerate(obj.get("rules") or []):
        if rule.get("resourceNames"):
            bad = sorted(set(rule.get("verbs") or []) & {"create", "list", "watch", "deletecollection"})
            if bad:
                fail(where, f"rule {i} restricts {bad} by resourceNames, which Kubernetes ignores for them: {rule}")


def check_webhooks(obj, where, docs):
    services = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d
                for d in docs if d["kind"] == "Service"}
    for hook in obj.get("webhooks") or []:
        hw = f"{where} webhook {hook.get('name')}"
        if hook.get("failurePolicy") not in ("Fail", "Ignore"):
            fail(hw, f"failurePolicy not set (Fail or Ignore): {hook.get('failurePolicy')!r}")
        sel = hook.get("objectSelector") or {}
        if not (sel.get("matchLabels") or sel.get("matchExpressions")):
            fail(hw, "no objectSelector: the API server would send it every object of its rules")
        cc = hook.get("clientConfig") or {}
        if cc.get("caBundle"):
            fail(hw, "a rendered caBundle (the controller patches its own CA in)")
        svc = cc.get("service")
        if not svc:
            fail(hw, "clientConfig has no service (the webhook runs in the controller pods)")
            continue
        target = services.get((svc.get("namespace"), svc.get("name")))
        if target is None:
            fail(hw, f"calls Service {svc.get('namespace')}/{svc.get('name')}, which this rendering has not")
        elif svc.get("port", 443) not in [p.get("port") for p in target["spec"].get("ports") or []]:
            fail(hw, f"calls port {svc.get('port', 443)} of Service {svc.get('name')}, which has no such port")


def check_webhook_port(docs, where):
    """With a webhook rendered: the controller listens where the Service sends it."""
    for d in docs:
        if d["kind"] != "Deployment" or d["metadata"]["name"] != "twosite-controller":
            continue
        for c in pod_spec(d)["containers"]:
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
            flags = [a.split("=", 1)[1] for a in c.get("args") or [] if a.startswith("--webhook-port=")]
            if "webhook" not in ports or flags != [str(ports["webhook"])]:
                fail(f"{where}: Deployment/twosite-controller container {c['name']}",
                     f"a webhook is rendered, but container port `webhook` {ports.get('webhook')} "
                     f"and --webhook-port {flags} do not match")


def check_workload(obj, where):
    spec = pod_spec(obj)
    psc = spec.get("securityContext") or {}
    is_agent = obj["metadata"]["name"] == "twosite-agent"
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        cw = f"{where} container {c['name']}"
        req = (c.get("resources") or {}).get("requests") or {}
        for r in ("cpu", "memory"):
            if r not in req:
                fail(cw, f"no {r} request")
        sc = c.get("securityContext")
        if not sc:
            fail(cw, "no securityContext")
            continue
        if is_agent:
            continue  # privileged by design: the watchdog device and the workload stop
        if sc.get("privileged"):
            fail(cw, "privileged")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            fail(cw, "may run as root (runAsNonRoot not set)")
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(cw, "root file system not read-only")
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(cw, "allowPrivilegeEscalation not false")
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
            fail(cw, "capabilities not dropped (drop: [ALL])")
    if is_agent:
        for key, effect in (("node.kubernetes.io/out-of-service", "NoExecute"),
                            ("twosite.dev/unresponsive", "NoSchedule")):
            if not tolerates(spec.get("tolerations"), key, effect):
                fail(where, f"does not tolerate {key}:{effect}")
        paths = [v.get("hostPath", {}).get("path") for v in spec.get("volumes") or []]
        if "/run/twosite" not in paths:
            fail(where, "no hostPath /run/twosite (state file, guard socket)")
    if obj["kind"] == "Deployment" and obj["metadata"]["name"] == "twosite-controller":
        if obj["spec"].get("replicas") != 2:
            fail(where, f"replicas {obj['spec'].get('replicas')}, want 2 (one per room)")
        keys = [t.get("topologyKey") for t in spec.get("topologySpreadConstraints") or []]
        if "topology.kubernetes.io/zone" not in keys:
            fail(where, "not spread over topology.kubernetes.io/zone")


def main():
    crd_dir = Path(sys.argv[1])
    schemas = {}
    for f in crd_dir.glob("*.yaml"):
        for crd in yaml.safe_load_all(f.read_text()):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                schemas[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    for path in sys.argv[2:]:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        kinds = {d["kind"] for d in docs}
        for obj in docs:
            where = f"{Path(path).name}: {obj['kind']}/{obj['metadata']['name']}"
            if obj["kind"] in ("Role", "ClusterRole"):
                check_rbac(obj, where)
                check_resource_names(obj, where)
            if obj["kind"] in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
                check_webhooks(obj, where, docs)
            if obj["kind"] == "Secret" and obj["metadata"]["name"] == "twosite-webhook-tls":
                if (obj["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") != "keep":
                    fail(where, "not kept across uninstall (helm.sh/resource-policy: keep)")
                if obj.get("data") or obj.get("stringData"):
                    fail(where, "shipped with data: an upgrade would overwrite the controller's certificate")
            if obj["kind"] in WORKLOADS:
                check_workload(obj, where)
            if obj["kind"] == "Secret" and obj["metadata"]["name"].endswith("peer-key"):
                if (obj["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") != "keep":
                    fail(where, "not kept across uninstall (helm.sh/resource-policy: keep)")
                key = base64.b64decode(obj.get("data", {}).get("current", "")).strip()
                if len(key) < 32:
                    fail(where, f"key `current` has {len(key)} bytes, want >= 32")
            schema = schemas.get((obj["apiVersion"], obj["kind"]))
            if schema is not None:
                # The API server's structural-schema rules are close to JSON Schema draft 4's for
                # what the CRD uses (types, required, enums, nullable aside).
                try:
                    jsonschema.validate({k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")},
                                        schema)
                except jsonschema.ValidationError as e:
                    fail(where, f"does not validate against its CRD: {e.message}")
            elif "." in obj["apiVersion"].split("/")[0] and not obj["apiVersion"].startswith(
                    ("apps/", "policy/", "rbac.authorization.k8s.io/", "apiextensions.k8s.io/",
                     "admissionregistration.k8s.io/",
                     # The PrometheusRule: checked by monitoring.py.
                     "monitoring.coreos.com/")):
                fail(where, f"custom kind {obj['apiVersion']} {obj['kind']} with no CRD in {crd_dir}")
        if "MutatingWebhookConfiguration" in kinds:
            check_webhook_port(docs, Path(path).name)
        if "twosite-controller" in {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} \
                and "PodDisruptionBudget" not in kinds:
            fail(path, "no PodDisruptionBudget for the controller")
    for f in failures:
        print("POLICY", f, file=sys.stderr)
    if failures:
        sys.exit(1)
    print(f"policy: {len(sys.argv) - 2} renderings, no finding")


if __name__ == "__main__":
    main()
