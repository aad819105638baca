#!/usr/bin/env bash
# Creates the two-room kind cluster, builds and loads the twosite images, installs the chart.
#   e2e/kind/up.sh            # cluster `twosite` (CLUSTER=... for another name)
# Needs docker (with an engine), kind, kubectl, helm, and losetup with root (sudo) for the
# shared block device. Fails at once, with the reason, without.
#
# The shared block device (scenarios 1, 2 and 8): a ReadWriteMany block volume needs one device
# every node sees. up.sh makes a 1 GiB image file (BLOCK_IMG, default
# /var/tmp/twosite-kind-block.img), attaches it to a host loop device (`losetup --find --show`;
# BLOCK_LOOP=/dev/loopN to use one you made) and passes that device into every worker container
# as /dev/twosite-block (kind `extraMounts`, written into a copy of cluster.yaml). kind nodes
# are privileged containers, so they may open it; the scenarios put a local PersistentVolume
# (volumeMode: Block, ReadWriteMany, every worker in its nodeAffinity) on it. The loop device
# does not survive a reboot of the host: delete the cluster and run up.sh again.
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
  say "shared block device for the RWX scenarios"
  need losetup truncate
  SUDO=sudo; [[ $(id -u) == 0 ]] && SUDO=
  BLOCK_IMG=${BLOCK_IMG:-/var/tmp/twosite-kind-block.img}
  if [[ -z "${BLOCK_LOOP:-}" ]]; then
    BLOCK_LOOP=$($SUDO losetup -j "$BLOCK_IMG" 2>/dev/null | cut -d: -f1 | head -n1)
    if [[ -z "$BLOCK_LOOP" ]]; then
      truncate -s 1G "$BLOCK_IMG"
      BLOCK_LOOP=$($SUDO losetup --find --show "$BLOCK_IMG") || die "losetup $BLOCK_IMG failed"
    fi
  fi
  [[ -b "$BLOCK_LOOP" ]] || die "$BLOCK_LOOP is not a block device"
  echo "   $BLOCK_LOOP ($BLOCK_IMG) -> /dev/twosite-block in every worker"
  config=$(mktemp)
  awk -v dev="$BLOCK_LOOP" '{ print } /^  - role: worker$/ {
      print "    extraMounts:"
      print "      - {hostPath: " dev ", containerPath: /dev/twosite-block}" }' \
    e2e/kind/cluster.yaml > "$config"
  # kind uses an existing docker network named `kind`. Made here with a configured IPv4 subnet
  # (KIND_SUBNET), so that a node cut off by `docker network disconnect` (scenarios 5, 6) can
  # rejoin with its own address (`docker network connect --ip` needs a configured subnet).
  if ! docker network inspect kind >/dev/null 2>&1; then
    docker network create --subnet "${KIND_SUBNET:-172.30.0.0/16}" \
      -o com.docker.network.bridge.enable_ip_masquerade=true kind >/dev/null
  fi
  say "kind create cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config "$config" \
    --image twosite-kind-node:local --wait 180s
  rm -f "$config"
fi

say "every node has its own boot ID"
ids=$(k get nodes -o jsonpath='{range .items[*]}{.status.nodeInfo.bootID}{"\n"}{end}')
echo "$ids" | sed 's/^/   /'
[[ $(echo "$ids" | sort -u | wc -l) == $(echo "$ids" | wc -l) ]] \
  || die "two nodes report the same boot ID: the node image's boot-id entrypoint did not run"

say "every worker sees the shared block device"
require_block

say "images"
REGISTRY=ghcr.io/twosite TAG=$TAG images/build.sh
kind load docker-image --name "$CLUSTER" ghcr.io/twosite/twosite:$TAG ghcr.io/twosite/twosite-agent:$TAG

# KubeVirt before the chart, so VM protection finds its CRDs at once. Software emulation: kind
# nodes have no /dev/kvm (scenario 3 counts a VM as running when its VMI is Running, guest boot
# excluded).
KUBEVIRT_VERSION=${KUBEVIRT_VERSION:-v1.5.2}
say "KubeVirt $KUBEVIRT_VERSION (software emulation)"
KV_URL=https://github.com/kubevirt/kubevirt/releases/download/$KUBEVIRT_VERSION
k apply -f "$KV_URL/kubevirt-operator.yaml" >/dev/null
k apply -f "$KV_URL/kubevirt-cr.yaml" >/dev/null
k -n kubevirt patch kubevirt kubevirt --type merge \
  -p '{"spec":{"configuration":{"developerConfiguration":{"useEmulation":true}}}}' >/dev/null
k -n kubevirt wait kubevirt/kubevirt --for condition=Available --timeout=15m >/dev/null \
  || die "KubeVirt did not become Available"

say "helm install (charts/twosite, values charts/tests/values/kind.yaml)"
helm upgrade --install twosite charts/twosite --kube-context "$CONTEXT" -n "$NS" \
  --create-namespace -f charts/tests/values/kind.yaml --wait --timeout 5m

say "the controller pairs the workers"
wait_until 120 "2 pairs in TwoSite default" \
  sh -c "[ \"\$(kubectl --context $CONTEXT get twosite default -o jsonpath='{.status.pairCount}')\" = 2 ]"
k get twosite default
say "up: run e2e/kind/run.sh"
