#!/usr/bin/env bash
# Acceptance scenario 4 of the design brief: one worker dies (its node container stops: power
# off). twosite judges it dead, waits for its self-fence deadline, taints it out-of-service and
# releases its pods: the workload runs on another node within the 30 s target. The node comes
# back (container start = reboot: a new boot ID, see node.Dockerfile): the taint comes off.
source "$(dirname "$0")/../lib.sh"
require_cluster
OOS=node.kubernetes.io/out-of-service
APP=twosite-e2e-app

say "node-loss: a workload on a room-a worker"
k create namespace twosite-e2e --dry-run=client -o yaml | k apply -f - >/dev/null
cat <<YAML | k apply -f - >/dev/null
apiVersion: apps/v1
kind: Deployment
metadata: {name: $APP, namespace: twosite-e2e}
spec:
  replicas: 1
  selector: {matchLabels: {app: $APP}}
  template:
    metadata: {labels: {app: $APP}}
    spec:
      terminationGracePeriodSeconds: 5
      affinity:
        nodeAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              preference: {matchExpressions: [{key: topology.kubernetes.io/zone, operator: In, values: [room-a]}]}
      containers:
        - {name: app, image: registry.k8s.io/pause:3.10, imagePullPolicy: IfNotPresent,
           resources: {requests: {cpu: 1m, memory: 4Mi}}}
YAML
k -n twosite-e2e rollout status deployment/$APP --timeout=120s >/dev/null
victim=$(k -n twosite-e2e get pods -l app=$APP -o jsonpath='{.items[0].spec.nodeName}')
[[ -n "$victim" ]] || die "the workload has no node"
boot_before=$(boot_id "$victim")
echo "   the workload runs on $victim (boot ID $boot_before)"

say "node-loss: power off $victim"
docker stop -t 0 "$victim" >/dev/null
t0=$SECONDS
running_elsewhere() {
  k -n twosite-e2e get pods -l app=$APP -o jsonpath='{range .items[*]}{.spec.nodeName} {.status.phase} {.metadata.deletionTimestamp}{"\n"}{end}' \
    | awk -v v="$victim" '$1 != v && $2 == "Running" && $3 == "" {ok=1} END {exit !ok}'
}
wait_until 90 "out-of-service taint on $victim" has_taint "$victim" "$OOS"
wait_until 90 "the workload Running on another node" running_elsewhere
failover=$((SECONDS - t0))
echo "   power off -> running elsewhere: ${failover}s (target 30 s)"
k get twosite default -o jsonpath="{range .status.nodes[?(@.name==\"$victim\")]}{.phase} {.verdict}{end}{\"\n\"}"

say "node-loss: $victim returns (a reboot: new boot ID)"
docker start "$victim" >/dev/null
t1=$SECONDS
wait_until 180 "$victim Ready" sh -c "kubectl --context $CONTEXT get node $victim -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
boot_after=$(boot_id "$victim")
[[ "$boot_after" != "$boot_before" ]] || die "$victim came back with the same boot ID $boot_before"
wait_until 120 "out-of-service taint removed from $victim" no_taint "$victim" "$OOS"
wait_until 60 "twosite.dev/unresponsive removed from $victim" no_taint "$victim" twosite.dev/unresponsive
echo "   start -> untainted: $((SECONDS - t1))s (boot ID $boot_after)"
k -n twosite-e2e delete deployment $APP --wait=false >/dev/null
(( failover <= 30 )) || die "failover took ${failover}s, over the 30 s target"
echo "node-loss: OK"
