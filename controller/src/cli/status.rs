//! `twosite status [--json]`: the cluster as the controller sees it (rooms, pairs, node phases,
//! witness, leader: the `TwoSite` `default` status) and every protected volume (each Lease
//! labelled `twosite.dev/volume`, with its holder, epoch, last switch, a switchover or handover
//! under way, and its consumer pods).
//!
//! The IO only reads; [`report`] assembles the report from the objects read and [`render`]
//! prints it, both pure.

use super::{CliError, REQUEST_TIMEOUT, client, pod_facts};
use crate::crd::{DEFAULT_NAME, RoomSource, TwoSite, TwoSiteStatus};
use crate::error::with_timeout;
use crate::guard::lease_io::to_volume_lease;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use node_health::volume::switchover::{PodFacts, VOLUME_LABEL};
use serde::Serialize;
use std::fmt::Write as _;
use std::process::ExitCode;

pub const NO_STATUS: &str = "controller has not written a status yet";

/// Show the rooms, pairs, nodes, witness, leader and every protected volume.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// Print one JSON object (for scripts) instead of the text report.
    #[arg(long)]
    pub json: bool,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// The `TwoSite` `default` status, when the controller has written one.
    pub cluster: Option<TwoSiteStatus>,
    /// Why `cluster` is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_note: Option<String>,
    pub volumes: Vec<VolumeReport>,
    /// Launcher pods of opted-in VMs that wait at the scheduling gate, read from the API server
    /// itself (so they show even while the controller is down).
    pub gated_pods: Vec<GatedPod>,
}

/// A launcher pod at the gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatedPod {
    pub namespace: String,
    pub name: String,
    pub vm: Option<String>,
    /// Seconds since the pod was created.
    pub waiting_seconds: Option<i64>,
}

