#!/usr/bin/env bash
# Acceptance scenario 3 of the design brief: two rooms, VMs annotated twosite.dev/ha: "true".
# Every node of room A loses power (its node containers stop); every annotated VM runs in room
# B within the 30 s target (VMI Running: launcher pod up and the domain started; guest boot
# excluded), and the VM without the annotation is left alone: twosite neither gates nor deletes
# its launcher pod (Kubernetes' own pod GC may release it later, ~50 s + 20 s after the loss).
# One annotated VM has a ReadWriteMany block disk on the shared device: its disk Lease moves to
# the new launcher pod only after the room-a node is proven fenced, and the new pod was gated.
source "$(dirname "$0")/../lib.sh"
require_cluster
require_block
NS=twosite-e2e-vm
OOS=node.kubernetes.io/out-of-service
k get crd virtualmachines.kubevirt.io >/dev/null 2>&1 \
  || die "KubeVirt is not installed: create the cluster with up.sh"

say "room-power-loss-vms: three VMs in room A (two annotated, one not)"
k create namespace $NS --dry-run=client -o yaml | k apply -f - >/dev/null
wipe_block
cat <<YAML | k apply -f - >/dev/null
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: vm-a-disk, namespace: $NS}
spec:
  accessModes: [ReadWriteMany]
  volumeMode: Block
  storageClassName: twosite-shared-block
  resources: {requests: {storage: 1Gi}}
YAML
shared_pv twosite-e2e-vm-a-disk $NS vm-a-disk
vm() { # vm NAME ANNOTATION(true|none) WITH_DISK(yes|no)
  local ann="" disk="" vol=""
  [[ $2 == true ]] && ann='annotations: {twosite.dev/ha: "true"}'
  if [[ $3 == yes ]]; then
    disk='- {name: data, disk: {bus: virtio}}'
    vol='- {name: data, persistentVolumeClaim: {claimName: vm-a-disk}}'
  fi
  cat <<YAML | k apply -f - >/dev/null
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: $1
  namespace: $NS
  $ann
spec:
  runStrategy: Always
  template:
    spec:
      terminationGracePeriodSeconds: 0
      domain:
        resources: {requests: {memory: 64Mi, cpu: 10m}}
        devices:
          disks:
            - {name: root, disk: {bus: virtio}}
            $disk
      affinity:
        nodeAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              preference: {matchExpressions: [{key: topology.kubernetes.io/zone, operator: In, values: [room-a]}]}
      volumes:
        - {name: root, containerDisk: {image: quay.io/kubevirt/cirros-container-disk-demo:$KUBEVIRT_DEMO_TAG}}
        $vol
YAML
}
KUBEVIRT_DEMO_TAG=${KUBEVIRT_DEMO_TAG:-v1.5.2}
vm vm-a true yes
vm vm-b true no
vm vm-plain none no
vmi_node() { k -n $NS get vmi "$1" -o jsonpath='{.status.nodeName}' 2>/dev/null; }
vmi_running() { [[ $(k -n $NS get vmi "$1" -o jsonpath='{.status.phase}' 2>/dev/null) == Running ]]; }
for v in vm-a vm-b vm-plain; do
  wait_until 600 "$v Running" vmi_running "$v"
  zone=$(k get node "$(vmi_node $v)" -o jsonpath='{.metadata.labels.topology\.kubernetes\.io/zone}')
  [[ $zone == room-a ]] || die "$v runs in $zone, not room-a (room A must hold it for this scenario)"
done
lease_holder() { k -n $NS get lease twosite-disk-vm-a-disk -o jsonpath='{.spec.holderIdentity}' 2>/dev/null; }
launcher_uid() { k -n $NS get pods -l kubevirt.io=virt-launcher,vm.kubevirt.io/name="$1" \
  --field-selector=status.phase=Running -o jsonpath='{.items[0].metadata.uid}' 2>/dev/null; }
