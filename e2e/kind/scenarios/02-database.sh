#!/usr/bin/env bash
# Acceptance scenario 2 of the design brief: PostgreSQL active/standby on one RWX block volume
# (examples/postgres-active-standby.yaml: a StatefulSet of two, one per room, each under
# `twosite guard`). A client inserts ROWS rows (default 10,000) through the Service with retry;
# the active pod is deleted meanwhile; afterwards every acknowledged row is present exactly once.
source "$(dirname "$0")/../lib.sh"
require_cluster
require_block
NSP=pg-demo
ROWS=${ROWS:-10000}

say "database: clean device, the example"
k delete namespace "$NSP" --ignore-not-found --wait=true >/dev/null
wipe_block
shared_pv twosite-e2e-pg "$NSP" postgres-data
apply_example examples/postgres-active-standby.yaml
wait_until 300 "one postgres Ready" sh -c "kubectl --context $CONTEXT -n $NSP get pods -l app=postgres-ha -o jsonpath='{.items[*].status.conditions[?(@.type==\"Ready\")].status}' | grep -q True"
active_pod() {
  local uid; uid=$(volume_holder "$NSP" postgres-data)
  k -n "$NSP" get pods -l app=postgres-ha -o jsonpath="{range .items[?(@.metadata.uid==\"$uid\")]}{.metadata.name}{end}"
}
active=$(active_pod); [[ -n "$active" ]] || die "no postgres pod holds the volume"
echo "   active: $active"

say "database: a client inserts $ROWS rows with retry"
cat <<YAML | k apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: pg-client, namespace: $NSP}
spec:
  restartPolicy: Never
  containers:
    - name: client
      image: postgres:16-bookworm
      env:
        - {name: PGHOST, value: postgres-ha}
        - {name: PGUSER, value: postgres}
        - {name: PGCONNECT_TIMEOUT, value: "2"}
        - name: PGPASSWORD
          valueFrom: {secretKeyRef: {name: postgres, key: password}}
      resources: {requests: {cpu: 50m, memory: 32Mi}}
      command:
        - bash
        - -c
        - |
          until psql -qtAc 'create table if not exists rows (id int primary key)'; do sleep 0.5; done
          acked=0 retries=0
          for i in \$(seq 1 $ROWS); do
            # One statement per row, retried until acknowledged: a retry after a lost answer
            # must not duplicate it (primary key, on conflict do nothing).
            until psql -qtAc "insert into rows values (\$i) on conflict do nothing" >/dev/null 2>&1; do
              retries=\$((retries + 1)); sleep 0.2
            done
            acked=\$((acked + 1))
            (( i % 1000 )) || echo "progress \$i"
          done
          echo "acked \$acked retries \$retries"
YAML
wait_until 180 "the client past 1000 rows" sh -c "kubectl --context $CONTEXT -n $NSP logs pg-client | grep -q 'progress 1000'"

say "database: delete the active pod $active"
uid_before=$(volume_holder "$NSP" postgres-data)
k -n "$NSP" delete pod "$active" --wait=false >/dev/null
t0=$SECONDS
wait_until 120 "another consumer holds the volume" sh -c "u=\$(kubectl --context $CONTEXT -n $NSP get lease postgres-data -o jsonpath='{.spec.holderIdentity}'); [ -n \"\$u\" ] && [ \"\$u\" != $uid_before ]"
echo "   failover (delete -> new holder): $((SECONDS - t0))s; new active $(active_pod)"
wait_until 1800 "the client done" sh -c "kubectl --context $CONTEXT -n $NSP get pod pg-client -o jsonpath='{.status.phase}' | grep -qx Succeeded"
summary=$(k -n "$NSP" logs pg-client | grep '^acked')
echo "   client: $summary"
acked=$(awk '{print $2}' <<<"$summary")
[[ "$acked" == "$ROWS" ]] || die "the client acknowledged $acked of $ROWS rows"
counts=$(k -n "$NSP" exec "$(active_pod)" -c postgres -- \
  psql -U postgres -qtAc 'select count(*), count(distinct id), min(id), max(id) from rows')
echo "   rows in the table (count, distinct, min, max): $counts"
[[ "$counts" == "$ROWS|$ROWS|1|$ROWS" ]] || die "every acknowledged row must be present once: got $counts"
k delete namespace "$NSP" --wait=true >/dev/null
k delete pv twosite-e2e-pg --ignore-not-found >/dev/null
echo "database: OK"
