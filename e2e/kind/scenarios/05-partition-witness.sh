#!/usr/bin/env bash
# Acceptance scenario 5 of the design brief: the rooms are partitioned while the witness (a
# container outside the cluster, on its own network that both rooms keep) is reachable from
# both. Room B's nodes leave the kind network (`docker network disconnect`): no API server, no
# room A. Exactly one room continues: the witness grants one room; the other room's agents lose
# the right to run and run their stop command. If room A wins, room B's nodes are fenced (out-
# of-service taint) only after every one of them stopped. Then room B is reconnected and
# rebooted (a fenced node returns only with a new boot ID) and the witness removed.
source "$(dirname "$0")/../lib.sh"
require_cluster
cd "$(dirname "$0")/../../.."

say "partition+witness: the witness at a third site"
witness_start
remember_room room-a; remember_room room-b
A=$(room_nodes_cached room-a); B=$(room_nodes_cached room-b)
clear_stops $A $B
trap 'heal_room room-b' EXIT

say "partition+witness: cut room B off the kind network"
cut_room room-b
t0=$(date +%s.%N)
either_room_stopped() { any_stopped $A || any_stopped $B; }
wait_until 90 "one room's agents stopped" either_room_stopped
sleep 20   # both rooms had time to decide; the winner must still run
if any_stopped $B; then loser=room-b; L=$B; W=$A; else loser=room-a; L=$A; W=$B; fi
wait_until 60 "every node of $loser stopped" all_stopped $L
any_stopped $W && die "both rooms stopped their HA workloads: the witness granted neither (or both lost)"
echo "   $loser stopped its HA workloads; the other room runs on"
for n in $L; do echo "   $n stopped $(since "$t0" "$(stopped_at "$n")") s after the cut"; done

if [[ "$loser" == room-b ]]; then
  # The survivor (with the API server) fences the loser only after it stopped.
  wait_until 120 "room B fenced (out-of-service taint)" all_tainted $B
  stopped_before_fence $B
  k get twosite default -o jsonpath='{range .status.nodes[*]}{.name} {.phase}{"\n"}{end}' | sed 's/^/   /'
else
  # Room B holds the grant but has no API server: the controller in room A must fence nobody.
  for n in $B; do no_taint "$n" node.kubernetes.io/out-of-service || die "$n fenced while its room holds the witness grant"; done
fi

say "partition+witness: heal, reboot room B, remove the witness"
trap - EXIT
reboot_room room-b
if [[ "$loser" == room-a ]]; then
  # Room A's nodes lost their right to run, which only a reboot gives back (a real node's
  # watchdog would have reset it; kind nodes feed a file).
  for n in $A; do docker restart -t 0 "$n" >/dev/null; done
  for n in $A; do wait_until 240 "$n Ready" node_ready "$n"; done
fi
witness_remove
echo "partition-witness: OK"
