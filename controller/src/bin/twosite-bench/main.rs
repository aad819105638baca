//! `twosite-bench`: the controller's footprint and decision latency at scale, in one process,
//! on virtual time.
//!
//! It drives the code the controller runs (the heartbeat and Node watch handlers of
//! [`controller::heartbeats::Observed`], the pod index, the VM caches, the remediation pass,
//! the VM loop pass, leader election) against an in-process API server: a `tower` service that
//! stores what is written, answers reads from that store, and delivers every change to the
//! watch handlers at once (as a watch with no delay would). N nodes in two rooms, one agent
//! heartbeat Lease per node renewed every 2 s, 10 VMs and 20 pods per node; after a settle time
//! the agents of room A (or of `--lost-nodes` of its nodes) stop renewing, and the bench runs
//! until every lost node is fenced, tainted and released, and then a while longer (a lost room
//! staying tainted).
//!
//! It prints what the issue asks for: peak RSS, CPU per second of cluster time, the decision
//! latency from the moment a node may be fenced (the core's fence deadline) to its fence
//! commit request, and the API requests of the failover. Figures, not assertions: nothing here
//! fails on a slow machine.

mod cluster;
mod server;

use clap::Parser;
use cluster::{
    agent_json, launcher_json, namespace_of, node_json, node_name, pod_json, timestamp, vm_json,
};
use controller::heartbeats::{Observed, SharedObserved};
use controller::leader_lease::{LeaderLease, Leadership};
use controller::metrics::Metrics;
use controller::pod_index::PodIndex;
use controller::remediation::{RemediationContext, Remediator};
use controller::vm::watch::VmStores;
use controller::vm::{VmContext, VmLoop};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::events::Reporter;
use kube::runtime::watcher::Event as W;
use node_health::{HealthTiming, LeaderConfig, MonoTime, NodeVerdict, Pairing};
use serde_json::{Value, json};
use server::{Objects, Server, Shared, client};
use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) const NAMESPACE: &str = "twosite-system";
const TICK_MS: u64 = 500;

