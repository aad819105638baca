#!/usr/bin/env bash
# Acceptance scenario 1 of the design brief: two pods on one ReadWriteMany block volume (the
# shared loop device up.sh attaches to every node), pinned to partner nodes in the two rooms,
# each running its app through `twosite guard` (examples/block-active-standby.yaml). The active
# formats the empty device and mounts it, the standby stays attached, unmounted, not Ready; a
# planned `twosite switchover` moves it; a file written before is intact after; failback works.
source "$(dirname "$0")/../lib.sh"
require_cluster
require_block
NSB=block-demo

say "block: clean device, the example on partner nodes"
k delete namespace "$NSB" --ignore-not-found --wait=true >/dev/null
wipe_block
a=$(room_nodes room-a | head -n1)
b=$(k get twosite default -o jsonpath="{.status.nodes[?(@.name==\"$a\")].partner}")
[[ -n "$b" ]] || die "$a has no partner in the TwoSite status"
echo "   block-a on $a, block-b on its partner $b"
shared_pv twosite-e2e-block "$NSB" block-data
apply_example examples/block-active-standby.yaml "s#worker-a-1#$a#" "s#worker-b-1#$b#"
wait_until 180 "one consumer holds the Lease" sh -c "[ -n \"\$(kubectl --context $CONTEXT -n $NSB get lease block-data -o jsonpath='{.spec.holderIdentity}')\" ]"
holder_uid=$(volume_holder "$NSB" block-data)
if [[ "$holder_uid" == "$(pod_uid "$NSB" block-a)" ]]; then active=block-a standby=block-b; else active=block-b standby=block-a; fi
[[ "$holder_uid" == "$(pod_uid "$NSB" "$active")" ]] || die "the holder $holder_uid is neither consumer"
wait_until 60 "$active Ready" pod_ready "$NSB" "$active"
sleep 5
pod_ready "$NSB" "$standby" && die "the standby $standby is Ready: it must not run the app"
k -n "$NSB" exec "$standby" -c app -- sh -c 'grep -q " /data " /proc/mounts' \
  && die "the standby $standby has the device mounted"
echo "   active $active (mounted, Ready), standby $standby (unmounted, not Ready)"
marker="written-before-switchover-$RANDOM"
k -n "$NSB" exec "$active" -c app -- sh -c "echo $marker > /data/marker && sync /data/marker"

switch_to() { # pod: `twosite switchover` without --to (two consumers: the other one)
  local want; want=$(pod_uid "$NSB" "$1")
  local code; code=$(run_cli twosite-e2e-switchover switchover "$NSB/block-data")
  [[ "$code" == 0 ]] || die "twosite switchover exited $code"
  [[ "$(volume_holder "$NSB" block-data)" == "$want" ]] || die "after the switchover the holder is not $1"
  wait_until 60 "$1 Ready" pod_ready "$NSB" "$1"
  k -n "$NSB" exec "$1" -c app -- cat /data/marker | grep -qx "$marker" \
    || die "the file written before the switchover is not intact on $1"
}
say "block: switchover to $standby"
switch_to "$standby"
wait_until 30 "$active no longer Ready" sh -c "! kubectl --context $CONTEXT -n $NSB get pod $active -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
say "block: failback to $active"
switch_to "$active"
k -n "$NSB" get pod "$active" -o jsonpath='{.metadata.labels.twosite\.dev/role}' | grep -qx active \
  || echo "   (note: the controller has not labelled $active twosite.dev/role=active yet)"
k delete namespace "$NSB" --wait=true >/dev/null
k delete pv twosite-e2e-block --ignore-not-found >/dev/null
echo "block-active-standby: OK"
