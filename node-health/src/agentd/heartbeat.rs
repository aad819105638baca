//! The node's heartbeat: the `coordination.k8s.io/v1` Lease `twosite-agent-<node>`.
//!
//! Every renewal GETs the Lease, then creates it if it is missing or replaces it with the
//! last-seen `resourceVersion` as a precondition. Every API call has a timeout. The monotonic
//! time is read just *before* the write is sent and reported to [`AgentCore`] on success: the
//! right to run counts from then, never from the answer. A failure, a timeout or a 409 is a
//! failed renewal.
//!
//! Besides the Lease fields the controller reads the annotations written on every renewal:
//! the boot ID, whether the watchdog fences, the right to run, and the number of failed
//! renewals before this one (the controller treats only `"0"` as a clean renewal: a node whose
//! renewals fail may be vouching for its partner).

use super::SharedCore;
use super::error::{Error, Result, with_timeout};
use crate::agent::RunBasis;
use crate::time::Clock;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

/// The label every heartbeat Lease carries.
pub const HEARTBEAT_LABEL: &str = "twosite.dev/agent-heartbeat";
/// The node's boot ID (`/proc/sys/kernel/random/boot_id`).
pub const BOOT_ID_ANNOTATION: &str = "twosite.dev/boot-id";
/// Failed renewals before this one, in decimal; only `"0"` is a clean renewal.
pub const RENEW_FAILURES_ANNOTATION: &str = "twosite.dev/renew-failures";
/// `enabled` or `disabled`: whether the node's watchdog reboots it when the agent stops feeding.
pub const WATCHDOG_ANNOTATION: &str = "twosite.dev/watchdog";
/// `Lease`, `Vouched` or `None`: the node's right to run when the renewal was built.
pub const RIGHT_TO_RUN_ANNOTATION: &str = "twosite.dev/right-to-run";
/// The controller's fence marker (written by the controller, never by the agent).
pub const FENCE_MARKER_ANNOTATION: &str = crate::remediation::FENCED_BOOT_ANNOTATION;

/// Whether the controller's fence marker is on the Lease: the node then has no right to run
/// until the controller takes it off. Replacing the Lease keeps it (the write is built on the
/// Lease read).
pub fn has_fence_marker(lease: &Lease) -> bool {
    lease
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(FENCE_MARKER_ANNOTATION))
}

/// The fence marker's value (the boot ID the node was fenced with), empty when absent.
fn fence_marker_value(lease: &Lease) -> String {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FENCE_MARKER_ANNOTATION))
        .cloned()
        .unwrap_or_default()
}

/// The heartbeat Lease's name for `node`.
pub fn lease_name(node: &str) -> String {
    format!("twosite-agent-{node}")
}

/// The Lease API the heartbeat needs, so tests can stand in for the API server.
pub trait HeartbeatApi: Send + Sync {
    /// The Lease, or `None` when it does not exist.
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<Lease>>> + Send;
    fn create(&self, lease: &Lease) -> impl Future<Output = Result<Lease>> + Send;
    /// Replaces the Lease; the API server refuses (409) when `lease`'s `resourceVersion` is stale.
    fn replace(&self, name: &str, lease: &Lease) -> impl Future<Output = Result<Lease>> + Send;
}

/// [`HeartbeatApi`] over the Kubernetes API, every call with a timeout.
#[derive(Clone)]
pub struct KubeLeases {
    api: Api<Lease>,
    timeout: Duration,
}

impl KubeLeases {
    pub fn new(client: kube::Client, namespace: &str, timeout: Duration) -> Self {
        KubeLeases {
            api: Api::namespaced(client, namespace),
            timeout,
        }
    }
}

impl HeartbeatApi for KubeLeases {
    async fn get(&self, name: &str) -> Result<Option<Lease>> {
        with_timeout("get heartbeat lease", self.timeout, self.api.get_opt(name)).await
    }

    async fn create(&self, lease: &Lease) -> Result<Lease> {
        with_timeout(
            "create heartbeat lease",
            self.timeout,
            self.api.create(&PostParams::default(), lease),
        )
        .await
    }

    async fn replace(&self, name: &str, lease: &Lease) -> Result<Lease> {
        with_timeout(
            "replace heartbeat lease",
            self.timeout,
            self.api.replace(name, &PostParams::default(), lease),
        )
        .await
    }
}

/// What this node says about itself in every renewal, besides the core's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    pub node: String,
    pub namespace: String,
    pub boot_id: String,
    /// Whether a watchdog will reboot the node when the agent stops feeding it.
    pub watchdog_enabled: bool,
    /// The Lease's `leaseDurationSeconds`.
    pub lease_duration: Duration,
}

/// What a successful renewal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewed {
    Created,
    Replaced,
}

/// The `right-to-run` annotation's value.
pub fn right_to_run_value(basis: Option<&RunBasis>) -> &'static str {
    match basis {
        Some(RunBasis::Lease) => "Lease",
        Some(RunBasis::Vouched { .. }) => "Vouched",
        Some(RunBasis::Witness { .. }) => "Witness",
        None => "None",
    }
}