#[derive(Parser, Debug)]
#[command(about = "Scale and footprint bench of the twosite controller (virtual time)")]
struct Args {
    /// Nodes in all, half in each room.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// VirtualMachines per node (each with its launcher pod on the node).
    #[arg(long, default_value_t = 10)]
    vms_per_node: usize,
    /// Pods per node in all (launcher pods included; one of them a DaemonSet's).
    #[arg(long, default_value_t = 20)]
    pods_per_node: usize,
    /// How many of room A's nodes lose power (default: all of them, a room loss). With 1, the
    /// decision latency of the common case: one node lost in a large cluster.
    #[arg(long)]
    lost_nodes: Option<usize>,
    /// Virtual seconds of calm before room A's agents stop renewing.
    #[arg(long, default_value_t = 30)]
    calm_secs: u64,
    /// Virtual seconds after the last node of room A was released (the room stays tainted).
    #[arg(long, default_value_t = 30)]
    tail_secs: u64,
    /// Without the pod index (as before it existed): a LIST of the node's pods on every pass
    /// for every fenced or tainted node. For comparison.
    #[arg(long)]
    no_pod_index: bool,
    /// Round-trip time of every API request, in ms (0: the in-process server answers at once;
    /// a real API server with etcd takes a few ms per write). With a latency the bench runs in
    /// real time: a virtual second lasts a second.
    #[arg(long, default_value_t = 0.0)]
    api_latency_ms: f64,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// The bench's virtual clock, shared with leader election and the VM loop.
#[derive(Debug, Default)]
pub(crate) struct VirtualClock(pub(crate) AtomicU64);

impl node_health::Clock for VirtualClock {
    fn now(&self) -> MonoTime {
        MonoTime(self.0.load(Ordering::Relaxed))
    }
}

/// Per-thread CPU time: the controller's work runs on this thread (a current-thread runtime).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A `/proc/self/status` figure in KiB (`VmHWM`: peak RSS, `VmRSS`: now).
fn proc_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .strip_suffix("kB")
                    .map(str::trim)
                    .map(str::to_string)
            })
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn decode<K: serde::de::DeserializeOwned>(v: Value) -> Result<K, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: no runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(args: Args) -> Result<(), String> {
    let n = args.nodes.max(2);
    let rss_start = proc_kib("VmRSS:");
    let timing = HealthTiming::default();
    let clock = Arc::new(VirtualClock::default());
    let observed = SharedObserved::new(Observed::default());
    let pods = PodIndex::default();
    let server = Shared(Arc::new(Mutex::new(Server {
        objects: Objects::default(),
        rv: 100,
        observed: observed.clone(),
        pods: pods.clone(),
        clock: Arc::clone(&clock),
        timing,
        requests: BTreeMap::new(),
        commits: Vec::new(),
        own: Duration::ZERO,
    })));
    let client = client(
        server.clone(),
        Duration::from_micros((args.api_latency_ms * 1000.0) as u64),
    );
    let cpu_start = thread_cpu();

    // The initial listings, through the watch handlers (objects decoded from JSON, as a watch
    // delivers them).
    let now = MonoTime(0);
    {
        let mut s = server.lock();
        let mut o = observed.lock();
        o.apply_node(W::Init, now);
        o.apply_agent_lease(W::Init, now, &timing);
        for i in 0..n {
            let name = node_name(i);
            s.rv += 1;
            let mut node = node_json(i);
            node["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.objects.insert(format!("/api/v1/nodes/{name}"), &node);
            let node: Node = serde_json::from_value(node).map_err(|e| e.to_string())?;
            o.apply_node(W::InitApply(node), now);
            let mut lease = agent_json(&name, 0);
            s.rv += 1;
            lease["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.objects.insert(
                format!("/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/twosite-agent-{name}"),
                &lease,
            );
            let lease: Lease = serde_json::from_value(lease).map_err(|e| e.to_string())?;
            o.apply_agent_lease(W::InitApply(lease), now, &timing);
        }
        o.apply_node(W::InitDone, now);
        o.apply_agent_lease(W::InitDone, now, &timing);
        o.apply_kubelet_lease(W::Init, now);
        o.apply_kubelet_lease(W::InitDone, now);
    }
    // Pods and VMs: the launcher pods are in both caches (the VM caches' launcher watch and the
    // pod index), as in the controller. Every object is made, decoded and handed over one at a
    // time, as a watch delivers them: the bench keeps no list of its own that would count in
    // the RSS.
    pods.apply(W::Init);
    for i in 0..n {
        let node = node_name(i);
        let ns = namespace_of(i);
        for j in 0..args.pods_per_node {
            let json = if j < args.vms_per_node {
                launcher_json(&node, &ns, j)
            } else if j == args.vms_per_node {
                pod_json(
                    &node,
                    "kube-system",
                    &format!("ds-{node}"),
                    ("DaemonSet", "ds"),
                    false,
                )
            } else {
                pod_json(
                    &node,
                    &ns,
                    &format!("web-{node}-{j}"),
                    ("ReplicaSet", "web"),
                    false,
                )
            };
            let pod: Pod = serde_json::from_value(json).map_err(|e| e.to_string())?;
            pods.apply(W::InitApply(pod));
        }
    }
    pods.apply(W::InitDone);
    let per_node = args.vms_per_node;
    let vm_objects =
        (0..n).flat_map(|i| (0..per_node).filter_map(move |j| decode(vm_json(i, j)).ok()));
    let launcher_objects = (0..n).flat_map(|i| {
        (0..per_node)
            .filter_map(move |j| decode(launcher_json(&node_name(i), &namespace_of(i), j)).ok())
    });
    let stores = VmStores::from_objects(vm_objects, launcher_objects, Vec::new(), Vec::new());
    let rss_loaded = proc_kib("VmRSS:");
    let cpu_loaded = thread_cpu();

    // The controller's parts, as `twosite controller` wires them.
    let metrics = Arc::new(Metrics::new());
    let leadership = Leadership::with_clock(
        LeaderConfig::new("bench"),
        Arc::clone(&clock) as Arc<dyn node_health::Clock + Send + Sync>,
    )
    .map_err(|e| e.to_string())?;
    let lease = LeaderLease::new(
        client.clone(),
        NAMESPACE,
        leadership.clone(),
        Arc::clone(&metrics),
        Duration::from_secs(5),
    );
    let recorder = controller::events::EventSink::new(
        client.clone(),
        Reporter {
            controller: "twosite-controller".into(),
            instance: Some("bench".into()),
        },
    );
    let ctx = RemediationContext {
        nodes: kube::Api::all(client.clone()),
        agent_leases: kube::Api::namespaced(client.clone(), NAMESPACE),
        pods: kube::Api::all(client.clone()),
        recorder: recorder.clone(),
        leadership: leadership.clone(),
        metrics: Arc::clone(&metrics),
        api_timeout: Duration::from_secs(5),
        timing,
        max_dead_share_pct: 50,
        witness: None,
        vms: Some(stores.clone()),
        pod_index: (!args.no_pod_index).then(|| pods.clone()),
        dry_run: false,
        fence_commits: Default::default(),
    };
    let vm_ctx = VmContext {
        client: client.clone(),
        stores,
        recorder,
        leadership: leadership.clone(),
        metrics: Arc::clone(&metrics),
        api_timeout: Duration::from_secs(5),
        clock: Arc::clone(&clock) as Arc<dyn node_health::Clock + Send + Sync>,
        dry_run: false,
    };
    let facts = observed.lock().node_facts().unwrap_or_default();
    let pairing: Pairing =
        node_health::rooms::pair_nodes(&node_health::rooms::RoomConfig::default(), &facts, &[]);
    let room_a = n.div_ceil(2);
    let lost_count = args.lost_nodes.unwrap_or(room_a).min(room_a);
    let is_lost = |i: usize| i.is_multiple_of(2) && i / 2 < lost_count;
    let lost: Vec<String> = (0..n).filter(|i| is_lost(*i)).map(node_name).collect();

    let mut remediator = Remediator::default();
    let mut vm_loop = VmLoop::new();
    let loss_at = args.calm_secs * 1000;
    let mut deadlines: HashMap<String, MonoTime> = HashMap::new();
    let mut pass_started: Vec<(MonoTime, Instant)> = Vec::new();
    let mut released_at: Option<u64> = None;
    let mut controller_cpu = Duration::ZERO;
    let mut calm_cpu = Duration::ZERO;
    let mut early_passes = 0u64;
    // The split of the controller's CPU: remediation passes, VM passes, watch events.
    let mut remediation_cpu = Duration::ZERO;
    let mut vm_cpu = Duration::ZERO;
    let mut watch_cpu = Duration::ZERO;
    let mut pass_wall: Vec<f64> = Vec::new();
    let mut requests_calm = BTreeMap::new();
    let mut requests_failover = BTreeMap::new();
    let requests_tail;
    let limit_ms = loss_at + 600_000;
    let mut ms = 0u64;
    loop {
        let tick_started = Instant::now();
        clock.0.store(ms, Ordering::Relaxed);
        let now = MonoTime(ms);
        // The agents renew every 2 s, spread over the ticks; room A's stop at the loss.
        {
            let mut s = server.lock();
            for i in (0..n).filter(|i| (*i as u64 % 4) * TICK_MS == ms % 2000) {
                if ms >= loss_at && is_lost(i) {
                    continue;
                }
                let name = node_name(i);
                let path = format!(
                    "/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/twosite-agent-{name}"
                );
                let mut lease = s
                    .objects
                    .get(&path)
                    .unwrap_or_else(|| agent_json(&name, ms));
                lease["spec"]["renewTime"] = json!(timestamp(ms));
                s.rv += 1;
                lease["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                s.objects.insert(path, &lease);
                // The watch decodes the event, the handler applies it: the controller's work.
                let bytes = serde_json::to_vec(&lease).unwrap_or_default();
                let cpu_decode = thread_cpu();
                if let Ok(lease) = serde_json::from_slice::<Lease>(&bytes) {
                    observed
                        .lock()
                        .apply_agent_lease(W::Apply(lease), now, &timing);
                }
                let spent = thread_cpu().saturating_sub(cpu_decode);
                controller_cpu += spent;
                watch_cpu += spent;
            }
        }
        // During the failover: when may each lost node be fenced (outside the measured CPU).
        if ms >= loss_at && released_at.is_none() {
            let view = observed.lock().cluster_view(now, &timing);
            let a = node_health::assess::assess(&view, Some(&pairing), now, &timing, 50);
            for node in &a.nodes {
                if let NodeVerdict::Dead {
                    fence_deadline: Some(d),
                } = node.input.verdict
                {
                    deadlines.entry(node.name.clone()).or_insert(d);
                }
            }
        }
        let cpu1 = thread_cpu();
        let wall = Instant::now();
        if ms.is_multiple_of(2000) {
            let _ = lease.round().await;
        }
        pass_started.push((now, wall));
        let cpu_r = thread_cpu();
        let view = remediator.pass(&ctx, &observed, Some(&pairing), now).await;
        remediation_cpu += thread_cpu().saturating_sub(cpu_r);
        let cpu_v = thread_cpu();
        let _ = vm_loop.pass(&vm_ctx, view.as_ref()).await;
        vm_cpu += thread_cpu().saturating_sub(cpu_v);
        pass_wall.push(wall.elapsed().as_secs_f64() * 1000.0);
        let spent = thread_cpu().saturating_sub(cpu1);
        controller_cpu += spent;
        if ms < loss_at {
            calm_cpu += spent;
        }
        // As `run_remediation_loop` does: a pass before the next tick when a node becomes
        // fenceable then (the VM loop keeps its own tick).
        while let Some(at) = remediator.wake_at().filter(|at| at.0 < ms + TICK_MS) {
            clock.0.store(at.0, Ordering::Relaxed);
            let cpu_w = thread_cpu();
            pass_started.push((at, Instant::now()));
            let _ = remediator.pass(&ctx, &observed, Some(&pairing), at).await;
            let spent = thread_cpu().saturating_sub(cpu_w);
            remediation_cpu += spent;
            controller_cpu += spent;
            early_passes += 1;
        }

        // The pass's pod deletions run as tasks: let them run before the next tick. Without a
        // latency they finish at once; with one, the bench keeps to real time (a tick lasts
        // 500 ms), or the requests' round trips would not fit in the virtual ticks.
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
        if args.api_latency_ms > 0.0 {
            let tick = Duration::from_millis(TICK_MS);
            tokio::time::sleep(tick.saturating_sub(tick_started.elapsed())).await;
        }

        if ms + TICK_MS == loss_at {
            requests_calm = std::mem::take(&mut server.lock().requests);
        }
        if ms >= loss_at && released_at.is_none() {
            let done = lost.iter().all(|n| {
                remediator.phase(n) == Some(node_health::remediation::Phase::Tainted)
                    || remediator.phase(n) == Some(node_health::remediation::Phase::Fenced)
            }) && lost.iter().all(|n| {
                pods.pods_on(n).is_some_and(|ps| {
                    ps.iter().all(|p| {
                        !controller::remediation::releasable(p, &|k| {
                            controller::vm::opted_in(&vm_ctx.stores, k)
                        })
                    })
                })
            });
            if done {
                released_at = Some(ms);
                requests_failover = std::mem::take(&mut server.lock().requests);
            }
        }
        if let Some(r) = released_at
            && ms >= r + args.tail_secs * 1000
        {
            requests_tail = std::mem::take(&mut server.lock().requests);
            break;
        }
        if ms >= limit_ms {
            return Err(format!(
                "room A not released {} s after the loss",
                (limit_ms - loss_at) / 1000
            ));
        }
        ms += TICK_MS;
    }
    let cpu_end = thread_cpu();
    let released_at = released_at.unwrap_or(ms);

    // Decision latency: virtual time from the fence deadline to the pass that committed, plus
    // the wall-clock time within that pass until the commit request left.
    let s = server.lock();
    let mut virtual_ms = Vec::new();
    let mut in_pass_ms = Vec::new();
    for (node, at, wall) in &s.commits {
        let Some(deadline) = deadlines.get(node) else {
            continue;
        };
        let started = pass_started
            .iter()
            .rev()
            .find(|(t, _)| t == at)
            .map(|(_, w)| *w);
        let within = started.map_or(0.0, |w| wall.duration_since(w).as_secs_f64() * 1000.0);
        virtual_ms.push(at.since(*deadline).as_secs_f64() * 1000.0);
        in_pass_ms.push(within);
    }
    let sort = |v: &mut Vec<f64>| v.sort_by(|a, b| a.total_cmp(b));
    sort(&mut virtual_ms);
    sort(&mut in_pass_ms);
    let mut total_ms: Vec<f64> = virtual_ms.clone();
    total_ms
        .iter_mut()
        .zip(&in_pass_ms)
        .for_each(|(t, w)| *t += w);
    sort(&mut total_ms);
    sort(&mut pass_wall);
    let failover_requests: u64 = requests_failover.values().sum();
    let cluster_secs = ms as f64 / 1000.0;
    let figures = json!({
        "nodes": n,
        "api_latency_ms": args.api_latency_ms,
        "vms": n * args.vms_per_node,
        "pods": n * args.pods_per_node,
        "lost_nodes": lost.len(),
        "rss_start_mib": rss_start as f64 / 1024.0,
        "rss_loaded_mib": rss_loaded as f64 / 1024.0,
        "rss_end_mib": proc_kib("VmRSS:") as f64 / 1024.0,
        "peak_rss_mib": proc_kib("VmHWM:") as f64 / 1024.0,
        "load_cpu_s": cpu_loaded.saturating_sub(cpu_start).as_secs_f64(),
        "cluster_secs": cluster_secs,
        "controller_cpu_ms_per_cluster_s": controller_cpu.as_secs_f64() * 1000.0 / cluster_secs,
        "remediation_cpu_ms_per_cluster_s": remediation_cpu.as_secs_f64() * 1000.0 / cluster_secs,
        "vm_cpu_ms_per_cluster_s": vm_cpu.as_secs_f64() * 1000.0 / cluster_secs,
        "watch_cpu_ms_per_cluster_s": watch_cpu.as_secs_f64() * 1000.0 / cluster_secs,
        "calm_cpu_ms_per_cluster_s": calm_cpu.as_secs_f64() * 1000.0 / (loss_at as f64 / 1000.0).max(0.5),
        "bench_cpu_s": cpu_end.saturating_sub(cpu_start).as_secs_f64(),
        "mock_server_wall_s": s.own.as_secs_f64(),
        "pass_wall_ms_p50": percentile(&pass_wall, 0.5),
        "pass_wall_ms_p99": percentile(&pass_wall, 0.99),
        "pass_wall_ms_max": pass_wall.last().copied().unwrap_or(f64::NAN),
        "fences": s.commits.len(),
        "early_passes": early_passes,
        "decision_ms_p50": percentile(&total_ms, 0.5),
        "decision_ms_p99": percentile(&total_ms, 0.99),
        "decision_in_pass_ms_p50": percentile(&in_pass_ms, 0.5),
        "decision_in_pass_ms_p99": percentile(&in_pass_ms, 0.99),
        "decision_tick_wait_ms_p50": percentile(&virtual_ms, 0.5),
        "decision_tick_wait_ms_p99": percentile(&virtual_ms, 0.99),
        "failover_secs": (released_at - loss_at) as f64 / 1000.0,
        "requests_calm": requests_calm,
        "requests_failover": requests_failover,
        "requests_failover_total": failover_requests,
        "requests_failover_per_lost_node": failover_requests as f64 / lost.len().max(1) as f64,
        "requests_tail": requests_tail,
        "tail_secs": args.tail_secs,
    });
    drop(s);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&figures).unwrap_or_default()
        );
    } else {
        print_table(&figures);
    }
    Ok(())
}

