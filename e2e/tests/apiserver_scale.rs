//! The real-API-server tier at scale (issue 15, part 3): the load of `twosite-bench` against a
//! real kube-apiserver 1.20.2 and the real `twosite controller` and `twosite-agent` binaries,
//! with the figures the bench prints, measured from the outside:
//!
//! - N Nodes in two rooms (`TWOSITE_SCALE_NODES`, default 40: CI; run 200 or 400 by hand),
//!   20 pods bound to each (18 owned by a ReplicaSet, one bare, one of a DaemonSet);
//! - the test plays every node's agent (heartbeat Lease `twosite-agent-<node>` replaced every 2 s,
//!   the fields and annotations `node-health/src/agentd/heartbeat.rs` writes) and kubelet (node
//!   Lease every 10 s), each renewal on its own phase of the period, at most
//!   `TWOSITE_SCALE_CONCURRENCY` (default 8) requests in flight. Like the kubelet, a renewal
//!   replaces the Lease the last renewal returned (one PUT; a GET only after a failure); the real
//!   agent GETs before every PUT (its own requests are measured below);
//! - the real controller, as its ServiceAccount: after a warm-up, a calm window
//!   (`TWOSITE_SCALE_CALM_SECS`, default 60) measures its RSS (`/proc/<pid>/status`), its CPU
//!   (`/proc/<pid>/stat`) and its requests (the API server's audit log, by user);
//! - `TWOSITE_SCALE_AGENTS` (default 3) real agents on nodes of room B (fake watchdog, each under
//!   its own user bound to the agent's Role and ClusterRole, so the audit log tells them apart),
//!   measured over the same window;
//! - then room A loses power: its agents and kubelets stop renewing. The test waits until every
//!   node of room A carries the out-of-service taint and its releasable pods are gone, and
//!   measures the failover: the time to the last release, the controller's requests (by
//!   verb/resource, per lost node), its peak RSS and CPU, the fence commits' spread and the
//!   decision latency (the controller's `twosite_fence_decision_seconds` histogram when it has
//!   one; else, and always as a cross-check, an outside upper bound from the audit log: the fence
//!   commit's arrival minus the last renewal's completion minus the fence deadline of the default
//!   timing, 15 s stretched by 1 %).
//!
//! Figures are printed (a block, and one `SCALE_JSON` line), never asserted: the test asserts only
//! correctness. Every node of room A fenced (marker on its Lease), tainted, its releasable pods
//! deleted and its DaemonSet pod kept; no node, Lease or pod of room B written by the controller;
//! no process exited.
//!
//! Build the binaries first (same target directory, or `TWOSITE_BIN_DIR`):
//! `cargo build -p twosite-controller --bin twosite -p twosite-node-health --bin twosite-agent`.
//! `TWOSITE_SCALE_NODES=200 cargo test -p twosite-e2e --test apiserver_scale -- --nocapture`.

mod common;

use common::agents::{AgentOptions, has_taint, start_agent_with};
use common::{
    AGENT_BIN, CONTROLLER_BIN, NAMESPACE, Process, Setup, TestNode, create_doc, create_node,
    http_get, twosites,
};
use e2e::apiserver::{self, ApiServer, Identity, Options};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;

const TEST: &str = "apiserver_scale";
const ROOMS: [&str; 2] = ["room-a", "room-b"];
const POD_NAMESPACE: &str = "scale";
const PODS_PER_NODE: usize = 20;
const ROOM_LABEL: &str = "twosite-scale/room";
const RELEASABLE_LABEL: &str = "twosite-scale/releasable";
const OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";
const UNRESPONSIVE: &str = "twosite.dev/unresponsive";
const FENCED_BOOT: &str = "twosite.dev/fenced-boot-id";
/// The group the test's per-agent users are in, bound to the agent's Role and ClusterRole.
const AGENT_GROUP: &str = "twosite-scale-agents";
/// The fence deadline of the default timing after the last renewal the controller saw: agent
/// lease 8 s + watchdog 5 s + margin 2 s, stretched by the 1 % drift bound
/// (`node-health/src/verdict.rs`).
const FENCE_DEADLINE_MS: i64 = 15_150;
const AGENT_PERIOD: Duration = Duration::from_secs(2);
const KUBELET_PERIOD: Duration = Duration::from_secs(10);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

// ---------------------------------------------------------------------------------------------
// The cluster the test plays.

fn node_name(room: usize, i: usize) -> String {
    format!("{}-{i}", if room == 0 { "a" } else { "b" })
}

/// Room and index from a node name (`a-12` → (0, 12)).
fn parse_node(name: &str) -> Option<(usize, usize)> {
    let (room, i) = name.split_once('-')?;
    let room = match room {
        "a" => 0,
        "b" => 1,
        _ => return None,
    };
    Some((room, i.parse().ok()?))
}

/// Every node its own loopback address, so real agents can bind their peer port on theirs.
fn node_address(room: usize, i: usize) -> String {
    format!("127.{}.{}.{}", room + 1, i / 200, i % 200 + 1)
}

/// The node a pod of the test's is bound to (pods are `<node>-<j>` and `<node>-ds`).
fn pod_node(pod: &str) -> Option<&str> {
    pod.rsplit_once('-').map(|(node, _)| node)
}

fn pod(node: &str, room: &str, j: usize) -> Pod {
    let (name, owner) = match j {
        0 => (format!("{node}-ds"), Some(("DaemonSet", "node-exporter"))),
        1 => (format!("{node}-{j:02}"), None),
        _ => (
            format!("{node}-{j:02}"),
            Some(("ReplicaSet", "web-6d4cf56db6")),
        ),
    };
    let mut p: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "namespace": POD_NAMESPACE,
            "labels": {
                ROOM_LABEL: room,
                RELEASABLE_LABEL: if j == 0 { "false" } else { "true" },
                "app": "web",
            },
        },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "app", "image": "registry.invalid/app:1" }]
        }
    }))
    .expect("a Pod");
    p.metadata.owner_references = owner.map(|(kind, name)| {
        vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: format!("00000000-0000-0000-0000-{:012}", kind.len()),
            controller: Some(true),
            ..OwnerReference::default()
        }]
    });
    p
}

