//! The controller's part of protected RWX block volumes: every pass, the leader reads each
//! volume Lease (labelled `twosite.dev/volume`, any namespace) and its consumer pods (labelled
//! `twosite.dev/volume=<lease>` in the same namespace), asks the core
//! ([`node_health::volume::switch::VolumeSwitch`]) what to do, and does it: the role label
//! `twosite.dev/role=active` on the holder's pod only, the handover after the holder's node is
//! proven fenced, clearing a completed switchover's preferred holder, and the Events
//! `VolumeSwitchover`, `VolumeFailover`, `VolumeDemoteTimeout` on the Lease. It publishes each
//! volume's holder, epoch and last switch for the TwoSite status.
//!
//! Traffic: a Service selects the active consumer through the guard's readiness (only the
//! holder's app runs, so only it is Ready) and, for selectors that want it, the role label the
//! controller keeps; both say the same thing, the readiness without any controller.
//!
//! Every Lease write is a PUT of the object read, carrying its resourceVersion; a conflict is
//! decided again at the next pass.

use crate::crd::VolumeStatus;
use crate::error::{Result, report, with_timeout};
use crate::guard::lease_io::{
    self, HANDOVER_ANNOTATION, PREFERRED_HOLDER_ANNOTATION, VOLUME_LABEL,
};
use crate::leader_lease::Leadership;
use crate::metrics::Metrics;
use crate::status::RemediationView;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Api, Resource};
use node_health::time::Clock;
use node_health::volume::VolumeTiming;
use node_health::volume::switch::{
    Consumer, ROLE_ACTIVE, ROLE_LABEL, VolumeAction, VolumeEventReason, VolumeFacts, VolumeSwitch,
};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the leader looks at the volumes.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// What the volume loop needs.
pub struct VolumeContext {
    pub leases: Api<Lease>,
    pub pods: Api<Pod>,
    pub client: kube::Client,
    pub recorder: crate::events::EventSink,
    pub leadership: Leadership,
    pub metrics: Arc<Metrics>,
    pub api_timeout: Duration,
    pub timing: VolumeTiming,
    pub clock: Arc<dyn Clock + Send + Sync>,
    /// `--dry-run`: decide and log what would be written, write nothing but Events.
    pub dry_run: bool,
    /// The Leases and their consumers from watches ([`start_watches`]); `None`, or until both
    /// have listed: listed on every pass.
    pub stores: Option<VolumeStores>,
}

/// Watch-fed caches of the volume Leases and their consumer pods (both labelled
/// `twosite.dev/volume`): a pass reads memory instead of listing both kinds every 500 ms, which
/// on a real API server was most of a calm controller's requests (quorum reads of every Lease).
#[derive(Clone)]
pub struct VolumeStores {
    pub leases: Store<Lease>,
    pub pods: Store<Pod>,
}

impl VolumeStores {
    /// Both caches have had their first full list.
    pub fn ready(&self) -> bool {
        crate::vm::watch::listed(&self.leases) && crate::vm::watch::listed(&self.pods)
    }
}

/// Starts the two watches; the future drives them (and beats `guard`) until they end.
pub fn start_watches(
    client: &kube::Client,
    guard: crate::admin::LoopGuard,
) -> (
    VolumeStores,
    futures::future::BoxFuture<'static, Result<()>>,
) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (leases, lease_writer) = reflector::store();
    let (pods, pod_writer) = reflector::store();
    let config = watcher::Config::default().labels(VOLUME_LABEL);
    let strip_pod = |p: &mut Pod| p.metadata.managed_fields = None;
    let streams = vec![
        crate::vm::watch::drive(
            "volume Lease",
            reflector::reflector(
                lease_writer,
                watcher(Api::<Lease>::all(client.clone()), config.clone()),
            )
            .map(crate::vm::watch::progress)
            .boxed(),
        ),
        crate::vm::watch::drive(
            "volume consumer pod",
            reflector::reflector(
                pod_writer,
                watcher(Api::<Pod>::all(client.clone()), config).modify(strip_pod),
            )
            .map(crate::vm::watch::progress)
            .boxed(),
        ),
    ];
    (
        VolumeStores { leases, pods },
        crate::vm::watch::drive_all(streams, guard),
    )
}

