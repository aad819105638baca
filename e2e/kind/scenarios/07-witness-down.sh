#!/usr/bin/env bash
# Acceptance scenario 7 of the design brief: the witness is down while the rooms are healthy.
# Nothing stops and nothing is fenced; the TwoSite condition WitnessReachable turns False and
# twosite_witness_reachable reads 0 (what the chart's TwoSiteWitnessUnreachable alert fires on);
# both come back when the witness does.
source "$(dirname "$0")/../lib.sh"
require_cluster
cd "$(dirname "$0")/../../.."

say "witness-down: the witness up first"
witness_start
remember_room room-a; remember_room room-b
nodes="$(room_nodes_cached room-a) $(room_nodes_cached room-b)"
clear_stops $nodes

say "witness-down: stop the witness container"
docker stop -t 0 "$WITNESS" >/dev/null
wait_until 90 "WitnessReachable=False" witness_condition False
wait_until 30 "twosite_witness_reachable 0" sh -c "kubectl --context $CONTEXT get --raw /api/v1/namespaces/$NS/services/twosite-controller-metrics:metrics/proxy/metrics | grep -qx 'twosite_witness_reachable 0'"
sleep 30
any_stopped $nodes && die "a node stopped its HA workloads while only the witness was down"
for n in $nodes; do
  node_ready "$n" || die "$n is not Ready"
  no_taint "$n" node.kubernetes.io/out-of-service || die "$n was fenced"
done
echo "   30 s without the witness: nothing stopped, nothing fenced"

say "witness-down: the witness back"
docker start "$WITNESS" >/dev/null
wait_until 90 "WitnessReachable=True" witness_condition True
witness_remove
echo "witness-down: OK"
