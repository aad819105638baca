# Shared by up.sh and the scenarios: fail fast, with the reason, when something is missing.
set -euo pipefail
CLUSTER=${CLUSTER:-twosite}
CONTEXT=kind-$CLUSTER
NS=twosite-system

die() { echo "kind suite: FAILED: $*" >&2; exit 1; }
say() { echo "== $*"; }
need() {
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || die "$t not found on PATH (see e2e/kind/README.md)"
  done
}
k() { kubectl --context "$CONTEXT" "$@"; }

# The suite needs the cluster up.sh made: say so at once, never pass without it.
require_cluster() {
  need docker kubectl
  docker info >/dev/null 2>&1 || die "no Docker engine (docker info failed): the kind suite needs one"
  kind get clusters 2>/dev/null | grep -qx "$CLUSTER" \
    || die "no kind cluster '$CLUSTER': run e2e/kind/up.sh first"
  k get twosite default >/dev/null 2>&1 \
    || die "cluster '$CLUSTER' has no TwoSite default: twosite is not installed (run e2e/kind/up.sh)"
}

# wait_until SECONDS DESCRIPTION COMMAND...: polls every second; prints the time it took.
wait_until() {
  local limit=$1 what=$2; shift 2
  local start=$SECONDS
  until "$@" >/dev/null 2>&1; do
    (( SECONDS - start < limit )) || die "$what: not within ${limit}s"
    sleep 1
  done
  echo "   $what after $((SECONDS - start))s"
}

node_taints() { k get node "$1" -o jsonpath='{range .spec.taints[*]}{.key}{"\n"}{end}'; }
has_taint() { node_taints "$1" | grep -qx "$2"; }
no_taint() { ! has_taint "$1" "$2"; }
boot_id() { k get node "$1" -o jsonpath='{.status.nodeInfo.bootID}'; }