fn uid(pod: &Pod) -> Option<&str> {
    pod.metadata.uid.as_deref()
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// The consumers of `lease` among `pods`: bound pods of its namespace labelled with its name.
pub fn consumers<'a>(lease: &Lease, pods: &'a [Pod]) -> Vec<(&'a Pod, Consumer)> {
    let (ns, name) = (
        lease.metadata.namespace.as_deref(),
        lease.metadata.name.as_deref(),
    );
    pods.iter()
        .filter(|p| p.metadata.namespace.as_deref() == ns)
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(VOLUME_LABEL))
                .map(String::as_str)
                == name
        })
        .filter_map(|p| {
            let consumer = Consumer {
                identity: uid(p)?.to_string(),
                node: node_of(p)?.to_string(),
                role_active: p
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(ROLE_LABEL))
                    .is_some_and(|v| v == ROLE_ACTIVE),
            };
            Some((p, consumer))
        })
        .collect()
}

/// The status entry of one volume.
pub fn volume_status(
    lease: &Lease,
    consumers: &[(&Pod, Consumer)],
    waiting_for: Option<String>,
) -> VolumeStatus {
    let spec = lease.spec.clone().unwrap_or_default();
    let read = lease_io::to_volume_lease(lease).ok();
    let pod_of = |id: Option<&str>| {
        consumers
            .iter()
            .find(|(_, c)| Some(c.identity.as_str()) == id)
            .map(|(p, c)| (p.metadata.name.clone().unwrap_or_default(), c.node.clone()))
    };
    let holder = pod_of(read.as_ref().and_then(|l| l.holder()));
    let preferred = pod_of(read.as_ref().and_then(|l| l.preferred_holder.as_deref()));
    VolumeStatus {
        namespace: lease.metadata.namespace.clone().unwrap_or_default(),
        name: lease.metadata.name.clone().unwrap_or_default(),
        holder_pod: holder.as_ref().map(|h| h.0.clone()),
        holder_node: holder.map(|h| h.1),
        epoch: i64::from(spec.lease_transitions.unwrap_or(0)),
        last_switch: spec.acquire_time.map(|t| t.0.to_string()),
        preferred_pod: preferred.map(|p| p.0),
        consumers: i32::try_from(consumers.len()).unwrap_or(i32::MAX),
        waiting_for,
    }
}

/// The Lease write an action asks for, from the object read (`None`: not a Lease write, or
/// the read object is not the version the core decided on).
pub fn lease_write(read: &Lease, action: &VolumeAction) -> Option<Lease> {
    let rv = read.metadata.resource_version.as_deref();
    let mut lease = read.clone();
    let annotations = lease.metadata.annotations.get_or_insert_with(BTreeMap::new);
    match action {
        VolumeAction::HandOver {
            expected_rv,
            handover,
        } if rv == Some(expected_rv.as_str()) => {
            annotations.insert(
                HANDOVER_ANNOTATION.to_string(),
                serde_json::to_string(handover).ok()?,
            );
        }
        VolumeAction::SetPreferred { expected_rv, to } if rv == Some(expected_rv.as_str()) => {
            annotations.insert(PREFERRED_HOLDER_ANNOTATION.to_string(), to.clone());
        }
        VolumeAction::ClearPreferred { expected_rv } if rv == Some(expected_rv.as_str()) => {
            annotations.remove(PREFERRED_HOLDER_ANNOTATION);
            if let Some(spec) = lease.spec.as_mut() {
                spec.preferred_holder = None;
            }
        }
        _ => return None,
    }
    Some(lease)
}

fn lease_reference(lease: &Lease) -> ObjectReference {
    let mut r = lease.object_ref(&());
    r.api_version = Some("coordination.k8s.io/v1".to_string());
    r
}

/// The leader's volume pass, kept between passes.
#[derive(Default)]
pub struct VolumeLoop {
    switches: BTreeMap<(String, String), VolumeSwitch>,
}

