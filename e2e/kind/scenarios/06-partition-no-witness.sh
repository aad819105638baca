#!/usr/bin/env bash
# Acceptance scenario 6 of the design brief: the rooms are partitioned and no witness is
# configured. twosite has no preferred-room setting yet (the chart refuses `preferredRoom`), so
# what kind can check is the rule as shipped: the room cut off from the API server and from the
# other room (room B here: its nodes leave the kind network, the control plane stays with room A)
# gets no vouching partner and stops its HA workloads; room A, which still renews its heartbeat
# Leases, runs on, and its controller fences room B once every node's self-fence deadline passed.
source "$(dirname "$0")/../lib.sh"
require_cluster
cd "$(dirname "$0")/../../.."

say "partition: no witness"
witness_remove
remember_room room-a; remember_room room-b
A=$(room_nodes_cached room-a); B=$(room_nodes_cached room-b)
clear_stops $A $B
trap 'heal_room room-b' EXIT

say "partition: cut room B off the kind network"
cut_room room-b
t0=$(date +%s.%N)
wait_until 60 "every node of room B stopped its HA workloads" all_stopped $B
wait_until 120 "room B fenced (out-of-service taint)" all_tainted $B
for n in $B; do echo "   $n stopped $(since "$t0" "$(stopped_at "$n")") s after the cut"; done
stopped_before_fence $B
any_stopped $A && die "room A (with the API server) stopped its HA workloads"
echo "   room A runs on"

say "partition: heal and reboot room B"
trap - EXIT
reboot_room room-b
echo "partition-no-witness: OK"