fn print_table(f: &Value) {
    let num = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "twosite-bench: {} nodes (2 rooms), {} VMs, {} pods; {} nodes of room A lost after calm",
        f["nodes"], f["vms"], f["pods"], f["lost_nodes"]
    );
    println!(
        "  peak RSS (VmHWM)                 {:8.1} MiB",
        num("peak_rss_mib")
    );
    println!(
        "  RSS start / loaded / end         {:8.1} / {:.1} / {:.1} MiB",
        num("rss_start_mib"),
        num("rss_loaded_mib"),
        num("rss_end_mib")
    );
    println!(
        "  CPU per cluster second           {:8.2} ms (calm: {:.2} ms)",
        num("controller_cpu_ms_per_cluster_s"),
        num("calm_cpu_ms_per_cluster_s")
    );
    println!(
        "    remediation / VM loop / watches {:7.2} / {:.2} / {:.2} ms",
        num("remediation_cpu_ms_per_cluster_s"),
        num("vm_cpu_ms_per_cluster_s"),
        num("watch_cpu_ms_per_cluster_s")
    );
    println!(
        "  pass wall time p50 / p99 / max   {:8.2} / {:.2} / {:.2} ms",
        num("pass_wall_ms_p50"),
        num("pass_wall_ms_p99"),
        num("pass_wall_ms_max")
    );
    println!(
        "  decision latency p50 / p99       {:8.1} / {:.1} ms (fence deadline -> commit request)",
        num("decision_ms_p50"),
        num("decision_ms_p99")
    );
    println!(
        "    of which in the pass p50 / p99 {:8.2} / {:.2} ms; waiting for a pass p50 / p99 {:.0} / {:.0} ms",
        num("decision_in_pass_ms_p50"),
        num("decision_in_pass_ms_p99"),
        num("decision_tick_wait_ms_p50"),
        num("decision_tick_wait_ms_p99")
    );
    println!(
        "  failover: {} fences ({} passes woken before the tick), room released {:.1} s after the loss",
        f["fences"],
        f["early_passes"],
        num("failover_secs")
    );
    println!(
        "  API requests of the failover     {:8} ({:.1} per lost node): {}",
        f["requests_failover_total"],
        num("requests_failover_per_lost_node"),
        f["requests_failover"]
    );
    println!("  API requests, calm before        {}", f["requests_calm"]);
    println!(
        "  API requests, {} s tainted after {}",
        f["tail_secs"], f["requests_tail"]
    );
}
