//! The VM loop's writes, one per core action.

use super::VmContext;
use super::types::{GATED_ANNOTATION, LauncherPod, PodFields, VirtualMachine, has_gate};
use crate::error::{Error, Result, publish_event, with_timeout};
use crate::guard::lease_io::HANDOVER_ANNOTATION;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use node_health::vm::{DISK_LABEL, GATE, HA_LABEL, HELD_FOR_NODE_ANNOTATION, VmAction};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

fn vm_reference(vm: &VirtualMachine) -> ObjectReference {
    ObjectReference {
        api_version: Some("kubevirt.io/v1".into()),
        kind: Some("VirtualMachine".into()),
        name: vm.metadata.name.clone(),
        namespace: vm.metadata.namespace.clone(),
        uid: vm.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

/// An Event on a launcher pod (the VM is gone, so there is nothing else to put it on).
pub(super) async fn pod_event(ctx: &VmContext, pod: &LauncherPod, message: &str) {
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        uid: pod.metadata.uid.clone(),
        ..ObjectReference::default()
    };
    publish_event(
        &ctx.recorder,
        ctx.api_timeout,
        &reference,
        ("VMFailoverBlocked", true, "Gate"),
        message.to_string(),
    )
    .await;
}

fn find<'a>(leases: &[&'a Lease], name: &str) -> Result<&'a Lease> {
    leases
        .iter()
        .copied()
        .find(|l| l.metadata.name.as_deref() == Some(name))
        .ok_or_else(|| Error::Vm(format!("the disk Lease {name} is not in the cache")))
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// A PUT of `lease` (as read, so it carries its resourceVersion) after `edit`, if the
/// resourceVersion is the one decided on.
async fn put_lease(
    ctx: &VmContext,
    read: &Lease,
    expected_rv: &str,
    edit: impl FnOnce(&mut Lease),
) -> Result<()> {
    if read.metadata.resource_version.as_deref() != Some(expected_rv) {
        return Err(Error::Vm(
            "the cached Lease changed since the decision".into(),
        ));
    }
    let mut lease = read.clone();
    lease.metadata.managed_fields = None;
    edit(&mut lease);
    let api: Api<Lease> =
        Api::namespaced(ctx.client.clone(), &read.namespace().unwrap_or_default());
    with_timeout(
        "write disk Lease",
        ctx.api_timeout,
        api.replace(&read.name_any(), &PostParams::default(), &lease),
    )
    .await?;
    Ok(())
}

fn annotations(lease: &mut Lease) -> &mut BTreeMap<String, String> {
    lease.metadata.annotations.get_or_insert_with(BTreeMap::new)
}

