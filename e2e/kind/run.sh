#!/usr/bin/env bash
# Runs the kind scenarios in order against the cluster of up.sh; stops at the first failure.
# Without that cluster it fails at once with the reason (never a silent pass).
#   e2e/kind/run.sh                 # every scenario
#   e2e/kind/run.sh 04-node-loss    # one
source "$(dirname "$0")/lib.sh"
require_cluster
dir=$(dirname "$0")/scenarios
if (( $# )); then
  scenarios=("${@/#/$dir/}"); scenarios=("${scenarios[@]/%/.sh}")
else
  scenarios=("$dir"/*.sh)
fi
for s in "${scenarios[@]}"; do
  [[ -f "$s" ]] || die "no scenario $s"
  bash "$s"
done
echo "kind suite: ${#scenarios[@]} scenario(s) passed"
