#!/usr/bin/env bash
# Creates the two-room kind cluster, builds and loads the twosite images, installs the chart.
#   e2e/kind/up.sh            # cluster `twosite` (CLUSTER=... for another name)
# Needs docker (with an engine), kind, kubectl, helm. Fails at once, with the reason, without.
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/../.."

# The node image of the kind release the workflow installs (kind v0.29.0 -> Kubernetes 1.33.1).
NODE_IMAGE=${NODE_IMAGE:-kindest/node:v1.33.1}
TAG=kind

need docker kind kubectl helm
docker info >/dev/null 2>&1 || die "no Docker engine (docker info failed)"

say "node image with per-node boot IDs (from $NODE_IMAGE)"
docker build -q --build-arg NODE_IMAGE="$NODE_IMAGE" -t twosite-kind-node:local \
  -f e2e/kind/node.Dockerfile e2e/kind

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "cluster $CLUSTER exists: reusing it"
else
  say "kind create cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config e2e/kind/cluster.yaml \
    --image twosite-kind-node:local --wait 180s
fi

say "every node has its own boot ID"
ids=$(k get nodes -o jsonpath='{range .items[*]}{.status.nodeInfo.bootID}{"\n"}{end}')
echo "$ids" | sed 's/^/   /'
[[ $(echo "$ids" | sort -u | wc -l) == $(echo "$ids" | wc -l) ]] \
  || die "two nodes report the same boot ID: the node image's boot-id entrypoint did not run"

say "images"
REGISTRY=ghcr.io/twosite TAG=$TAG images/build.sh
kind load docker-image --name "$CLUSTER" ghcr.io/twosite/twosite:$TAG ghcr.io/twosite/twosite-agent:$TAG

say "helm install (charts/twosite, values charts/tests/values/kind.yaml)"
helm upgrade --install twosite charts/twosite --kube-context "$CONTEXT" -n "$NS" \
  --create-namespace -f charts/tests/values/kind.yaml --wait --timeout 5m

say "the controller pairs the workers"
wait_until 120 "2 pairs in TwoSite default" \
  sh -c "[ \"\$(kubectl --context $CONTEXT get twosite default -o jsonpath='{.status.pairCount}')\" = 2 ]"
k get twosite default
say "up: run e2e/kind/run.sh"