pub(super) async fn execute(
    ctx: &VmContext,
    vm: &VirtualMachine,
    leases: &[&Lease],
    pods: &[Arc<LauncherPod>],
    action: &VmAction,
) -> Result<()> {
    let ns = vm.namespace().unwrap_or_default();
    if ctx.dry_run
        && !matches!(
            action,
            VmAction::Event { .. } | VmAction::FailoverCompleted { .. }
        )
    {
        tracing::info!(
            vm = vm.name_any(),
            namespace = ns,
            ?action,
            "dry-run: would write"
        );
        return Ok(());
    }
    match action {
        VmAction::SetTemplateLabel { on } => {
            let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
            let value = if *on { json!("true") } else { json!(null) };
            let patch = json!({"spec": {"template": {"metadata": {"labels": {HA_LABEL: value}}}}});
            with_timeout(
                "label VM template",
                ctx.api_timeout,
                api.patch(
                    &vm.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                ),
            )
            .await?;
            tracing::info!(
                vm = vm.name_any(),
                namespace = ns,
                on,
                "VM template label set"
            );
        }
        VmAction::CreateLease { lease, pvc } => {
            let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
            let obj = Lease {
                metadata: ObjectMeta {
                    name: Some(lease.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some([(DISK_LABEL.to_string(), pvc.clone())].into()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            match with_timeout(
                "create disk Lease",
                ctx.api_timeout,
                api.create(&PostParams::default(), &obj),
            )
            .await
            {
                Ok(_) => tracing::info!(lease, namespace = ns, pvc, "disk Lease created"),
                Err(Error::Kube {
                    source: kube::Error::Api(s),
                    ..
                }) if s.code == 409 => {}
                Err(err) => return Err(err),
            }
        }
        VmAction::Grant {
            lease,
            expected_rv,
            to,
            node,
            epoch,
        } => {
            let read = find(leases, lease)?;
            let transitions = i32::try_from(*epoch)
                .map_err(|_| Error::Vm(format!("epoch {epoch} does not fit leaseTransitions")))?;
            put_lease(ctx, read, expected_rv, |l| {
                let spec = l.spec.get_or_insert_with(LeaseSpec::default);
                spec.holder_identity = Some(to.clone());
                spec.lease_transitions = Some(transitions);
                spec.acquire_time = Some(now_micro());
                spec.renew_time = Some(now_micro());
                let a = annotations(l);
                a.remove(HANDOVER_ANNOTATION);
                a.insert(
                    HELD_FOR_NODE_ANNOTATION.to_string(),
                    node.clone().unwrap_or_default(),
                );
            })
            .await?;
            tracing::info!(
                lease,
                namespace = ns,
                to,
                epoch,
                "disk Lease granted to a launcher pod"
            );
        }
        VmAction::RecordNode {
            lease,
            expected_rv,
            node,
        } => {
            let read = find(leases, lease)?;
            put_lease(ctx, read, expected_rv, |l| {
                annotations(l).insert(HELD_FOR_NODE_ANNOTATION.to_string(), node.clone());
            })
            .await?;
        }
        VmAction::Release { lease, expected_rv } => {
            let read = find(leases, lease)?;
            put_lease(ctx, read, expected_rv, |l| {
                l.spec
                    .get_or_insert_with(LeaseSpec::default)
                    .holder_identity = None;
                annotations(l).remove(HELD_FOR_NODE_ANNOTATION);
            })
            .await?;
            tracing::info!(
                lease,
                namespace = ns,
                "disk Lease released: the VM no longer runs"
            );
        }
        VmAction::Ungate { pod, uid } => {
            let read = pods
                .iter()
                .find(|p| p.metadata.uid.as_deref() == Some(uid.as_str()))
                .ok_or_else(|| Error::Vm(format!("the launcher pod {pod} is not in the cache")))?;
            ungate(ctx, read).await?;
            tracing::info!(
                pod,
                namespace = ns,
                "scheduling gate lifted: every disk Lease is granted to the pod"
            );
        }
        VmAction::Event { reason, message } => {
            ctx.metrics
                .vm_events
                .get_or_create(&crate::metrics::ReasonLabels {
                    reason: reason.as_str().to_string(),
                })
                .inc();
            publish_event(
                &ctx.recorder,
                ctx.api_timeout,
                &vm_reference(vm),
                (reason.as_str(), reason.is_warning(), "Protect"),
                message.clone(),
            )
            .await;
        }
        VmAction::FailoverCompleted { duration } => {
            ctx.metrics.vm_failovers.inc();
            ctx.metrics
                .vm_failover_duration
                .observe(duration.as_secs_f64());
        }
    }
    Ok(())
}

/// The JSON patch that lifts the gate of `pod` as read: a uid test (a new pod of the same name
/// is not touched), the gate's removal by index with a test of its name, the annotation's
/// removal. `None` if there is nothing to lift.
pub fn ungate_patch(pod: &impl PodFields) -> Option<json_patch::Patch> {
    if !has_gate(pod) {
        return None;
    }
    let meta = pod.pod_meta();
    let mut ops = vec![json!({"op": "test", "path": "/metadata/uid", "value": meta.uid})];
    if let Some(i) = pod.scheduling_gates().iter().position(|g| g.name == GATE) {
        ops.push(
            json!({"op": "test", "path": format!("/spec/schedulingGates/{i}/name"), "value": GATE}),
        );
        ops.push(json!({"op": "remove", "path": format!("/spec/schedulingGates/{i}")}));
    }
    if pod.gated_annotation() {
        ops.push(json!({"op": "remove", "path": format!("/metadata/annotations/{}", GATED_ANNOTATION.replace('/', "~1"))}));
    }
    serde_json::from_value(serde_json::Value::Array(ops)).ok()
}

async fn ungate(ctx: &VmContext, pod: &LauncherPod) -> Result<()> {
    let Some(patch) = ungate_patch(pod) else {
        return Ok(());
    };
    // Read back into the slim form too: the answer is the whole pod.
    let api: Api<LauncherPod> =
        Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    with_timeout(
        "lift scheduling gate",
        ctx.api_timeout,
        api.patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        ),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    #[test]
    fn the_ungate_patch_tests_the_uid_and_the_gate_and_drops_the_annotation() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "uid": "u1", "annotations": {GATED_ANNOTATION: "x"}},
            "spec": {"containers": [], "schedulingGates": [{"name": "other"}, {"name": GATE}]}
        }))
        .expect("pod");
        let patch = serde_json::to_value(ungate_patch(&pod).expect("a patch")).expect("json");
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/metadata/uid", "value": "u1"},
                {"op": "test", "path": "/spec/schedulingGates/1/name", "value": GATE},
                {"op": "remove", "path": "/spec/schedulingGates/1"},
                {"op": "remove", "path": "/metadata/annotations/twosite.dev~1gated"}
            ])
        );
        let plain: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": []}}))
                .expect("pod");
        assert!(ungate_patch(&plain).is_none());
    }
}