/// Runs `f(item)` for every item, at most `limit` at a time.
async fn bounded<T, F, Fut>(items: Vec<T>, limit: usize, f: F)
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let f = Arc::new(f);
    let mut set = tokio::task::JoinSet::new();
    for item in items {
        while set.len() >= limit {
            set.join_next()
                .await
                .expect("a task")
                .expect("a setup task");
        }
        let f = Arc::clone(&f);
        set.spawn(async move { f(item).await });
    }
    while let Some(r) = set.join_next().await {
        r.expect("a setup task");
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator: agent and kubelet Lease renewals.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LeaseKind {
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

struct Generator {
    slots: Vec<Slot>,
    alive: [AtomicBool; 2],
    stop: AtomicBool,
    permits: Arc<Semaphore>,
    renewals: Mutex<Vec<Renewal>>,
}

impl Generator {
    /// A generator with a slot per node of `cluster`, sharing `permits`.
    fn new(cluster: &[TestNode], permits: Arc<Semaphore>) -> Generator {
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
fn run_generator(
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

// ---------------------------------------------------------------------------------------------
// Processes: RSS and CPU from /proc.

#[derive(Clone, Copy, Debug, Default)]
struct ProcSample {
    /// utime + stime, seconds.
    cpu_s: f64,
    rss_kib: u64,
    hwm_kib: u64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu_s: (utime + stime) as f64 / clock_ticks(),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// The kube-apiserver and etcd processes of `server` (their command lines name its directory).
fn control_plane_pids(server: &ApiServer) -> Vec<(String, u32)> {
    let dir = server.dir().display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(&dir) {
            continue;
        }
        let exe = cmdline.split_whitespace().next().unwrap_or_default();
        let name = Path::new(exe)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.starts_with("kube-apiserver") {
            found.push(("kube-apiserver".to_string(), pid));
        } else if name.starts_with("etcd") {
            found.push(("etcd".to_string(), pid));
        }
    }
    found.sort();
    found
}

/// Samples every watched process every 500 ms: the peak RSS of each since the last `take`.
struct RssWatch {
    peaks: Mutex<BTreeMap<u32, u64>>,
}

impl RssWatch {
    fn start(pids: Vec<u32>) -> (Arc<RssWatch>, tokio::task::JoinHandle<()>) {
        let watch = Arc::new(RssWatch {
            peaks: Mutex::new(BTreeMap::new()),
        });
        let w = Arc::clone(&watch);
        let handle = tokio::spawn(async move {
            loop {
                for pid in &pids {
                    if let Some(s) = sample(*pid) {
                        let mut peaks = w.peaks.lock().expect("peaks");
                        let peak = peaks.entry(*pid).or_default();
                        *peak = (*peak).max(s.rss_kib);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        (watch, handle)
    }

    /// The peak RSS (KiB) of `pid` since the last take, and starts a new period.
    fn take(&self, pid: u32) -> u64 {
        self.peaks
            .lock()
            .expect("peaks")
            .insert(pid, 0)
            .unwrap_or(0)
    }
}

fn cpu_percent(a: &ProcSample, b: &ProcSample, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    100.0 * (b.cpu_s - a.cpu_s) / secs
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// The audit log.

#[derive(Deserialize)]
struct AuditUser {
    username: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AuditObject {
    resource: Option<String>,
    subresource: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct AuditStatus {
    code: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditEvent {
    #[serde(rename = "auditID")]
    audit_id: String,
    verb: String,
    user: AuditUser,
    object_ref: Option<AuditObject>,
    request_received_timestamp: String,
    stage_timestamp: String,
    response_status: Option<AuditStatus>,
    #[serde(rename = "requestURI")]
    request_uri: String,
}

/// One API request, from its first audit event (`ResponseStarted` for a watch, else
/// `ResponseComplete`).
#[derive(Debug, Clone)]
struct Request {
    received_ms: i64,
    done_ms: i64,
    user: String,
    verb: String,
    /// `resource` or `resource/subresource`.
    resource: String,
    namespace: String,
    name: String,
    code: u16,
    /// The path and the selectors of the query (no resourceVersion, limit or timeouts).
    uri: String,
}

fn short_uri(uri: &str) -> String {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| {
            p.starts_with("labelSelector")
                || p.starts_with("fieldSelector")
                || p.starts_with("watch")
        })
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

fn timestamp_ms(s: &str) -> i64 {
    s.parse::<Timestamp>()
        .map(|t| t.as_millisecond())
        .unwrap_or(0)
}

fn read_audit(path: &Path) -> Vec<Request> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut seen = HashSet::new();
    let mut requests = Vec::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<AuditEvent>(line) else {
            continue;
        };
        if !seen.insert(event.audit_id) {
            continue;
        }
        let object = event.object_ref.unwrap_or_default();
        let resource = match (object.resource, object.subresource) {
            (Some(r), Some(s)) => format!("{r}/{s}"),
            (Some(r), None) => r,
            (None, _) => "(non-resource)".to_string(),
        };
        requests.push(Request {
            received_ms: timestamp_ms(&event.request_received_timestamp),
            done_ms: timestamp_ms(&event.stage_timestamp),
            user: event.user.username,
            verb: event.verb,
            resource,
            namespace: object.namespace.unwrap_or_default(),
            name: object.name.unwrap_or_default(),
            code: event.response_status.and_then(|s| s.code).unwrap_or(0),
            uri: short_uri(&event.request_uri),
        });
    }
    requests
}

/// The requests of `user` received in [`from`, `to`) (unix ms).
fn requests_of<'a>(
    requests: &'a [Request],
    user: &'a str,
    from: i64,
    to: i64,
) -> impl Iterator<Item = &'a Request> + 'a {
    requests
        .iter()
        .filter(move |r| r.user == user && r.received_ms >= from && r.received_ms < to)
}

/// `verb resource` → count.
fn by_verb<'a>(requests: impl Iterator<Item = &'a Request>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in requests {
        let failed = if r.code >= 300 {
            format!(" ({})", r.code)
        } else {
            String::new()
        };
        *counts
            .entry(format!("{} {}{failed}", r.verb, r.resource))
            .or_default() += 1;
    }
    counts
}

/// The LISTs and WATCHes by URI (path and selectors) and answer code.
fn by_uri<'a>(requests: impl Iterator<Item = &'a Request>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in requests.filter(|r| r.verb == "list" || r.verb == "watch") {
        *counts
            .entry(format!("{} {} {}", r.verb, r.uri, r.code))
            .or_default() += 1;
    }
    counts
}

fn show_counts(counts: &BTreeMap<String, usize>) -> String {
    let mut v: Vec<_> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Small statistics.

fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// `histogram_quantile` over the cumulative buckets `(le, count)` of a Prometheus histogram.
fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let mut b = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut prev_le, mut prev_count) = (0.0, 0.0);
    for (le, count) in b {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let width = count - prev_count;
            let frac = if width > 0.0 {
                (rank - prev_count) / width
            } else {
                1.0
            };
            return Some(prev_le + (le - prev_le) * frac);
        }
        (prev_le, prev_count) = (le, count);
    }
    None
}

/// A histogram of the controller's /metrics, summed over its label sets: the buckets, `_sum` and
/// `_count`; `None` when the controller does not expose it.
/// A Prometheus histogram: cumulative buckets `(le, count)`, `_sum` and `_count`.
struct Histogram {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

fn histogram(metrics: &str, name: &str) -> Option<Histogram> {
    let mut buckets: BTreeMap<String, f64> = BTreeMap::new();
    let (mut sum, mut count, mut found) = (0.0, 0.0, false);
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let base = series.split('{').next().unwrap_or_default();
        if base == format!("{name}_bucket") {
            found = true;
            let le = series
                .split("le=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or("+Inf")
                .to_string();
            *buckets.entry(le).or_default() += value;
        } else if base == format!("{name}_sum") {
            sum += value;
        } else if base == format!("{name}_count") {
            count += value;
            found = true;
        }
    }
    let buckets = buckets
        .into_iter()
        .map(|(le, n)| {
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            (le, n)
        })
        .collect();
    found.then_some(Histogram {
        buckets,
        sum,
        count,
    })
}

// ---------------------------------------------------------------------------------------------
// Checks of the cluster's state.

async fn count_pods(pods: &Api<Pod>, selector: &str) -> Result<usize, String> {
    pods.list_metadata(&ListParams::default().labels(selector))
        .await
        .map(|l| l.items.len())
        .map_err(|e| e.to_string())
}

/// The nodes of `room`, by name.
async fn room_nodes(nodes: &Api<Node>, room: &str) -> Result<Vec<Node>, String> {
    nodes
        .list(&ListParams::default().labels(&format!("topology.kubernetes.io/zone={room}")))
        .await
        .map(|l| l.items)
        .map_err(|e| e.to_string())
}

fn has_annotation(meta: &ObjectMeta, key: &str) -> bool {
    meta.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(key))
}

async fn fail_with_logs(
    what: &str,
    controller: &Process,
    server: &ApiServer,
    agents: &[Process],
) -> ! {
    let agent_logs: Vec<String> = agents
        .iter()
        .map(|a| format!("--- {} ---\n{}", a.name, a.log_tail(15)))
        .collect();
    panic!(
        "{what}\n--- controller log ---\n{}\n{}\n--- kube-apiserver log ---\n{}",
        controller.log_tail(60),
        agent_logs.join("\n"),
        server.log_tail(20)
    );
}

fn assert_all_running(controller: &mut Process, agents: &mut [Process]) {
    controller.assert_running();
    for a in agents.iter_mut() {
        a.assert_running();
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_scale() {
    let t0 = Instant::now();
    let n_total: usize = env_or("TWOSITE_SCALE_NODES", 40).max(4);
    let per_room = n_total / 2;
    let n_agents: usize = env_or("TWOSITE_SCALE_AGENTS", 3usize).min(per_room);
    let calm = Duration::from_secs(env_or("TWOSITE_SCALE_CALM_SECS", 60));
    let warmup = Duration::from_secs(env_or("TWOSITE_SCALE_WARMUP_SECS", 10));
    let concurrency: usize = env_or("TWOSITE_SCALE_CONCURRENCY", 8usize).max(1);

    // The audit policy: every request at Metadata level, one event when the answer is complete
    // (and one when a watch starts).
    let audit_dir = tempfile::tempdir().expect("a temp dir for the audit log");
    let policy = audit_dir.path().join("audit-policy.yaml");
    let audit_log = audit_dir.path().join("audit.log");
    std::fs::write(
        &policy,
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [\"RequestReceived\"]\nrules:\n\
         - level: None\n  nonResourceURLs: [\"/healthz*\", \"/readyz*\", \"/livez*\"]\n\
         - level: Metadata\n",
    )
    .expect("write the audit policy");
    let agent_nodes: Vec<String> = (1..=n_agents).map(|i| node_name(1, i)).collect();
    let mut options = Options::default();
    for node in &agent_nodes {
        options.identities.push(Identity::user(
            format!("scale-agent-{node}"),
            &[AGENT_GROUP],
        ));
    }
    options.extra_args.extend([
        format!("--audit-policy-file={}", policy.display()),
        format!("--audit-log-path={}", audit_log.display()),
        "--audit-log-format=json".to_string(),
        "--audit-log-maxsize=0".to_string(),
    ]);

    let cluster: Vec<TestNode> = (0..2)
        .flat_map(|room| {
            (1..=per_room).map(move |i| {
                TestNode::new(&node_name(room, i), ROOMS[room], &node_address(room, i))
            })
        })
        .collect();
    let setup = Setup {
        binaries: &[CONTROLLER_BIN, AGENT_BIN],
        options,
        rbac: &["rbac-controller.yaml", "rbac-agent.yaml"],
        nodes: &[],
    };
    let Some((server, admin)) = common::start(TEST, setup).await else {
        return;
    };
    if std::env::var_os("TWOSITE_KEEP_APISERVER_DIR").is_some() {
        println!("audit log kept in {}", audit_dir.path().display());
        let _ = audit_dir.keep();
    }
    let controller_user =
        Identity::service_account(apiserver::CONTROLLER_SA.0, apiserver::CONTROLLER_SA.1).user;

    // The test's agent users get what the agent's ServiceAccount gets.
    for (kind, doc) in [
        (
            "RoleBinding",
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": { "name": AGENT_GROUP, "namespace": NAMESPACE },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "twosite-agent" },
                "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": AGENT_GROUP }]
            }),
        ),
        (
            "ClusterRoleBinding",
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": { "name": AGENT_GROUP },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "twosite-agent" },
                "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": AGENT_GROUP }]
            }),
        ),
    ] {
        create_doc(&admin, &doc, false)
            .await
            .unwrap_or_else(|e| panic!("create the {kind} of the test's agents: {e}"));
    }

    // Nodes and pods.
    let created = Instant::now();
    let nodes: Api<Node> = Api::all(admin.clone());
    bounded(cluster.clone(), concurrency, {
        let nodes = nodes.clone();
        move |node: TestNode| {
            let nodes = nodes.clone();
            async move { create_node(&nodes, &node).await }
        }
    })
    .await;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": POD_NAMESPACE } }))
                .expect("a Namespace"),
        )
        .await
        .expect("create the pods' namespace");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), POD_NAMESPACE);
    let all_pods: Vec<Pod> = cluster
        .iter()
        .flat_map(|n| (0..PODS_PER_NODE).map(|j| pod(&n.name, &n.zone, j)))
        .collect();
    let n_pods = all_pods.len();
    bounded(all_pods, concurrency, {
        let pods = pods.clone();
        move |p: Pod| {
            let pods = pods.clone();
            async move {
                let name = p.metadata.name.clone().unwrap_or_default();
                pods.create(&PostParams::default(), &p)
                    .await
                    .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
            }
        }
    })
    .await;
    println!(
        "{n_total} nodes and {n_pods} pods created in {:?}",
        created.elapsed()
    );

    // The load: every node's agent (but the real agents') and kubelet.
    let generator = Arc::new(Generator::new(
        &cluster,
        Arc::new(Semaphore::new(concurrency)),
    ));
    let kubelet_generator = Arc::new(Generator::new(&cluster, Arc::clone(&generator.permits)));
    let agent_leases: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);
    let load_started_ms = now_ms();
    let agent_load = run_generator(
        Arc::clone(&generator),
        agent_leases.clone(),
        LeaseKind::Agent,
        AGENT_PERIOD,
        agent_nodes.iter().cloned().collect(),
    );
    let kubelet_load = run_generator(
        Arc::clone(&kubelet_generator),
        Api::namespaced(admin.clone(), "kube-node-lease"),
        LeaseKind::Kubelet,
        KUBELET_PERIOD,
        BTreeSet::new(),
    );
    // One round of renewals before the controller starts.
    tokio::time::sleep(AGENT_PERIOD + Duration::from_millis(500)).await;

    // The controller and the real agents.
    let admin_port = apiserver::free_port().expect("a free port");
    let peer_port = apiserver::free_port().expect("a free port");
    let controller_started = Instant::now();
    let mut controller = Process::controller(&server, "scale-controller", admin_port);
    let controller_pid = controller.child.id();
    let mut agents: Vec<Process> = Vec::new();
    for node in &agent_nodes {
        let test_node = cluster
            .iter()
            .find(|n| &n.name == node)
            .expect("an agent's node");
        let kubeconfig = server
            .kubeconfig(&format!("scale-agent-{node}"))
            .expect("the test agent's kubeconfig")
            .to_path_buf();
        agents.push(start_agent_with(
            &server,
            test_node,
            &format!("boot-{node}-1"),
            peer_port,
            1,
            AgentOptions {
                kubeconfig: Some(kubeconfig),
                ..AgentOptions::default()
            },
        ));
    }
    let agent_pids: Vec<u32> = agents.iter().map(|a| a.child.id()).collect();
    let control_plane = control_plane_pids(&server);
    let mut watched: Vec<u32> = vec![controller_pid];
    watched.extend(&agent_pids);
    watched.extend(control_plane.iter().map(|(_, p)| *p));
    let (rss, rss_sampler) = RssWatch::start(watched);

    // Ready: every node Healthy in the TwoSite status, every pair made, the agents renewing.
    let twosites = twosites(&admin);
    let ready_deadline = Duration::from_secs(60 + n_total as u64 / 5);
    loop {
        assert_all_running(&mut controller, &mut agents);
        let status = match twosites.get_opt("default").await {
            Ok(Some(ts)) => ts.data["status"].clone(),
            _ => Value::Null,
        };
        let healthy = status["nodes"].as_array().map_or(0, |ns| {
            ns.iter().filter(|n| n["phase"] == "Healthy").count()
        });
        let mut agents_ok = 0;
        for node in &agent_nodes {
            if let Ok(Some(l)) = agent_leases.get_opt(&format!("twosite-agent-{node}")).await {
                let a = l.metadata.annotations.unwrap_or_default();
                if a.get("twosite.dev/right-to-run").map(String::as_str) == Some("Lease") {
                    agents_ok += 1;
                }
            }
        }
        if healthy == n_total && status["pairCount"] == per_room && agents_ok == n_agents {
            break;
        }
        if controller_started.elapsed() > ready_deadline {
            let msg = format!(
                "not ready within {ready_deadline:?}: {healthy}/{n_total} nodes Healthy, pairCount {}, \
                 {agents_ok}/{n_agents} agents with the right to run",
                status["pairCount"]
            );
            fail_with_logs(&msg, &controller, &server, &agents).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let time_to_ready = controller_started.elapsed();
    println!("controller ready, all {n_total} nodes Healthy after {time_to_ready:?}");
    tokio::time::sleep(warmup).await;

    // The calm window.
    let calm_from_ms = now_ms();
    let calm_t = Instant::now();
    let s_ctrl0 = sample(controller_pid).expect("the controller's /proc");
    let s_agents0: Vec<ProcSample> = agent_pids
        .iter()
        .map(|p| sample(*p).expect("an agent's /proc"))
        .collect();
    let s_cp0: Vec<ProcSample> = control_plane
        .iter()
        .map(|(_, p)| sample(*p).unwrap_or_default())
        .collect();
    let s_self0 = sample(std::process::id()).unwrap_or_default();
    rss.take(controller_pid);
    tokio::time::sleep(calm).await;
    assert_all_running(&mut controller, &mut agents);
    let calm_secs = calm_t.elapsed().as_secs_f64();
    let calm_to_ms = now_ms();
    let s_ctrl1 = sample(controller_pid).expect("the controller's /proc");
    let s_agents1: Vec<ProcSample> = agent_pids
        .iter()
        .map(|p| sample(*p).expect("an agent's /proc"))
        .collect();
    let s_cp1: Vec<ProcSample> = control_plane
        .iter()
        .map(|(_, p)| sample(*p).unwrap_or_default())
        .collect();
    let s_self1 = sample(std::process::id()).unwrap_or_default();
    let calm_peak_kib = rss.take(controller_pid).max(s_ctrl1.rss_kib);

    // Room A loses power.
    let lost: Vec<String> = (1..=per_room).map(|i| node_name(0, i)).collect();
    let stop_ms = now_ms();
    let stop_t = Instant::now();
    generator.alive[0].store(false, Ordering::Relaxed);
    kubelet_generator.alive[0].store(false, Ordering::Relaxed);
    let room_a_releasable = format!("{ROOM_LABEL}={},{RELEASABLE_LABEL}=true", ROOMS[0]);
    let release_deadline = Duration::from_secs(90 + n_total as u64 / 4);
    let mut tainted_at: Option<Duration> = None;
    loop {
        assert_all_running(&mut controller, &mut agents);
        let room_a = room_nodes(&nodes, ROOMS[0]).await.unwrap_or_default();
        let tainted = room_a
            .iter()
            .filter(|n| has_taint(n, OUT_OF_SERVICE))
            .count();
        if tainted == per_room && tainted_at.is_none() {
            tainted_at = Some(stop_t.elapsed());
        }
        let left = count_pods(&pods, &room_a_releasable).await;
        if tainted == per_room && left == Ok(0) {
            break;
        }
        if stop_t.elapsed() > release_deadline {
            let msg = format!(
                "room A not released within {release_deadline:?}: {tainted}/{per_room} nodes tainted, \
                 releasable pods left {left:?}"
            );
            fail_with_logs(&msg, &controller, &server, &agents).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let released_poll = stop_t.elapsed();
    let released_ms = now_ms();
    let s_ctrl2 = sample(controller_pid).expect("the controller's /proc");
    let s_cp2: Vec<ProcSample> = control_plane
        .iter()
        .map(|(_, p)| sample(*p).unwrap_or_default())
        .collect();
    let failover_peak_kib = rss.take(controller_pid).max(s_ctrl2.rss_kib);
    println!("room A released {released_poll:?} after it lost power");

    // A little longer: nothing more may happen to room B, and the controller settles.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_all_running(&mut controller, &mut agents);
    let metrics = http_get(admin_port, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    let s_ctrl_end = sample(controller_pid).expect("the controller's /proc");
    let s_agents_end: Vec<ProcSample> = agent_pids
        .iter()
        .map(|p| sample(*p).unwrap_or_default())
        .collect();
    let end_ms = now_ms();
    generator.stop.store(true, Ordering::Relaxed);
    kubelet_generator.stop.store(true, Ordering::Relaxed);

    // Correctness. Room A: fenced, tainted, released; its DaemonSet pods kept.
    for node in room_nodes(&nodes, ROOMS[0]).await.expect("list room A") {
        let name = node.metadata.name.clone().unwrap_or_default();
        assert!(has_taint(&node, OUT_OF_SERVICE), "{name} not tainted");
        assert!(
            has_annotation(&node.metadata, FENCED_BOOT),
            "{name} carries no fenced boot ID"
        );
        let lease = agent_leases
            .get(&format!("twosite-agent-{name}"))
            .await
            .expect("a lost node's Lease");
        assert!(
            has_annotation(&lease.metadata, FENCED_BOOT),
            "{name}'s Lease carries no fence marker"
        );
    }
    assert_eq!(
        count_pods(
            &pods,
            &format!("{ROOM_LABEL}={},{RELEASABLE_LABEL}=false", ROOMS[0])
        )
        .await,
        Ok(per_room),
        "room A's DaemonSet pods are left alone"
    );
    // Room B: untouched.
    for node in room_nodes(&nodes, ROOMS[1]).await.expect("list room B") {
        let name = node.metadata.name.clone().unwrap_or_default();
        assert!(
            !has_taint(&node, OUT_OF_SERVICE) && !has_taint(&node, UNRESPONSIVE),
            "{name} of the healthy room was tainted"
        );
        assert!(!has_annotation(&node.metadata, FENCED_BOOT), "{name}");
        let lease = agent_leases
            .get(&format!("twosite-agent-{name}"))
            .await
            .expect("a healthy node's Lease");
        assert!(
            !has_annotation(&lease.metadata, FENCED_BOOT),
            "{name} of the healthy room was fenced"
        );
    }
    assert_eq!(
        count_pods(&pods, &format!("{ROOM_LABEL}={}", ROOMS[1])).await,
        Ok(per_room * PODS_PER_NODE),
        "every pod of room B is still there"
    );
    let audit = read_audit(&audit_log);
    assert!(!audit.is_empty(), "the audit log is empty");
    let writes = ["create", "update", "patch", "delete", "deletecollection"];
    let touched_b: Vec<&Request> = audit
        .iter()
        .filter(|r| r.user == controller_user && writes.contains(&r.verb.as_str()))
        .filter(|r| {
            let node = match r.resource.as_str() {
                "nodes" | "nodes/status" => Some(r.name.as_str()),
                "leases" => r.name.strip_prefix("twosite-agent-"),
                "pods" | "pods/eviction" if r.namespace == POD_NAMESPACE => pod_node(&r.name),
                _ => None,
            };
            node.and_then(parse_node).is_some_and(|(room, _)| room == 1)
        })
        .collect();
    assert!(
        touched_b.is_empty(),
        "the controller wrote objects of the healthy room: {touched_b:?}"
    );
    for p in std::iter::once(&controller).chain(agents.iter()) {
        let forbidden = p.forbidden_lines();
        assert!(
            forbidden.is_empty(),
            "the API server refused {}:\n{}",
            p.name,
            forbidden.join("\n")
        );
    }

    // ----- Figures -----
    let ctrl = |from: i64, to: i64| requests_of(&audit, &controller_user, from, to);
    let calm_requests = ctrl(calm_from_ms, calm_to_ms).count();
    let calm_rate = calm_requests as f64 * 1000.0 / (calm_to_ms - calm_from_ms) as f64;
    let calm_breakdown = by_verb(ctrl(calm_from_ms, calm_to_ms));
    let failover_requests = ctrl(stop_ms, released_ms).count();
    let failover_secs = (released_ms - stop_ms) as f64 / 1000.0;
    let failover_breakdown = by_verb(ctrl(stop_ms, released_ms));
    let failover_extra = failover_requests as f64 - calm_rate * failover_secs;
    let after_breakdown = by_verb(ctrl(released_ms, end_ms));
    let lists_total = audit
        .iter()
        .filter(|r| r.user == controller_user && r.verb == "list")
        .count();
    let startup_breakdown = by_verb(ctrl(0, calm_from_ms));
    let calm_lists = by_uri(ctrl(calm_from_ms, calm_to_ms));
    let failover_lists = by_uri(ctrl(stop_ms, released_ms));

    // The fence commits: the controller's first write of each lost node's heartbeat Lease; the
    // last renewal before it: the last completed renewal of that Lease by the test.
    let mut commits: Vec<(String, i64, i64, u16)> = Vec::new(); // node, received, done, code
    let mut decisions_outside: Vec<f64> = Vec::new();
    // (commit received, outside latency) of every lost node, for the batches below.
    let mut commit_latency: Vec<(i64, f64)> = Vec::new();
    let mut last_release_ms = 0i64;
    let mut first_taint_ms = i64::MAX;
    let mut last_taint_ms = 0i64;
    for node in &lost {
        let lease_name = format!("twosite-agent-{node}");
        let commit = audit.iter().find(|r| {
            r.user == controller_user
                && r.resource == "leases"
                && r.name == lease_name
                && (r.verb == "patch" || r.verb == "update")
                && r.received_ms >= stop_ms
        });
        let last_renewal = audit
            .iter()
            .filter(|r| {
                r.user == apiserver::ADMIN_USER
                    && r.resource == "leases"
                    && r.name == lease_name
                    && r.verb == "update"
                    && r.code == 200
            })
            .map(|r| r.done_ms)
            .max();
        if let Some(c) = commit {
            commits.push((node.clone(), c.received_ms, c.done_ms, c.code));
            if let Some(renewed) = last_renewal {
                let latency = (c.received_ms - renewed - FENCE_DEADLINE_MS) as f64;
                decisions_outside.push(latency);
                commit_latency.push((c.received_ms, latency));
            }
        }
        for r in audit.iter().filter(|r| {
            r.user == controller_user && r.received_ms >= stop_ms && r.received_ms <= end_ms
        }) {
            if r.verb == "delete" && r.resource == "pods" && pod_node(&r.name) == Some(node) {
                last_release_ms = last_release_ms.max(r.done_ms);
            }
            if r.verb == "patch" && r.resource == "nodes" && &r.name == node {
                first_taint_ms = first_taint_ms.min(r.received_ms);
                last_taint_ms = last_taint_ms.max(r.done_ms);
            }
        }
    }
    assert_eq!(
        commits.len(),
        per_room,
        "a fence commit (the controller's write of the heartbeat Lease) for every lost node"
    );
    let commit_first = commits.iter().map(|c| c.1).min().unwrap_or(0);
    let commit_last = commits.iter().map(|c| c.2).max().unwrap_or(0);
    let commit_rtt: Vec<f64> = commits.iter().map(|c| (c.2 - c.1) as f64).collect();
    let last_renewal_a = audit
        .iter()
        .filter(|r| {
            r.user == apiserver::ADMIN_USER
                && r.resource == "leases"
                && r.name.starts_with("twosite-agent-a-")
                && r.verb == "update"
        })
        .map(|r| r.done_ms)
        .max()
        .unwrap_or(stop_ms);
    // The fence commits come in batches (one per remediation pass): commits less than 300 ms
    // apart are one batch. A batch's latency says what the nodes waited for.
    commit_latency.sort_by_key(|c| c.0);
    let mut batches: Vec<Vec<(i64, f64)>> = Vec::new();
    for c in &commit_latency {
        match batches.last_mut() {
            Some(b) if c.0 - b.last().map_or(0, |l| l.0) <= 300 => b.push(*c),
            _ => batches.push(vec![*c]),
        }
    }
    let batches: Vec<Value> = batches
        .iter()
        .map(|b| {
            let lat: Vec<f64> = b.iter().map(|c| c.1).collect();
            json!({
                "commits": b.len(),
                "from_s": (b[0].0 - stop_ms) as f64 / 1000.0,
                "to_s": (b[b.len() - 1].0 - stop_ms) as f64 / 1000.0,
                "outside_latency_min_ms": percentile(&lat, 0.0),
                "outside_latency_max_ms": percentile(&lat, 1.0),
            })
        })
        .collect();
    let decision_metric = histogram(&metrics, "twosite_fence_decision_seconds").map(
        |Histogram {
             buckets,
             sum,
             count,
         }| {
            (
                histogram_quantile(&buckets, 0.5).map(|s| s * 1000.0),
                histogram_quantile(&buckets, 0.99).map(|s| s * 1000.0),
                if count > 0.0 {
                    sum / count * 1000.0
                } else {
                    f64::NAN
                },
                count,
            )
        },
    );

    // The load's own health: renewal latency (due → answer) and the longest gap between two
    // completed renewals of a node of room B (the controller counts a partner clear only while
    // its renewals arrive at most 3 s apart).
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

    // The agents.
    let agent_window_secs = calm_secs;
    let mut agent_figures = Vec::new();
    for (k, node) in agent_nodes.iter().enumerate() {
        let user = format!("scale-agent-{node}");
        let reqs: Vec<&Request> = requests_of(&audit, &user, calm_from_ms, calm_to_ms).collect();
        let rate = reqs.len() as f64 * 1000.0 / (calm_to_ms - calm_from_ms) as f64;
        let breakdown = by_verb(reqs.into_iter());
        let all_reqs = requests_of(&audit, &user, 0, i64::MAX).count();
        agent_figures.push(json!({
            "node": node,
            "rss_mib": mib(s_agents1[k].rss_kib),
            "peak_rss_mib": mib(s_agents_end[k].hwm_kib),
            "cpu_percent": cpu_percent(&s_agents0[k], &s_agents1[k], agent_window_secs),
            "requests_per_s": rate,
            "requests_total": all_reqs,
            "calm_requests": breakdown,
        }));
    }

    let binary = common::binary("twosite");
    let build = if binary.display().to_string().contains("/release/") {
        "release"
    } else {
        "debug"
    };
    let cp: Vec<Value> = control_plane
        .iter()
        .enumerate()
        .map(|(k, (name, pid))| {
            json!({
                "process": name,
                "calm_cpu_percent": cpu_percent(&s_cp0[k], &s_cp1[k], calm_secs),
                "failover_cpu_percent": cpu_percent(&s_cp1[k], &s_cp2[k], failover_secs),
                "peak_rss_mib": mib(sample(*pid).map(|s| s.hwm_kib).unwrap_or(0)),
            })
        })
        .collect();
    let figures = json!({
        "nodes": n_total,
        "pods": n_pods,
        "agents": n_agents,
        "controller_binary": binary.display().to_string(),
        "build": build,
        "time_to_ready_s": time_to_ready.as_secs_f64(),
        "calm_window_s": calm_secs,
        "controller": {
            "calm_rss_mib": mib(s_ctrl1.rss_kib),
            "calm_peak_rss_mib": mib(calm_peak_kib),
            "failover_peak_rss_mib": mib(failover_peak_kib),
            "lifetime_peak_rss_mib": mib(s_ctrl_end.hwm_kib),
            "calm_cpu_percent": cpu_percent(&s_ctrl0, &s_ctrl1, calm_secs),
            "calm_cpu_ms_per_s": 1000.0 * (s_ctrl1.cpu_s - s_ctrl0.cpu_s) / calm_secs,
            "failover_cpu_percent": cpu_percent(&s_ctrl1, &s_ctrl2, failover_secs),
            "startup_cpu_s": s_ctrl0.cpu_s,
            "calm_requests_per_s": calm_rate,
            "calm_requests": calm_breakdown,
            "calm_lists_and_watches": calm_lists,
            "startup_requests": startup_breakdown,
            "lists_total": lists_total,
        },
        "failover": {
            "lost_nodes": per_room,
            "time_to_release_s": failover_secs,
            "time_to_all_tainted_s": tainted_at.map(|d| d.as_secs_f64()),
            "last_renewal_of_room_a_after_stop_ms": last_renewal_a - stop_ms,
            "first_fence_commit_after_stop_s": (commit_first - stop_ms) as f64 / 1000.0,
            "fence_commit_spread_ms": commit_last - commit_first,
            "fence_commit_batches": batches,
            "fence_commit_request_ms_p50": percentile(&commit_rtt, 0.5),
            "fence_commit_request_ms_max": percentile(&commit_rtt, 1.0),
            "first_node_patch_after_stop_s": (first_taint_ms - stop_ms) as f64 / 1000.0,
            "last_node_patch_after_stop_s": (last_taint_ms - stop_ms) as f64 / 1000.0,
            "last_pod_delete_after_stop_s": (last_release_ms - stop_ms) as f64 / 1000.0,
            "requests": failover_requests,
            "requests_above_calm_rate": failover_extra,
            "requests_per_lost_node": failover_requests as f64 / per_room as f64,
            "requests_above_calm_per_lost_node": failover_extra / per_room as f64,
            "request_breakdown": failover_breakdown,
            "lists_and_watches": failover_lists,
            "after_release_5s_requests": after_breakdown,
        },
        "decision_latency": {
            "metric": decision_metric.map(|(p50, p99, mean, count)| json!({
                "p50_ms": p50, "p99_ms": p99, "mean_ms": mean, "count": count,
            })),
            "outside_upper_bound_ms": {
                "p50": percentile(&decisions_outside, 0.5),
                "p99": percentile(&decisions_outside, 0.99),
                "min": percentile(&decisions_outside, 0.0),
                "max": percentile(&decisions_outside, 1.0),
            },
        },
        "load": {
            "renewals_per_s": renew_rate,
            "agent_renewal_latency_calm_ms": { "p50": percentile(&calm_lat, 0.5), "p99": percentile(&calm_lat, 0.99), "max": percentile(&calm_lat, 1.0) },
            "agent_renewal_latency_failover_ms": { "p50": percentile(&failover_lat, 0.5), "p99": percentile(&failover_lat, 0.99), "max": percentile(&failover_lat, 1.0) },
            "room_b_max_gap_between_renewals_ms": max_gap_b,
            "failed_renewals": failed,
            "conflicts": conflicts,
            "test_process_cpu_percent": cpu_percent(&s_self0, &s_self1, calm_secs),
            "load_started_before_calm_s": (calm_from_ms - load_started_ms) as f64 / 1000.0,
        },
        "control_plane": cp,
        "agent_processes": agent_figures,
        "audit_requests_total": audit.len(),
    });

    let c = &figures["controller"];
    let f = &figures["failover"];
    let d = &figures["decision_latency"];
    let l = &figures["load"];
    let mut block = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        block,
        "=== apiserver_scale: {n_total} nodes, {n_pods} pods, kube-apiserver {}, {build} twosite ===",
        apiserver::KUBE_VERSION
    );
    let _ = writeln!(
        block,
        "controller ready (all nodes Healthy) {:.1} s after start; calm window {calm_secs:.0} s",
        time_to_ready.as_secs_f64()
    );
    let _ = writeln!(
        block,
        "controller RSS: calm {:.1} MiB (peak {:.1}), failover peak {:.1}, lifetime peak (VmHWM) {:.1} MiB",
        c["calm_rss_mib"].as_f64().unwrap_or(0.0),
        c["calm_peak_rss_mib"].as_f64().unwrap_or(0.0),
        c["failover_peak_rss_mib"].as_f64().unwrap_or(0.0),
        c["lifetime_peak_rss_mib"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(
        block,
        "controller CPU: calm {:.2} % of a core ({:.1} ms per s), failover {:.2} %, start-up {:.2} s",
        c["calm_cpu_percent"].as_f64().unwrap_or(0.0),
        c["calm_cpu_ms_per_s"].as_f64().unwrap_or(0.0),
        c["failover_cpu_percent"].as_f64().unwrap_or(0.0),
        s_ctrl0.cpu_s
    );
    let _ = writeln!(
        block,
        "controller requests, calm: {calm_rate:.2}/s ({})",
        show_counts(&calm_breakdown)
    );
    let _ = writeln!(
        block,
        "controller LISTs and WATCHes, calm: {}",
        show_counts(&calm_lists)
    );
    let _ = writeln!(
        block,
        "controller requests before the calm window: {}",
        show_counts(&startup_breakdown)
    );
    let _ = writeln!(
        block,
        "failover of {per_room} nodes: released {failover_secs:.2} s after the power loss \
         (all tainted {:.2} s, first fence commit {:.2} s, commits spread over {} ms, last pod deletion {:.2} s)",
        f["time_to_all_tainted_s"].as_f64().unwrap_or(f64::NAN),
        f["first_fence_commit_after_stop_s"]
            .as_f64()
            .unwrap_or(f64::NAN),
        commit_last - commit_first,
        f["last_pod_delete_after_stop_s"]
            .as_f64()
            .unwrap_or(f64::NAN),
    );
    let _ = writeln!(
        block,
        "failover requests: {failover_requests} ({:.1} per lost node; {:.1} per lost node above the calm rate): {}",
        failover_requests as f64 / per_room as f64,
        failover_extra / per_room as f64,
        show_counts(&failover_breakdown)
    );
    for b in &batches {
        let _ = writeln!(
            block,
            "  fence commit batch: {} commits {:.2}-{:.2} s after the power loss, outside latency {:.0}..{:.0} ms",
            b["commits"],
            b["from_s"].as_f64().unwrap_or(f64::NAN),
            b["to_s"].as_f64().unwrap_or(f64::NAN),
            b["outside_latency_min_ms"].as_f64().unwrap_or(f64::NAN),
            b["outside_latency_max_ms"].as_f64().unwrap_or(f64::NAN),
        );
    }
    let _ = writeln!(
        block,
        "after the release (5 s): {}",
        show_counts(&after_breakdown)
    );
    match &decision_metric {
        Some((p50, p99, mean, count)) => {
            let _ = writeln!(
                block,
                "decision latency (twosite_fence_decision_seconds, {count} fences): p50 {} ms, p99 {} ms, mean {mean:.2} ms",
                p50.map_or("n/a".into(), |v| format!("{v:.2}")),
                p99.map_or("n/a".into(), |v| format!("{v:.2}")),
            );
        }
        None => {
            let _ = writeln!(
                block,
                "decision latency: the controller exposes no twosite_fence_decision_seconds"
            );
        }
    }
    let _ = writeln!(
        block,
        "decision latency, outside upper bound (commit arrival - last renewal - {FENCE_DEADLINE_MS} ms): \
         p50 {:.0} ms, p99 {:.0} ms, min {:.0}, max {:.0}",
        d["outside_upper_bound_ms"]["p50"]
            .as_f64()
            .unwrap_or(f64::NAN),
        d["outside_upper_bound_ms"]["p99"]
            .as_f64()
            .unwrap_or(f64::NAN),
        d["outside_upper_bound_ms"]["min"]
            .as_f64()
            .unwrap_or(f64::NAN),
        d["outside_upper_bound_ms"]["max"]
            .as_f64()
            .unwrap_or(f64::NAN),
    );
    let _ = writeln!(
        block,
        "load: {renew_rate:.1} renewals/s; agent renewal due->answer calm p50 {:.0} / p99 {:.0} / max {:.0} ms, \
         failover p99 {:.0} ms; room B's longest gap {max_gap_b} ms; {failed} failed, {conflicts} conflicts; \
         test process {:.1} % CPU",
        l["agent_renewal_latency_calm_ms"]["p50"]
            .as_f64()
            .unwrap_or(f64::NAN),
        l["agent_renewal_latency_calm_ms"]["p99"]
            .as_f64()
            .unwrap_or(f64::NAN),
        l["agent_renewal_latency_calm_ms"]["max"]
            .as_f64()
            .unwrap_or(f64::NAN),
        l["agent_renewal_latency_failover_ms"]["p99"]
            .as_f64()
            .unwrap_or(f64::NAN),
        l["test_process_cpu_percent"].as_f64().unwrap_or(f64::NAN),
    );
    for p in &cp {
        let _ = writeln!(
            block,
            "{}: calm {:.1} % CPU, failover {:.1} %, peak RSS {:.0} MiB",
            p["process"].as_str().unwrap_or_default(),
            p["calm_cpu_percent"].as_f64().unwrap_or(0.0),
            p["failover_cpu_percent"].as_f64().unwrap_or(0.0),
            p["peak_rss_mib"].as_f64().unwrap_or(0.0),
        );
    }
    for a in &agent_figures {
        let _ = writeln!(
            block,
            "agent {}: RSS {:.1} MiB (VmHWM {:.1}), CPU {:.2} % of a core, {:.2} requests/s ({})",
            a["node"].as_str().unwrap_or_default(),
            a["rss_mib"].as_f64().unwrap_or(0.0),
            a["peak_rss_mib"].as_f64().unwrap_or(0.0),
            a["cpu_percent"].as_f64().unwrap_or(0.0),
            a["requests_per_s"].as_f64().unwrap_or(0.0),
            a["calm_requests"]
                .as_object()
                .map(|m| m
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
        );
    }
    println!("{block}");
    println!("SCALE_JSON {figures}");

    agent_load.abort();
    kubelet_load.abort();
    rss_sampler.abort();
    drop(agents);
    drop(controller);
    drop(server);
    println!("{TEST} passed in {:?}", t0.elapsed());
}
