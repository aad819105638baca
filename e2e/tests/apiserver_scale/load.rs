//! The load `apiserver_scale` generates: every node's agent and kubelet Lease renewals, and the
//! load's own health.

use crate::common::TestNode;
use crate::{ROOMS, Timeline, now_ms};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LeaseKind {
    Agent,
    Kubelet,
}

struct Slot {
    node: String,
    room: usize,
    /// The Lease the last renewal returned (`None`: GET first).
    last: tokio::sync::Mutex<Option<Lease>>,
}

#[derive(Clone, Copy, Debug)]
struct Renewal {
    kind: LeaseKind,
    slot: usize,
    /// When it was due (unix ms) and when its answer came (unix ms).
    due_ms: i64,
    done_ms: i64,
    ok: bool,
    conflict: bool,
}

pub struct Generator {
    slots: Vec<Slot>,
    pub alive: [AtomicBool; 2],
    pub stop: AtomicBool,
    pub permits: Arc<Semaphore>,
    renewals: Mutex<Vec<Renewal>>,
}

impl Generator {
    /// A generator with a slot per node of `cluster`, sharing `permits`.
    pub fn new(cluster: &[TestNode], permits: Arc<Semaphore>) -> Generator {
        Generator {
            slots: cluster
                .iter()
                .map(|n| Slot {
                    node: n.name.clone(),
                    room: usize::from(n.zone == ROOMS[1]),
                    last: tokio::sync::Mutex::new(None),
                })
                .collect(),
            alive: [AtomicBool::new(true), AtomicBool::new(true)],
            stop: AtomicBool::new(false),
            permits,
            renewals: Mutex::new(Vec::new()),
        }
    }
}

/// The agent's heartbeat Lease as `heartbeat_lease` (node-health/src/agentd/heartbeat.rs)
/// builds it on the last-read one; or the kubelet's node Lease.
fn renewed_lease(kind: LeaseKind, node: &str, base: Option<&Lease>) -> Lease {
    let now = MicroTime(Timestamp::now());
    let name = match kind {
        LeaseKind::Agent => format!("twosite-agent-{node}"),
        LeaseKind::Kubelet => node.to_string(),
    };
    let mut lease = base.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(name),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    lease.metadata.resource_version = base.and_then(|b| b.metadata.resource_version.clone());
    lease.metadata.managed_fields = None;
    let mut spec: LeaseSpec = lease.spec.take().unwrap_or_default();
    spec.holder_identity = Some(node.to_string());
    match kind {
        LeaseKind::Agent => {
            lease
                .metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .insert("twosite.dev/agent-heartbeat".into(), "true".into());
            let annotations = lease.metadata.annotations.get_or_insert_with(BTreeMap::new);
            for (key, value) in [
                ("twosite.dev/boot-id", format!("boot-{node}-1")),
                ("twosite.dev/renew-failures", "0".to_string()),
                ("twosite.dev/watchdog", "enabled".to_string()),
                ("twosite.dev/right-to-run", "Lease".to_string()),
            ] {
                annotations.insert(key.to_string(), value);
            }
            spec.lease_duration_seconds = Some(8);
        }
        LeaseKind::Kubelet => spec.lease_duration_seconds = Some(40),
    }
    spec.renew_time = Some(now.clone());
    if spec.acquire_time.is_none() {
        spec.acquire_time = Some(now);
    }
    lease.spec = Some(spec);
    lease
}

/// One renewal: replace the last returned Lease (GET first when there is none), or create it.
/// `Err(true)` on a conflict.
async fn renew(api: &Api<Lease>, kind: LeaseKind, slot: &Slot) -> Result<(), bool> {
    let mut last = slot.last.lock().await;
    let base = match last.take() {
        Some(l) => Some(l),
        None => {
            let name = match kind {
                LeaseKind::Agent => format!("twosite-agent-{}", slot.node),
                LeaseKind::Kubelet => slot.node.clone(),
            };
            api.get_opt(&name).await.map_err(|_| false)?
        }
    };
    let lease = renewed_lease(kind, &slot.node, base.as_ref());
    let name = lease.metadata.name.clone().unwrap_or_default();
    let timeout = Duration::from_secs(2);
    let answer = match base {
        Some(_) => {
            tokio::time::timeout(timeout, api.replace(&name, &PostParams::default(), &lease)).await
        }
        None => tokio::time::timeout(timeout, api.create(&PostParams::default(), &lease)).await,
    };
    match answer {
        Ok(Ok(l)) => {
            *last = Some(l);
            Ok(())
        }
        Ok(Err(kube::Error::Api(s))) if s.code == 409 => Err(true),
        _ => Err(false),
    }
}

