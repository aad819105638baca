#!/usr/bin/env bash
# Acceptance scenario 8 of the design brief, the parts kind adds to apiserver_invalid_input (real
# API server) and the chart's schema checks (.ci/chart-check.sh): a guard started with a bad
# --fs exits 2 and leaves the device untouched; `twosite switchover` to a pod that is not a
# consumer of the volume exits 2 and writes nothing. (Annotated VMs: later, with issue 13.)
source "$(dirname "$0")/../lib.sh"
require_cluster
require_block
NSX=twosite-e2e-bad

k delete namespace "$NSX" --ignore-not-found --wait=true >/dev/null
k create namespace "$NSX" >/dev/null
wipe_block

say "bad-input: a guard with --fs btrfs0 (no such filesystem)"
shared_pv twosite-e2e-bad "$NSX" bad-data
cat <<YAML | k apply -f - >/dev/null
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: bad-data, namespace: $NSX}
spec:
  accessModes: [ReadWriteMany]
  volumeMode: Block
  storageClassName: twosite-shared-block
  resources: {requests: {storage: 1Gi}}
---
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: bad-data, namespace: $NSX, labels: {twosite.dev/volume: bad-data}}
spec: {}
---
apiVersion: v1
kind: Pod
metadata: {name: bad-guard, namespace: $NSX, labels: {twosite.dev/volume: bad-data}}
spec:
  restartPolicy: Never
  containers:
    - name: app
      image: ghcr.io/twosite/twosite:kind
      imagePullPolicy: Never
      command: [twosite, guard, --lease=bad-data, --device=/dev/bad-data, --mount=/tmp, --fs=btrfs0, --, sleep, "3600"]
      env:
        - {name: POD_UID, valueFrom: {fieldRef: {fieldPath: metadata.uid}}}
        - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
      securityContext: {privileged: true}
      volumeDevices: [{name: data, devicePath: /dev/bad-data}]
      resources: {requests: {cpu: 10m, memory: 16Mi}}
  volumes: [{name: data, persistentVolumeClaim: {claimName: bad-data}}]
YAML
wait_until 120 "the guard exited" sh -c "kubectl --context $CONTEXT -n $NSX get pod bad-guard -o jsonpath='{.status.phase}' | grep -qx Failed"
code=$(k -n "$NSX" get pod bad-guard -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode}')
k -n "$NSX" logs bad-guard | tail -n 3 | sed 's/^/   guard: /'
[[ "$code" == 2 ]] || die "the guard with a bad --fs exited $code, want 2"
[[ -z "$(volume_holder "$NSX" bad-data)" ]] || die "the refused guard took the Lease"
n=$(room_nodes room-a | head -n1)
docker exec "$n" sh -c "cmp -s -n 67108864 $BLOCK_DEV /dev/zero" || die "the device was written by a refused guard"
echo "   exit 2, no Lease taken, the device untouched"

say "bad-input: twosite switchover to a pod that is not a consumer"
cat <<YAML | k apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: $NSX, labels: {app: web}}
spec:
  containers:
    - {name: web, image: registry.k8s.io/pause:3.10, resources: {requests: {cpu: 1m, memory: 4Mi}}}
YAML
k -n "$NSX" wait --for=condition=Ready pod/web --timeout=120s >/dev/null
rv_before=$(k -n "$NSX" get lease bad-data -o jsonpath='{.metadata.resourceVersion}')
code=$(run_cli twosite-e2e-bad-switchover switchover "$NSX/bad-data" --to web)
[[ "$code" == 2 ]] || die "twosite switchover --to a non-consumer exited $code, want 2"
rv_after=$(k -n "$NSX" get lease bad-data -o jsonpath='{.metadata.resourceVersion}')
[[ "$rv_before" == "$rv_after" ]] || die "the refused switchover changed the Lease ($rv_before -> $rv_after)"
echo "   exit 2, the Lease unchanged"

k delete namespace "$NSX" --wait=true >/dev/null
k delete pv twosite-e2e-bad --ignore-not-found >/dev/null
echo "bad-input: OK"