/// The Lease to write, built on the last-read one (`base`) so fields we do not manage survive.
pub fn heartbeat_lease(
    facts: &NodeFacts,
    base: Option<&Lease>,
    failures_before: u32,
    right_to_run: Option<&RunBasis>,
    watchdog_failed: bool,
    now: jiff::Timestamp,
) -> Lease {
    let name = lease_name(&facts.node);
    let mut lease = base.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(facts.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    // The precondition is exactly the version we read (none for a create).
    lease.metadata.resource_version = base.and_then(|b| b.metadata.resource_version.clone());
    lease.metadata.managed_fields = None;
    lease
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HEARTBEAT_LABEL.to_string(), "true".to_string());
    let annotations = lease.metadata.annotations.get_or_insert_with(BTreeMap::new);
    for (key, value) in [
        (BOOT_ID_ANNOTATION, facts.boot_id.clone()),
        (RENEW_FAILURES_ANNOTATION, failures_before.to_string()),
        (
            WATCHDOG_ANNOTATION,
            match (facts.watchdog_enabled, watchdog_failed) {
                (true, false) => "enabled",
                (true, true) => "failed",
                (false, _) => "disabled",
            }
            .to_string(),
        ),
        (
            RIGHT_TO_RUN_ANNOTATION,
            right_to_run_value(right_to_run).to_string(),
        ),
    ] {
        annotations.insert(key.to_string(), value);
    }
    let mut spec: LeaseSpec = lease.spec.take().unwrap_or_default();
    spec.holder_identity = Some(facts.node.clone());
    spec.lease_duration_seconds =
        Some(i32::try_from(facts.lease_duration.as_secs()).unwrap_or(i32::MAX));
    spec.renew_time = Some(MicroTime(now));
    if spec.acquire_time.is_none() {
        spec.acquire_time = Some(MicroTime(now));
    }
    lease.spec = Some(spec);
    lease
}

/// One renewal: GET, then create or replace. Reports the outcome to the core either way.
pub async fn renew<A: HeartbeatApi>(
    api: &A,
    facts: &NodeFacts,
    core: &SharedCore,
    clock: &(dyn Clock + Send + Sync),
) -> Result<Renewed> {
    let result = write_heartbeat(api, facts, core, clock).await;
    let mut c = core.lock();
    match &result {
        Ok((_, sent_at)) => c.renewal_succeeded(*sent_at),
        Err(_) => c.renewal_failed(),
    }
    result.map(|(renewed, _)| renewed)
}

async fn write_heartbeat<A: HeartbeatApi>(
    api: &A,
    facts: &NodeFacts,
    core: &SharedCore,
    clock: &(dyn Clock + Send + Sync),
) -> Result<(Renewed, crate::time::MonoTime)> {
    let name = lease_name(&facts.node);
    let current = api.get(&name).await?;
    let marked = current.as_ref().is_some_and(has_fence_marker);
    let lease = {
        let mut c = core.lock();
        if marked && !c.fence_marker() {
            let marker = current.as_ref().map(fence_marker_value).unwrap_or_default();
            match crate::agent::read_fence_marker(&marker, &facts.boot_id) {
                crate::agent::FenceMarkerReading::ReturnedAfterFence => tracing::warn!(
                    fenced_boot_id = marker,
                    boot_id = facts.boot_id,
                    "this node was fenced before it rebooted and is back with a new boot ID; \
                     it runs no HA workload until the controller lifts the fence marker (expected \
                     within a few heartbeats)"
                ),
                crate::agent::FenceMarkerReading::FencedThisBoot => tracing::error!(
                    fenced_boot_id = marker,
                    boot_id = facts.boot_id,
                    "the controller fenced this node while it was running: its heartbeat Lease \
                     carries the fence marker; the node has lost its right to run"
                ),
            }
        } else if !marked && c.fence_marker() {
            tracing::info!(
                "the controller lifted the fence marker from this node's heartbeat Lease"
            );
        }
        c.observe_fence_marker(marked);
        let now = clock.now();
        heartbeat_lease(
            facts,
            current.as_ref(),
            c.failures_before_next_renewal(),
            c.right_to_run(now).as_ref(),
            c.is_watchdog_failed(),
            jiff::Timestamp::now(),
        )
    };
    // The right to run counts from the moment the write is sent: the server applies it no
    // earlier, so the controller sees it change no earlier either.
    let sent_at = clock.now();
    match current {
        None => api
            .create(&lease)
            .await
            .map(|_| (Renewed::Created, sent_at)),
        Some(_) => api
            .replace(&name, &lease)
            .await
            .map(|_| (Renewed::Replaced, sent_at)),
    }
}

/// Renews every `every` until the process ends; failures are logged and counted by the core.
pub async fn run_heartbeat<A: HeartbeatApi>(
    api: A,
    facts: NodeFacts,
    core: SharedCore,
    clock: std::sync::Arc<dyn Clock + Send + Sync>,
    every: Duration,
) -> Result<()> {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        match renew(&api, &facts, &core, clock.as_ref()).await {
            Ok(renewed) => {
                if failing {
                    tracing::info!(lease = lease_name(&facts.node), "heartbeat renewed again");
                    failing = false;
                }
                tracing::debug!(?renewed, "heartbeat renewed");
            }
            Err(err) => {
                failing = true;
                let failures = core.lock().failures_before_next_renewal();
                tracing::warn!(
                    error = %super::error::report(&err),
                    failures,
                    conflict = err.is_conflict(),
                    "heartbeat renewal failed"
                );
            }
        }
    }
}

/// Reads the boot ID (one line, trimmed).
pub fn read_boot_id(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| Error::BootId {
            path: path.to_path_buf(),
            source,
        })
}