impl VolumeLoop {
    /// One pass: read, decide, write; returns the status entries.
    pub async fn pass(
        &mut self,
        ctx: &VolumeContext,
        view: Option<&RemediationView>,
    ) -> Result<Vec<VolumeStatus>> {
        if !ctx.leadership.is_leader() {
            // A new term starts afresh (the core's rule).
            self.switches.clear();
            return Ok(Vec::new());
        }
        let (leases, pods) = match ctx.stores.as_ref().filter(|s| s.ready()) {
            Some(stores) => {
                let leases: Vec<Lease> = stores
                    .leases
                    .state()
                    .iter()
                    .map(|l| (**l).clone())
                    .collect();
                let pods = if leases.is_empty() {
                    Vec::new()
                } else {
                    stores.pods.state().iter().map(|p| (**p).clone()).collect()
                };
                (leases, pods)
            }
            None => {
                let selector = ListParams::default().labels(VOLUME_LABEL);
                let leases = with_timeout(
                    "list volume leases",
                    ctx.api_timeout,
                    ctx.leases.list(&selector),
                )
                .await?
                .items;
                let pods = if leases.is_empty() {
                    Vec::new()
                } else {
                    with_timeout(
                        "list volume consumers",
                        ctx.api_timeout,
                        ctx.pods.list(&selector),
                    )
                    .await?
                    .items
                };
                (leases, pods)
            }
        };
        // The core's node sets, as the remediation loop computed them this pass.
        let (fenced, live) = view
            .map(|v| (v.fenced.clone(), v.live.clone()))
            .unwrap_or_default();
        let now = ctx.clock.now();
        let mut statuses = Vec::new();
        let mut seen = BTreeSet::new();
        for lease in &leases {
            let key = (
                lease.metadata.namespace.clone().unwrap_or_default(),
                lease.metadata.name.clone().unwrap_or_default(),
            );
            seen.insert(key.clone());
            let consumers = consumers(lease, &pods);
            let read = match lease_io::to_volume_lease(lease) {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!(namespace = key.0, lease = key.1, error = %err, "malformed volume Lease: not acting on it");
                    statuses.push(volume_status(lease, &consumers, Some(err.to_string())));
                    continue;
                }
            };
            let plain: Vec<Consumer> = consumers.iter().map(|(_, c)| c.clone()).collect();
            let facts = VolumeFacts {
                lease: &read,
                consumers: &plain,
                fenced_nodes: &fenced,
                live_nodes: &live,
                request: None,
            };
            let switch = self.switches.entry(key.clone()).or_default();
            let actions = switch.step(&facts, now, &ctx.timing);
            let waiting = switch.last_refusal().map(ToString::to_string);
            for action in &actions {
                self.apply(ctx, lease, &consumers, action).await;
            }
            statuses.push(volume_status(lease, &consumers, waiting));
        }
        self.switches.retain(|k, _| seen.contains(k));
        Ok(statuses)
    }

    async fn apply(
        &self,
        ctx: &VolumeContext,
        lease: &Lease,
        consumers: &[(&Pod, Consumer)],
        action: &VolumeAction,
    ) {
        let ns = lease.metadata.namespace.clone().unwrap_or_default();
        let name = lease.metadata.name.clone().unwrap_or_default();
        if ctx.dry_run && !matches!(action, VolumeAction::Event { .. }) {
            tracing::info!(
                namespace = ns,
                volume = name,
                ?action,
                "dry-run: would write"
            );
            return;
        }
        match action {
            VolumeAction::SetRole { identity, active } => {
                let Some((pod, _)) = consumers.iter().find(|(_, c)| &c.identity == identity) else {
                    return;
                };
                let pod_name = pod.metadata.name.clone().unwrap_or_default();
                let value = if *active {
                    json!(ROLE_ACTIVE)
                } else {
                    json!(null)
                };
                let patch = json!({ "metadata": { "labels": { ROLE_LABEL: value } } });
                let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
                match with_timeout(
                    "label consumer pod",
                    ctx.api_timeout,
                    pods.patch(&pod_name, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await
                {
                    Ok(_) => {
                        tracing::info!(namespace = ns, pod = pod_name, active, "role label set")
                    }
                    Err(err) => {
                        tracing::warn!(namespace = ns, pod = pod_name, error = %report(&err), "could not set the role label")
                    }
                }
            }
            VolumeAction::Event { reason, message } => {
                ctx.metrics
                    .volume_events
                    .get_or_create(&crate::metrics::ReasonLabels {
                        reason: reason.as_str().to_string(),
                    })
                    .inc();
                publish(ctx, lease, *reason, message).await;
            }
            VolumeAction::DropRequest { .. } => {}
            write => {
                let Some(body) = lease_write(lease, write) else {
                    return;
                };
                let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
                match with_timeout(
                    "write volume lease",
                    ctx.api_timeout,
                    leases.replace(&name, &PostParams::default(), &body),
                )
                .await
                {
                    Ok(_) => {
                        tracing::info!(namespace = ns, lease = name, ?write, "volume Lease written")
                    }
                    Err(err) => {
                        tracing::warn!(namespace = ns, lease = name, error = %report(&err), "volume Lease write failed; deciding again at the next pass")
                    }
                }
            }
        }
    }
}

async fn publish(ctx: &VolumeContext, lease: &Lease, reason: VolumeEventReason, message: &str) {
    tracing::info!(reason = reason.as_str(), message, "volume event");
    crate::error::publish_event(
        &ctx.recorder,
        ctx.api_timeout,
        &lease_reference(lease),
        (reason.as_str(), reason.is_warning(), "SwitchVolume"),
        message.to_string(),
    )
    .await;
}

/// Runs a pass every [`INTERVAL`], publishing the volumes' status when it changes.
pub async fn run_volume_loop(
    ctx: VolumeContext,
    view: watch::Receiver<Option<RemediationView>>,
    out: watch::Sender<Vec<VolumeStatus>>,
    guard: crate::admin::LoopGuard,
) -> Result<()> {
    let mut volumes = VolumeLoop::default();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        guard.beat();
        let current = view.borrow().clone();
        match volumes.pass(&ctx, current.as_ref()).await {
            Ok(next) => {
                ctx.metrics
                    .volumes
                    .set(i64::try_from(next.len()).unwrap_or(i64::MAX));
                ctx.metrics.set_volumes_held(next.iter().map(|v| {
                    (
                        v.namespace.as_str(),
                        v.name.as_str(),
                        v.holder_pod.is_some(),
                    )
                }));
                out.send_if_modified(|v| {
                    if *v == next {
                        false
                    } else {
                        *v = next;
                        true
                    }
                });
            }
            Err(err) => tracing::warn!(error = %report(&err), "volume pass failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use node_health::volume::Handover;

    fn lease(rv: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("db".into()),
                namespace: Some("apps".into()),
                resource_version: Some(rv.into()),
                annotations: Some(
                    [(PREFERRED_HOLDER_ANNOTATION.to_string(), "uid-b".to_string())].into(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("uid-a".into()),
                lease_transitions: Some(3),
                ..LeaseSpec::default()
            }),
        }
    }

    fn pod(name: &str, ns: &str, volume: &str, node: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                uid: Some(format!("uid-{name}")),
                labels: Some([(VOLUME_LABEL.to_string(), volume.to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    #[test]
    fn consumers_are_the_bound_labelled_pods_of_the_leases_namespace() {
        let pods = vec![
            pod("a", "apps", "db", "a-1"),
            pod("b", "apps", "db", "b-1"),
            pod("c", "other", "db", "b-1"),
            pod("d", "apps", "logs", "b-1"),
        ];
        let mut unbound = pod("e", "apps", "db", "x");
        unbound.spec = None;
        let mut all = pods.clone();
        all.push(unbound);
        let l = lease("7");
        let found: Vec<String> = consumers(&l, &all)
            .into_iter()
            .map(|(_, c)| c.identity)
            .collect();
        assert_eq!(found, vec!["uid-a".to_string(), "uid-b".to_string()]);
        let s = volume_status(&l, &consumers(&l, &all), None);
        assert_eq!(s.holder_pod.as_deref(), Some("a"));
        assert_eq!(s.holder_node.as_deref(), Some("a-1"));
        assert_eq!(s.preferred_pod.as_deref(), Some("b"));
        assert_eq!((s.epoch, s.consumers), (3, 2));
    }

    #[test]
    fn lease_writes_carry_the_version_decided_on_and_nothing_else_changes() {
        let read = lease("7");
        let hand = VolumeAction::HandOver {
            expected_rv: "7".into(),
            handover: Handover {
                to: "uid-b".into(),
                epoch: 4,
            },
        };
        let w = lease_write(&read, &hand).expect("a write");
        assert_eq!(w.metadata.resource_version.as_deref(), Some("7"));
        let v = lease_io::to_volume_lease(&w).expect("reads");
        assert_eq!(
            v.handover.as_ref().map(|h| (h.to.as_str(), h.epoch)),
            Some(("uid-b", 4))
        );
        assert_eq!(v.holder(), Some("uid-a"));
        // Decided on another version: no write at all.
        let stale = VolumeAction::ClearPreferred {
            expected_rv: "6".into(),
        };
        assert!(lease_write(&read, &stale).is_none());
        let clear = VolumeAction::ClearPreferred {
            expected_rv: "7".into(),
        };
        let w = lease_write(&read, &clear).expect("a write");
        assert_eq!(
            lease_io::to_volume_lease(&w)
                .expect("reads")
                .preferred_holder,
            None
        );
        assert!(
            lease_write(
                &read,
                &VolumeAction::DropRequest {
                    expected_rv: "7".into()
                }
            )
            .is_none()
        );
    }
}
