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

# --- rooms ---------------------------------------------------------------------------------
room_nodes() { k get nodes -l "topology.kubernetes.io/zone=$1" -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}'; }
node_ready() { k get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True; }
# The docker network kind puts every node on (the room-to-room and node-to-API-server links).
KIND_NET=kind

# --- the shared block device (scenarios 1 and 2) -------------------------------------------
# up.sh passes one host loop device into every node container at this path (kind extraMounts).
BLOCK_DEV=/dev/twosite-block
require_block() {
  local n
  for n in $(room_nodes room-a) $(room_nodes room-b); do
    docker exec "$n" test -b "$BLOCK_DEV" \
      || die "node $n has no block device $BLOCK_DEV: create the cluster with up.sh (it attaches a loop device to every node)"
  done
}
# wipe_block: zeroes the device's first 64 MiB (signatures of a previous scenario), from a node.
wipe_block() {
  local n; n=$(room_nodes room-a | head -n1)
  docker exec "$n" dd if=/dev/zero of="$BLOCK_DEV" bs=1M count=64 conv=fsync status=none \
    || die "cannot wipe $BLOCK_DEV on $n"
}
# shared_pv NAME NAMESPACE CLAIM: a ReadWriteMany block PV on the shared device, reachable from
# every worker, pre-bound to that claim (a local PV: kind has no shared-storage provisioner).
shared_pv() {
  k delete pv "$1" --ignore-not-found --wait=true >/dev/null
  cat <<YAML | k apply -f - >/dev/null
apiVersion: v1
kind: PersistentVolume
metadata: {name: $1}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteMany]
  volumeMode: Block
  persistentVolumeReclaimPolicy: Retain
  storageClassName: twosite-shared-block
  claimRef: {namespace: $2, name: $3}
  local: {path: $BLOCK_DEV}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions: [{key: topology.kubernetes.io/zone, operator: In, values: [room-a, room-b]}]
YAML
}
# apply_example FILE [sed expressions...]: an examples/ manifest with the kind images (loaded by
# up.sh), the shared storage class and 1Gi requests.
apply_example() {
  local file=$1; shift
  sed -e 's#ghcr.io/twosite-dev/twosite:0.1.0#ghcr.io/twosite/twosite:kind#' \
      -e 's#storageClassName: my-rwx-block#storageClassName: twosite-shared-block#' \
      -e 's#storage: [0-9]*Gi#storage: 1Gi#' \
      "${@/#/-e}" "$file" | k apply -f - >/dev/null
}
# volume_holder NS LEASE: the holder's pod UID ("" while none).
volume_holder() { k -n "$1" get lease "$2" -o jsonpath='{.spec.holderIdentity}'; }
pod_uid() { k -n "$1" get pod "$2" -o jsonpath='{.metadata.uid}'; }
pod_ready() { k -n "$1" get pod "$2" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True; }

# --- the witness (scenarios 5 and 7) -------------------------------------------------------
# A container outside the cluster (a "third site"), on its own docker network that every node
# joins too: cutting a room off the kind network leaves it its witness link.
WITNESS=twosite-kind-witness
WITNESS_NET=twosite-witness
WITNESS_CLUSTER=kind
WITNESS_TOKEN=kind-witness-token-0123456789abcdef
# A fixed address, so that the URL the chart got survives a restart of the container.
WITNESS_SUBNET=${WITNESS_SUBNET:-172.31.250.0/24}
WITNESS_IP=${WITNESS_IP:-172.31.250.10}
# witness_start: the witness container (the twosite image: `twosite witness`, plain HTTP on
# the private network) and the chart switched to it. Idempotent.
witness_start() {
  docker network inspect "$WITNESS_NET" >/dev/null 2>&1 || docker network create --subnet "$WITNESS_SUBNET" "$WITNESS_NET" >/dev/null
  local n
  for n in $(room_nodes room-a) $(room_nodes room-b); do
    docker network connect "$WITNESS_NET" "$n" 2>/dev/null || true
  done
  if ! docker inspect "$WITNESS" >/dev/null 2>&1; then
    # The image is distroless (no shell): the tokens file comes from the host.
    local tokens="${TMPDIR:-/tmp}/twosite-kind-witness-tokens"
    printf '%s %s\n' "$WITNESS_CLUSTER" "$WITNESS_TOKEN" > "$tokens"
    chmod 0644 "$tokens"   # read by the image's user 65532 (the witness warns; a test token)
    docker run -d --name "$WITNESS" --network "$WITNESS_NET" --ip "$WITNESS_IP" \
      -v "$tokens:/etc/twosite-witness/tokens:ro" ghcr.io/twosite/twosite:kind \
      witness --listen 0.0.0.0:9443 --state-file /tmp/state.json \
      --tokens-file /etc/twosite-witness/tokens --insecure-http \
      >/dev/null || die "cannot start the witness container"
  fi
  docker start "$WITNESS" >/dev/null
  local url="http://$WITNESS_IP:9443"
  k -n "$NS" create secret generic twosite-witness --from-literal=token="$WITNESS_TOKEN" \
    --dry-run=client -o yaml | k apply -f - >/dev/null
  helm upgrade twosite charts/twosite --kube-context "$CONTEXT" -n "$NS" --reuse-values \
    --set "witness.url=$url,witness.clusterName=$WITNESS_CLUSTER" --wait --timeout 5m >/dev/null \
    || die "helm upgrade with the witness failed"
  wait_until 120 "WitnessReachable=True" witness_condition True
}
# witness_remove: the chart back to no witness, the container gone.
witness_remove() {
  helm upgrade twosite charts/twosite --kube-context "$CONTEXT" -n "$NS" --reuse-values \
    --set "witness.url=,witness.clusterName=" --wait --timeout 5m >/dev/null \
    || die "helm upgrade without the witness failed"
  docker rm -f "$WITNESS" >/dev/null 2>&1 || true
}
witness_condition() {
  k get twosite default -o jsonpath='{.status.conditions[?(@.type=="WitnessReachable")].status}' | grep -qx "$1"
}