/// The gated pods among `pods` (those labelled `twosite.dev/ha=true`).
pub fn gated_pods(pods: &[Pod], now: jiff::Timestamp) -> Vec<GatedPod> {
    let mut out: Vec<GatedPod> = pods
        .iter()
        .filter(crate::vm::types::has_gate)
        .map(|p| GatedPod {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
            vm: crate::vm::types::launcher_vm(p).map(str::to_string),
            waiting_seconds: p
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| now.as_second() - t.0.as_second()),
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// A consumer as the report names it: its identity and, when a consumer pod has that UID, the
/// pod and its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerRef {
    pub identity: String,
    pub pod: Option<String>,
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HandoverReport {
    pub to: ConsumerRef,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerReport {
    pub pod: String,
    pub uid: String,
    pub node: Option<String>,
    pub phase: Option<String>,
    pub holder: bool,
}

/// One protected volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeReport {
    pub namespace: String,
    pub name: String,
    /// `None`: released (or never taken).
    pub holder: Option<ConsumerRef>,
    pub epoch: u64,
    /// `acquireTime`: when the current holder took the lease (RFC 3339).
    pub last_switch: Option<String>,
    pub last_switch_seconds_ago: Option<i64>,
    /// The target of a planned switchover under way.
    pub preferred_holder: Option<ConsumerRef>,
    /// The controller's handover after a fence.
    pub handover: Option<HandoverReport>,
    pub consumers: Vec<ConsumerReport>,
    /// What looks wrong (a malformed annotation, a holder that is no consumer).
    pub problems: Vec<String>,
}

pub fn main(args: StatusArgs) -> ExitCode {
    super::run(|| status(args))
}

async fn status(args: StatusArgs) -> Result<(), CliError> {
    let client = client().await?;
    let twosites: Api<TwoSite> = Api::all(client.clone());
    let cluster = match with_timeout(
        "get the TwoSite",
        REQUEST_TIMEOUT,
        twosites.get_opt(DEFAULT_NAME),
    )
    .await
    {
        Ok(t) => Ok(t.and_then(|t| t.status)),
        Err(e) => {
            tracing::warn!(error = %crate::error::report(&e), "could not read the TwoSite");
            Err(crate::error::report(&e))
        }
    };
    let by_label = ListParams::default().labels(VOLUME_LABEL);
    let leases: Api<Lease> = Api::all(client.clone());
    let leases = with_timeout(
        "list the volume Leases",
        REQUEST_TIMEOUT,
        leases.list(&by_label),
    )
    .await?;
    let pods: Api<Pod> = Api::all(client);
    let launchers = with_timeout(
        "list the launcher pods of opted-in VMs",
        REQUEST_TIMEOUT,
        pods.list(&ListParams::default().labels(&format!("{}=true", node_health::vm::HA_LABEL))),
    )
    .await?;
    let pods = with_timeout(
        "list the consumer pods",
        REQUEST_TIMEOUT,
        pods.list(&by_label),
    )
    .await?;
    let now = jiff::Timestamp::now();
    let mut r = report(cluster, &leases.items, &pods.items, now);
    r.gated_pods = gated_pods(&launchers.items, now);
    if args.json {
        let text = serde_json::to_string_pretty(&r).map_err(CliError::Json)?;
        println!("{text}");
    } else {
        print!("{}", render(&r));
    }
    Ok(())
}

fn consumer_ref(identity: &str, consumers: &[PodFacts]) -> ConsumerRef {
    let pod = consumers.iter().find(|p| p.uid == identity);
    ConsumerRef {
        identity: identity.to_string(),
        pod: pod.map(|p| p.name.clone()),
        node: pod.and_then(|p| p.node.clone()),
    }
}

fn volume_report(lease: &Lease, pods: &[(String, PodFacts)], now: jiff::Timestamp) -> VolumeReport {
    let namespace = lease.metadata.namespace.clone().unwrap_or_default();
    let name = lease.metadata.name.clone().unwrap_or_default();
    let mut consumers: Vec<PodFacts> = pods
        .iter()
        .filter(|(ns, p)| *ns == namespace && p.volume.as_deref() == Some(name.as_str()))
        .map(|(_, p)| p.clone())
        .collect();
    consumers.sort_by(|a, b| a.name.cmp(&b.name));
    let spec = lease.spec.clone().unwrap_or_default();
    let mut problems = Vec::new();
    let (holder, epoch, preferred, handover) = match to_volume_lease(lease) {
        Ok(v) => (
            v.holder().map(str::to_string),
            v.epoch,
            v.preferred_holder.clone(),
            v.handover.clone(),
        ),
        Err(e) => {
            problems.push(e.to_string());
            (
                spec.holder_identity.clone().filter(|h| !h.is_empty()),
                u64::try_from(spec.lease_transitions.unwrap_or(0)).unwrap_or(0),
                None,
                None,
            )
        }
    };
    if let Some(h) = holder.as_deref()
        && !consumers.iter().any(|p| p.uid == h)
    {
        problems.push(format!(
            "the holder {h} is no consumer pod of this volume (none labelled {VOLUME_LABEL}={name} has that UID)"
        ));
    }
    let acquired = spec.acquire_time.map(|t| t.0).filter(|_| holder.is_some());
    VolumeReport {
        holder: holder.as_deref().map(|h| consumer_ref(h, &consumers)),
        epoch,
        last_switch: acquired.map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
        last_switch_seconds_ago: acquired.map(|t| (now.as_second() - t.as_second()).max(0)),
        preferred_holder: preferred.as_deref().map(|p| consumer_ref(p, &consumers)),
        handover: handover.map(|h| HandoverReport {
            to: consumer_ref(&h.to, &consumers),
            epoch: h.epoch,
        }),
        consumers: consumers
            .iter()
            .map(|p| ConsumerReport {
                pod: p.name.clone(),
                uid: p.uid.clone(),
                node: p.node.clone(),
                phase: p.phase.clone(),
                holder: holder.as_deref() == Some(p.uid.as_str()),
            })
            .collect(),
        problems,
        namespace,
        name,
    }
}

/// The report from what was read: the TwoSite status (`Ok(None)`: none yet; `Err`: why it
/// could not be read), the volume Leases and the labelled pods, at `now`.
pub fn report(
    cluster: Result<Option<TwoSiteStatus>, String>,
    leases: &[Lease],
    pods: &[Pod],
    now: jiff::Timestamp,
) -> StatusReport {
    let pods: Vec<(String, PodFacts)> = pods
        .iter()
        .map(|p| {
            (
                p.metadata.namespace.clone().unwrap_or_default(),
                pod_facts(p),
            )
        })
        .collect();
    let mut volumes: Vec<VolumeReport> = leases
        .iter()
        .map(|l| volume_report(l, &pods, now))
        .collect();
    volumes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let (cluster, cluster_note) = match cluster {
        Ok(Some(s)) => (Some(s), None),
        Ok(None) => (None, Some(NO_STATUS.to_string())),
        Err(e) => (
            None,
            Some(format!("could not read the TwoSite {DEFAULT_NAME}: {e}")),
        ),
    };
    StatusReport {
        cluster,
        cluster_note,
        volumes,
        gated_pods: Vec::new(),
    }
}

/// `12s`, `5m 3s`, `2h 4m`, `3d 2h`.
pub fn ago(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// Rows with aligned columns, each line indented; trailing blanks trimmed.
pub fn table(indent: &str, rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = indent.to_string();
        for (c, cell) in row.iter().enumerate() {
            let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|s| s.to_string()).collect()
}

fn or_dash(s: Option<&str>) -> String {
    s.unwrap_or("-").to_string()
}

fn consumer_words(c: &ConsumerRef) -> String {
    match (&c.pod, &c.node) {
        (Some(pod), Some(node)) => format!("{pod} on {node} (uid {})", c.identity),
        (Some(pod), None) => format!("{pod}, not scheduled (uid {})", c.identity),
        _ => format!("{} (no consumer pod has this UID)", c.identity),
    }
}

fn render_cluster(s: &TwoSiteStatus, out: &mut String) {
    let mut fields: Vec<Vec<String>> = Vec::new();
    let rooms = match &s.rooms {
        Some(r) => {
            let source = match r.source {
                RoomSource::Configured => "configured",
                RoomSource::Automatic => "automatic",
            };
            format!("{} and {} ({source})", r.a, r.b)
        }
        None => "not resolved".to_string(),
    };
    fields.push(row(&["Rooms:", &rooms]));
    let leader = match &s.leader {
        Some(l) => format!("{} (epoch {})", l.identity, l.epoch),
        None => "none".to_string(),
    };
    fields.push(row(&["Leader:", &leader]));
    let witness = match &s.witness {
        None => "not reported".to_string(),
        Some(w) if !w.configured => "not configured".to_string(),
        Some(w) => {
            let mut text = if w.reachable {
                "reachable".to_string()
            } else {
                "UNREACHABLE".to_string()
            };
            if let Some(g) = &w.grant {
                let _ = write!(text, ", grant to {} (epoch {})", g.room, g.epoch);
            }
            if let Some(t) = &w.last_contact {
                let _ = write!(text, ", last contact {t}");
            }
            text
        }
    };
    fields.push(row(&["Witness:", &witness]));
    fields.push(row(&[
        "Pairs:",
        &format!("{} paired, {} unpaired", s.pair_count, s.unpaired_count),
    ]));
    out.push_str(&table("  ", &fields));
    if !s.pairs.is_empty() {
        out.push_str("\n  Pairs:\n");
        let mut rows = vec![row(&["ROOM A", "", "ROOM B"])];
        rows.extend(s.pairs.iter().map(|p| row(&[&p.a, "<->", &p.b])));
        out.push_str(&table("    ", &rows));
    }
    if !s.unpaired.is_empty() {
        out.push_str("\n  Unpaired:\n");
        let mut rows = vec![row(&["NODE", "REASON", "MESSAGE"])];
        rows.extend(
            s.unpaired
                .iter()
                .map(|u| row(&[&u.node, &u.reason, &u.message])),
        );
        out.push_str(&table("    ", &rows));
    }
    if !s.nodes.is_empty() {
        out.push_str("\n  Nodes:\n");
        let mut rows = vec![row(&[
            "NODE",
            "ROOM",
            "PARTNER",
            "PHASE",
            "VERDICT",
            "WAITING FOR",
        ])];
        rows.extend(s.nodes.iter().map(|n| {
            vec![
                n.name.clone(),
                or_dash(n.room.as_deref()),
                or_dash(n.partner.as_deref()),
                n.phase.clone(),
                n.verdict.clone(),
                or_dash(n.waiting_for.as_deref()),
            ]
        }));
        out.push_str(&table("    ", &rows));
    }
    if !s.conditions.is_empty() {
        out.push_str("\n  Conditions:\n");
        let mut rows = vec![row(&["TYPE", "STATUS", "REASON", "MESSAGE"])];
        rows.extend(
            s.conditions
                .iter()
                .map(|c| row(&[&c.type_, &c.status, &c.reason, &c.message])),
        );
        out.push_str(&table("    ", &rows));
    }
}

fn render_volume(v: &VolumeReport, out: &mut String) {
    let _ = writeln!(out, "\n  {}/{}", v.namespace, v.name);
    let mut fields: Vec<Vec<String>> = Vec::new();
    let holder = match &v.holder {
        Some(h) => consumer_words(h),
        None => "nobody (released)".to_string(),
    };
    fields.push(row(&["Holder:", &holder]));
    fields.push(row(&["Epoch:", &v.epoch.to_string()]));
    let last = match (&v.last_switch, v.last_switch_seconds_ago) {
        (Some(t), Some(s)) => format!("{t} ({} ago)", ago(s)),
        (Some(t), None) => t.clone(),
        _ => "-".to_string(),
    };
    fields.push(row(&["Last switch:", &last]));
    if let Some(p) = &v.preferred_holder {
        let is_holder = v.holder.as_ref().is_some_and(|h| h.identity == p.identity);
        let words = if is_holder {
            format!(
                "done, to {} (preferred holder still set)",
                consumer_words(p)
            )
        } else {
            format!("under way, to {}", consumer_words(p))
        };
        fields.push(row(&["Switchover:", &words]));
    }
    if let Some(h) = &v.handover {
        fields.push(row(&[
            "Handover:",
            &format!("to {}, epoch {}", consumer_words(&h.to), h.epoch),
        ]));
    }
    for p in &v.problems {
        fields.push(row(&["Problem:", p]));
    }
    out.push_str(&table("    ", &fields));
    if v.consumers.is_empty() {
        let _ = writeln!(
            out,
            "    Consumers:    none (no pod labelled {VOLUME_LABEL}={})",
            v.name
        );
        return;
    }
    out.push_str("    Consumers:\n");
    let mut rows = vec![row(&["POD", "NODE", "ROLE", "PHASE", "UID"])];
    rows.extend(v.consumers.iter().map(|c| {
        vec![
            c.pod.clone(),
            or_dash(c.node.as_deref()),
            if c.holder { "holder" } else { "standby" }.to_string(),
            or_dash(c.phase.as_deref()),
            c.uid.clone(),
        ]
    }));
    out.push_str(&table("      ", &rows));
}

/// The text report.
pub fn render(r: &StatusReport) -> String {
    let mut out = String::from("Cluster (TwoSite default)\n");
    match (&r.cluster, &r.cluster_note) {
        (Some(s), _) => render_cluster(s, &mut out),
        (None, Some(note)) => {
            let _ = writeln!(out, "  {note}");
        }
        (None, None) => {
            let _ = writeln!(out, "  {NO_STATUS}");
        }
    }
    let _ = writeln!(out, "\nVolumes ({})", r.volumes.len());
    if r.volumes.is_empty() {
        let _ = writeln!(out, "  none (no Lease labelled {VOLUME_LABEL})");
    }
    for v in &r.volumes {
        render_volume(v, &mut out);
    }
    render_vms(r, &mut out);
    out
}

fn render_vms(r: &StatusReport, out: &mut String) {
    let vms = r
        .cluster
        .as_ref()
        .map(|c| c.vms.as_slice())
        .unwrap_or_default();
    let _ = writeln!(out, "\nVirtual machines ({})", vms.len());
    if vms.is_empty() {
        let _ = writeln!(out, "  none (no VirtualMachine annotated twosite.dev/ha)");
    } else {
        let mut rows = vec![row(&["VM", "STATE", "NODE", "KUBEVIRT", "PROBLEM"])];
        rows.extend(vms.iter().map(|v| {
            let problem = v
                .conditions
                .iter()
                .filter(|c| c.status == "False")
                .map(|c| format!("{}: {}", c.reason, c.message))
                .collect::<Vec<_>>()
                .join("; ");
            vec![
                format!("{}/{}", v.namespace, v.name),
                v.state.clone(),
                or_dash(v.node.as_deref()),
                or_dash(v.printable_status.as_deref()),
                if problem.is_empty() {
                    "-".into()
                } else {
                    problem
                },
            ]
        }));
        out.push_str(&table("  ", &rows));
    }
    if !r.gated_pods.is_empty() {
        let _ = writeln!(
            out,
            "\nLauncher pods at the gate ({}): the controller lifts the gate once every disk Lease \
             is granted to the pod; while it is down they wait (safe)",
            r.gated_pods.len()
        );
        let mut rows = vec![row(&["POD", "VM", "WAITING"])];
        rows.extend(r.gated_pods.iter().map(|g| {
            vec![
                format!("{}/{}", g.namespace, g.name),
                or_dash(g.vm.as_deref()),
                g.waiting_seconds.map_or("-".into(), |s| ago(s.max(0))),
            ]
        }));
        out.push_str(&table("  ", &rows));
    }
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