/// Renews the Leases of `kind` of every slot whose room is alive, every `period`, slot `i` at
/// phase `i/n` of the period.
pub fn run_generator(
    generator: Arc<Generator>,
    api: Api<Lease>,
    kind: LeaseKind,
    period: Duration,
    skip: BTreeSet<String>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let start_ms = now_ms();
        let n = generator.slots.len().max(1) as u32;
        for round in 0u32.. {
            for i in 0..generator.slots.len() {
                let offset = period * round + period * i as u32 / n;
                tokio::time::sleep_until(start + offset).await;
                if generator.stop.load(Ordering::Relaxed) {
                    return;
                }
                let slot = &generator.slots[i];
                if !generator.alive[slot.room].load(Ordering::Relaxed) || skip.contains(&slot.node)
                {
                    continue;
                }
                let permit = Arc::clone(&generator.permits)
                    .acquire_owned()
                    .await
                    .expect("the semaphore");
                let due_ms = start_ms + offset.as_millis() as i64;
                let (generator, api) = (Arc::clone(&generator), api.clone());
                tokio::spawn(async move {
                    let result = renew(&api, kind, &generator.slots[i]).await;
                    let renewal = Renewal {
                        kind,
                        slot: i,
                        due_ms,
                        done_ms: now_ms(),
                        ok: result.is_ok(),
                        conflict: result == Err(true),
                    };
                    generator.renewals.lock().expect("renewals").push(renewal);
                    drop(permit);
                });
            }
        }
    })
}

/// The load's own health: renewal latency (due → answer) and the longest gap between two
/// completed renewals of a node of room B (the controller counts a partner clear only while
/// its renewals arrive at most 3 s apart).
pub struct LoadHealth {
    pub calm_lat: Vec<f64>,
    pub failover_lat: Vec<f64>,
    pub failed: usize,
    pub conflicts: usize,
    pub max_gap_b: i64,
    pub renew_rate: f64,
}

pub fn load_health(
    generator: &Generator,
    kubelet_generator: &Generator,
    timeline: &Timeline,
) -> LoadHealth {
    let Timeline {
        calm_from_ms,
        calm_to_ms,
        stop_ms,
        released_ms,
        calm_secs,
        ..
    } = *timeline;
    let renewals = generator.renewals.lock().expect("renewals").clone();
    let kubelet_renewals = kubelet_generator.renewals.lock().expect("renewals").clone();
    let lat = |from: i64, to: i64| -> Vec<f64> {
        renewals
            .iter()
            .filter(|r| r.due_ms >= from && r.due_ms < to && r.kind == LeaseKind::Agent)
            .map(|r| (r.done_ms - r.due_ms) as f64)
            .collect()
    };
    let calm_lat = lat(calm_from_ms, calm_to_ms);
    let failover_lat = lat(stop_ms, released_ms);
    let failed = renewals.iter().filter(|r| !r.ok).count()
        + kubelet_renewals.iter().filter(|r| !r.ok).count();
    let conflicts = renewals.iter().filter(|r| r.conflict).count();
    let mut max_gap_b = 0i64;
    let mut done_by_slot: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
    for r in renewals
        .iter()
        .filter(|r| r.ok && r.due_ms >= calm_from_ms && r.due_ms < released_ms)
    {
        if generator.slots[r.slot].room == 1 {
            done_by_slot.entry(r.slot).or_default().push(r.done_ms);
        }
    }
    for done in done_by_slot.values_mut() {
        done.sort();
        for w in done.windows(2) {
            max_gap_b = max_gap_b.max(w[1] - w[0]);
        }
    }
    let renew_rate = renewals
        .iter()
        .filter(|r| r.due_ms >= calm_from_ms && r.due_ms < calm_to_ms)
        .count() as f64
        / calm_secs
        + kubelet_renewals
            .iter()
            .filter(|r| r.due_ms >= calm_from_ms && r.due_ms < calm_to_ms)
            .count() as f64
            / calm_secs;
    LoadHealth {
        calm_lat,
        failover_lat,
        failed,
        conflicts,
        max_gap_b,
        renew_rate,
    }
}
