#!/usr/bin/env bash
# The install works: both controller replicas run, one per room; an agent on each worker; the
# four workers paired across the rooms; every agent renews its heartbeat Lease.
source "$(dirname "$0")/../lib.sh"
require_cluster

say "smoke: controllers one per room"
zones=$(for n in $(k -n "$NS" get pods -l app.kubernetes.io/name=twosite-controller -o jsonpath='{.items[*].spec.nodeName}'); do
  k get node "$n" -o jsonpath='{.metadata.labels.topology\.kubernetes\.io/zone}{"\n"}'; done | sort)
[[ "$zones" == $'room-a\nroom-b' ]] || die "controller replicas are in zones: $zones"
say "smoke: an agent on each of the 4 workers"
wait_until 60 "4 agents ready" sh -c "[ \"\$(kubectl --context $CONTEXT -n $NS get ds twosite-agent -o jsonpath='{.status.numberReady}')\" = 4 ]"
say "smoke: pairs and conditions"
wait_until 60 "Paired=True" sh -c "kubectl --context $CONTEXT get twosite default -o jsonpath='{.status.conditions[?(@.type==\"Paired\")].status}' | grep -qx True"
for n in $(k get nodes -l topology.kubernetes.io/zone -o name | cut -d/ -f2); do
  k -n "$NS" get lease "twosite-agent-$n" >/dev/null || die "no heartbeat Lease for $n"
done
echo "smoke: OK"