# --- partitions (scenarios 5 and 6) --------------------------------------------------------
# cut_room ROOM: its nodes leave the kind network (no API server, no other room); reconnect
# with heal_room. kind nodes have fixed addresses in the kind network: reconnect with the same.
cut_room() {
  local n
  for n in $(room_nodes "$1"); do
    docker inspect -f "{{(index .NetworkSettings.Networks \"$KIND_NET\").IPAddress}}" "$n" > "/tmp/twosite-kind-ip-$n"
    docker network disconnect "$KIND_NET" "$n" || die "cannot disconnect $n"
  done
}
heal_room() {
  local n ip now
  for n in $(room_nodes_cached "$1"); do
    ip=$(cat "/tmp/twosite-kind-ip-$n" 2>/dev/null || true)
    # --ip needs a network with a configured subnet: up.sh creates `kind` with one.
    docker network connect ${ip:+--ip "$ip"} "$KIND_NET" "$n" 2>/dev/null \
      || docker network connect "$KIND_NET" "$n" 2>/dev/null || true
    now=$(docker inspect -f "{{with index .NetworkSettings.Networks \"$KIND_NET\"}}{{.IPAMConfig}}{{.IPAddress}}{{end}}" "$n")
    [[ -z "$ip" || "$now" == *"$ip"* ]] \
      || die "$n rejoined $KIND_NET without its address $ip ($now): its kubelet's node IP is gone (was the kind network made by up.sh?)"
  done
}
# While a room is cut off the API server may still list it: cache its nodes before cutting.
room_nodes_cached() { cat "/tmp/twosite-kind-room-$1"; }
remember_room() { room_nodes "$1" > "/tmp/twosite-kind-room-$1"; }

# ha_workload NAME ROOM: a Deployment labelled twosite.dev/ha=true (the agent's stop command
# stops such containers on a node that loses its right to run) pinned to ROOM.
ha_workload() {
  cat <<YAML | k apply -f - >/dev/null
apiVersion: apps/v1
kind: Deployment
metadata: {name: $1, namespace: twosite-e2e}
spec:
  replicas: 1
  selector: {matchLabels: {app: $1}}
  template:
    metadata: {labels: {app: $1, twosite.dev/ha: "true"}}
    spec:
      terminationGracePeriodSeconds: 5
      nodeSelector: {topology.kubernetes.io/zone: $2}
      containers:
        - {name: app, image: registry.k8s.io/pause:3.10, imagePullPolicy: IfNotPresent,
           resources: {requests: {cpu: 1m, memory: 4Mi}}}
YAML
}
# container_running NODE LABEL: a running container with that pod label on the node (crictl).
ha_running_on() {
  docker exec "$1" sh -c "crictl ps -q --label io.kubernetes.pod.namespace=twosite-e2e --label app=$2 --state running | grep -q ." 2>/dev/null
}