lease_held() { [[ -n $(lease_holder) ]]; }
wait_until 60 "vm-a's disk Lease held by its launcher pod" lease_held
[[ $(lease_holder) == $(launcher_uid vm-a) ]] || die "vm-a's disk Lease names $(lease_holder), not its launcher pod"
epoch_before=$(k -n $NS get lease twosite-disk-vm-a-disk -o jsonpath='{.spec.leaseTransitions}')
plain_pod=$(k -n $NS get pods -l kubevirt.io=virt-launcher,vm.kubevirt.io/name=vm-plain -o jsonpath='{.items[0].metadata.name}')
[[ -n "$plain_pod" ]] || die "vm-plain has no launcher pod"
k -n $NS get pod "$plain_pod" -o jsonpath='{.metadata.labels.twosite\.dev/ha}' | grep -q . \
  && die "vm-plain's launcher pod carries twosite.dev/ha: twosite touched a VM that did not opt in"

say "room-power-loss-vms: every node of room A loses power"
remember_room room-a
room_a=$(room_nodes_cached room-a)
for n in $room_a; do docker stop -t 0 "$n" >/dev/null; done
t0=$SECONDS
in_room_b() { local n; n=$(vmi_node "$1"); [[ -n $n ]] && vmi_running "$1" \
  && [[ $(k get node "$n" -o jsonpath='{.metadata.labels.topology\.kubernetes\.io/zone}') == room-b ]]; }
wait_until 120 "vm-a Running in room B" in_room_b vm-a
wait_until 120 "vm-b Running in room B" in_room_b vm-b
all_running=$((SECONDS - t0))
echo "   power loss -> every annotated VM running in room B: ${all_running}s (target 30 s)"

say "room-power-loss-vms: the disk Lease moved only after the fence, to a gated pod"
new_holder=$(lease_holder)
[[ $new_holder == $(launcher_uid vm-a) ]] || die "vm-a's disk Lease names $new_holder, not its new launcher pod"
epoch_after=$(k -n $NS get lease twosite-disk-vm-a-disk -o jsonpath='{.spec.leaseTransitions}')
(( epoch_after > epoch_before )) || die "the disk Lease epoch did not rise ($epoch_before -> $epoch_after)"
vm_events() { k -n $NS get events --field-selector "involvedObject.name=$1" -o jsonpath='{range .items[*]}{.reason}: {.message}{"\n"}{end}'; }
vm_events vm-a | sed 's/^/   vm-a /'
vm_events vm-a | grep -q '^VMFailoverStarted' || die "no VMFailoverStarted Event on vm-a"
vm_events vm-a | grep -q '^VMFailoverCompleted' || die "no VMFailoverCompleted Event on vm-a"
for n in $room_a; do has_taint "$n" "$OOS" || die "$n is not tainted out-of-service"; done

say "room-power-loss-vms: vm-plain was left alone"
if k -n $NS get pod "$plain_pod" >/dev/null 2>&1; then
  echo "   its launcher pod $plain_pod still exists (Kubernetes' pod GC has not released it yet)"
else
  # Kubernetes releases it once the node is NotReady (50 s) and the pod GC runs (20 s): never
  # sooner than that after the loss.
  (( SECONDS - t0 >= 50 )) || die "vm-plain's launcher pod was deleted ${SECONDS}s after the loss: sooner than Kubernetes would"
  echo "   its launcher pod was released by Kubernetes (pod GC), after $((SECONDS - t0))s"
fi
k get lease -n $NS -l twosite.dev/disk -o name | grep -q plain && die "a disk Lease exists for vm-plain"
vm_events vm-plain | grep -q VMFailover && die "twosite reported a failover of vm-plain"

say "room-power-loss-vms: room A comes back"
reboot_room room-a
k delete namespace $NS --wait=false >/dev/null
(( all_running <= 30 )) || die "the annotated VMs took ${all_running}s to run in room B, over the 30 s target"
echo "room-power-loss-vms: OK"
