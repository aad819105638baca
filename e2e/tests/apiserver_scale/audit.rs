//! The API server's audit log as `apiserver_scale` reads it: its requests, counted by user, verb,
//! resource and URI; the controller's requests in each window of the run and its fence commits.

use crate::cluster::pod_node;
use crate::stats::percentile;
use crate::{FENCE_DEADLINE_MS, Timeline};
use e2e::apiserver;
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

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
pub struct Request {
    pub received_ms: i64,
    pub done_ms: i64,
    pub user: String,
    pub verb: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub code: u16,
    /// The path and the selectors of the query (no resourceVersion, limit or timeouts).
    pub uri: String,
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

pub fn read_audit(path: &Path) -> Vec<Request> {
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
pub fn requests_of<'a>(
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
pub fn by_verb<'a>(requests: impl Iterator<Item = &'a Request>) -> BTreeMap<String, usize> {
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

pub fn show_counts(counts: &BTreeMap<String, usize>) -> String {
    let mut v: Vec<_> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The controller's requests in each window of the run.
pub struct ControllerRequests {
    pub calm_rate: f64,
    pub calm_breakdown: BTreeMap<String, usize>,
    pub failover_requests: usize,
    pub failover_secs: f64,
    pub failover_breakdown: BTreeMap<String, usize>,
    pub failover_extra: f64,
    pub after_breakdown: BTreeMap<String, usize>,
    pub lists_total: usize,
    pub startup_breakdown: BTreeMap<String, usize>,
    pub calm_lists: BTreeMap<String, usize>,
    pub failover_lists: BTreeMap<String, usize>,
}

pub fn controller_requests(
    audit: &[Request],
    controller_user: &str,
    timeline: &Timeline,
) -> ControllerRequests {
    let Timeline {
        calm_from_ms,
        calm_to_ms,
        stop_ms,
        released_ms,
        end_ms,
        ..
    } = *timeline;
    let ctrl = |from: i64, to: i64| requests_of(audit, controller_user, from, to);
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
    ControllerRequests {
        calm_rate,
        calm_breakdown,
        failover_requests,
        failover_secs,
        failover_breakdown,
        failover_extra,
        after_breakdown,
        lists_total,
        startup_breakdown,
        calm_lists,
        failover_lists,
    }
}

/// The fence commits of the lost nodes and the controller's writes around them.
pub struct FenceCommits {
    pub decisions_outside: Vec<f64>,
    pub last_release_ms: i64,
    pub first_taint_ms: i64,
    pub last_taint_ms: i64,
    pub commit_first: i64,
    pub commit_last: i64,
    pub commit_rtt: Vec<f64>,
    pub last_renewal_a: i64,
    pub batches: Vec<Value>,
}

/// Asserts a fence commit for every lost node.
pub fn fence_commits(
    audit: &[Request],
    controller_user: &str,
    lost: &[String],
    per_room: usize,
    timeline: &Timeline,
) -> FenceCommits {
    let Timeline {
        stop_ms, end_ms, ..
    } = *timeline;
    // The fence commits: the controller's first write of each lost node's heartbeat Lease; the
    // last renewal before it: the last completed renewal of that Lease by the test.
    let mut commits: Vec<(String, i64, i64, u16)> = Vec::new(); // node, received, done, code
    let mut decisions_outside: Vec<f64> = Vec::new();
    // (commit received, outside latency) of every lost node, for the batches below.
    let mut commit_latency: Vec<(i64, f64)> = Vec::new();
    let mut last_release_ms = 0i64;
    let mut first_taint_ms = i64::MAX;
    let mut last_taint_ms = 0i64;
    for node in lost {
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
    FenceCommits {
        decisions_outside,
        last_release_ms,
        first_taint_ms,
        last_taint_ms,
        commit_first,
        commit_last,
        commit_rtt,
        last_renewal_a,
        batches,
    }
}