# --- the twosite CLI in the cluster (scenarios 1 and 8) ------------------------------------
# run_cli NAME ARGS...: runs `twosite ARGS...` in a pod (the loaded image, a ServiceAccount with
# what `twosite switchover`/`status` need) and prints its exit code; its output goes to stderr.
run_cli() {
  local name=$1; shift
  k create namespace twosite-e2e --dry-run=client -o yaml | k apply -f - >/dev/null
  cat <<YAML | k apply -f - >/dev/null
apiVersion: v1
kind: ServiceAccount
metadata: {name: twosite-e2e-cli, namespace: twosite-e2e}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: twosite-e2e-cli}
rules:
  - {apiGroups: [""], resources: [pods], verbs: [get, list]}
  - {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, list, watch, patch]}
  - {apiGroups: [twosite.dev], resources: [twosites], verbs: [get, list]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: twosite-e2e-cli}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: twosite-e2e-cli}
subjects: [{kind: ServiceAccount, name: twosite-e2e-cli, namespace: twosite-e2e}]
YAML
  k -n twosite-e2e delete pod "$name" --ignore-not-found --wait=true >/dev/null
  local args="" a
  for a in "$@"; do args+="\"$a\", "; done
  cat <<YAML | k apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: twosite-e2e}
spec:
  serviceAccountName: twosite-e2e-cli
  restartPolicy: Never
  containers:
    - name: cli
      image: ghcr.io/twosite/twosite:kind
      imagePullPolicy: Never
      command: [twosite, ${args%, }]
      resources: {requests: {cpu: 10m, memory: 16Mi}}
YAML
  local phase start=$SECONDS
  while :; do
    phase=$(k -n twosite-e2e get pod "$name" -o jsonpath='{.status.phase}')
    [[ "$phase" == Succeeded || "$phase" == Failed ]] && break
    (( SECONDS - start < 180 )) || die "twosite $*: the CLI pod did not finish within 180s"
    sleep 1
  done
  k -n twosite-e2e logs "$name" >&2 || true
  k -n twosite-e2e get pod "$name" -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode}'
}

# --- right to run (scenarios 5 to 7) -------------------------------------------------------
# The agents' stop command (charts/tests/values/kind.yaml) appends the time to
# /run/twosite/ha-stopped on its node when the node loses its right to run.
clear_stops() { local n; for n in "$@"; do docker exec "$n" rm -f /run/twosite/ha-stopped; done; }
# stopped_at NODE: the first stop time on NODE (epoch seconds), empty if none.
stopped_at() { docker exec "$1" sh -c 'head -n1 /run/twosite/ha-stopped 2>/dev/null' || true; }
any_stopped() { local n; for n in "$@"; do [[ -n "$(stopped_at "$n")" ]] && return 0; done; return 1; }
all_stopped() { local n; for n in "$@"; do [[ -n "$(stopped_at "$n")" ]] || return 1; done; }
all_tainted() { local n; for n in "$@"; do has_taint "$n" node.kubernetes.io/out-of-service || return 1; done; }
# reboot_room ROOM: the cut room back on the kind network and rebooted (docker stop + start: a
# new boot ID), as an operator would after a partition that fenced it; waits until untainted.
reboot_room() {
  local n nodes; nodes=$(room_nodes_cached "$1")
  for n in $nodes; do docker stop -t 0 "$n" >/dev/null; done
  heal_room "$1"
  for n in $nodes; do docker start "$n" >/dev/null; done
  for n in $nodes; do
    wait_until 240 "$n Ready" node_ready "$n"
    wait_until 180 "$n untainted" no_taint "$n" node.kubernetes.io/out-of-service
  done
}
# taint_added NODE: when the out-of-service taint was added (epoch seconds; the API server sets
# timeAdded on NoExecute taints, to the second).
taint_added() {
  date -d "$(k get node "$1" -o jsonpath='{.spec.taints[?(@.key=="node.kubernetes.io/out-of-service")].timeAdded}')" +%s
}
# stopped_before_fence NODE...: every node's first stop precedes its out-of-service taint
# (compared to the second: the taint's time has no finer grain).
stopped_before_fence() {
  local n s t
  for n in "$@"; do
    s=$(stopped_at "$n"); t=$(taint_added "$n")
    [[ -n "$s" ]] || die "$n was fenced without having stopped its HA workloads"
    awk -v s="$s" -v t="$t" 'BEGIN { exit !(int(s) <= t) }' \
      || die "$n was fenced (taint added at $t) before it stopped its HA workloads (at $s)"
    echo "   $n: stopped at $s, out-of-service taint added at $t"
  done
}
# since T0 T1: seconds between two epoch times, to the millisecond.
since() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
