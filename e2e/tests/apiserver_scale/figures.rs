//! The figures `apiserver_scale` prints, never asserts: a block, and one `SCALE_JSON` line.

use crate::audit::{
    ControllerRequests, FenceCommits, Request, by_verb, controller_requests, fence_commits,
    requests_of, show_counts,
};
use crate::common;
use crate::footprint::{Samples, cpu_percent, mib, sample};
use crate::load::{Generator, LoadHealth, load_health};
use crate::stats::{decision_metric, percentile};
use crate::{FENCE_DEADLINE_MS, Timeline};
use e2e::apiserver;
use serde_json::{Value, json};
use std::time::Duration;

/// What a run measured: its size, its timeline, the readings of /proc, the audit log, the
/// controller's /metrics and the load.
pub struct Run<'a> {
    pub n_total: usize,
    pub n_pods: usize,
    pub n_agents: usize,
    pub per_room: usize,
    pub time_to_ready: Duration,
    pub tainted_at: Option<Duration>,
    pub timeline: Timeline,
    pub samples: Samples,
    pub lost: &'a [String],
    pub agent_nodes: &'a [String],
    pub control_plane: &'a [(String, u32)],
    pub audit: &'a [Request],
    pub controller_user: &'a str,
    pub metrics: &'a str,
    pub generator: &'a Generator,
    pub kubelet_generator: &'a Generator,
}

/// The figures: the JSON, and what the printed block reads beside it.
struct Figures {
    json: Value,
    build: &'static str,
    requests: ControllerRequests,
    commits: FenceCommits,
    decision_metric: Option<(Option<f64>, Option<f64>, f64, f64)>,
    load: LoadHealth,
    cp: Vec<Value>,
    agent_figures: Vec<Value>,
}

/// Prints the figures of `run`: the block, then the `SCALE_JSON` line. Asserts a fence commit
/// for every lost node.
pub fn print(run: &Run) {
    let figures = figures(run);
    let block = block(run, &figures);
    println!("{block}");
    println!("SCALE_JSON {}", figures.json);
}

fn figures(run: &Run) -> Figures {
    let Run {
        n_total,
        n_pods,
        n_agents,
        per_room,
        time_to_ready,
        tainted_at,
        timeline,
        ref samples,
        lost,
        agent_nodes,
        control_plane,
        audit,
        controller_user,
        metrics,
        generator,
        kubelet_generator,
    } = *run;
    let Timeline {
        load_started_ms,
        calm_from_ms,
        calm_to_ms,
        calm_secs,
        stop_ms,
        ..
    } = timeline;
    let Samples {
        s_ctrl0,
        s_ctrl1,
        s_ctrl2,
        s_ctrl_end,
        ref s_agents0,
        ref s_agents1,
        ref s_agents_end,
        ref s_cp0,
        ref s_cp1,
        ref s_cp2,
        s_self0,
        s_self1,
        calm_peak_kib,
        failover_peak_kib,
    } = *samples;

    let requests = controller_requests(audit, controller_user, &timeline);
    let commits = fence_commits(audit, controller_user, lost, per_room, &timeline);
    let decision_metric = decision_metric(metrics);
    let load = load_health(generator, kubelet_generator, &timeline);
    let ControllerRequests {
        calm_rate,
        failover_requests,
        failover_secs,
        failover_extra,
        lists_total,
        ref calm_breakdown,
        ref failover_breakdown,
        ref after_breakdown,
        ref startup_breakdown,
        ref calm_lists,
        ref failover_lists,
    } = requests;
    let FenceCommits {
        last_release_ms,
        first_taint_ms,
        last_taint_ms,
        commit_first,
        commit_last,
        last_renewal_a,
        ref decisions_outside,
        ref commit_rtt,
        ref batches,
    } = commits;
    let LoadHealth {
        failed,
        conflicts,
        max_gap_b,
        renew_rate,
        ref calm_lat,
        ref failover_lat,
    } = load;

    // The agents.
    let agent_window_secs = calm_secs;
    let mut agent_figures = Vec::new();
    for (k, node) in agent_nodes.iter().enumerate() {
        let user = format!("scale-agent-{node}");
        let reqs: Vec<&Request> = requests_of(audit, &user, calm_from_ms, calm_to_ms).collect();
        let rate = reqs.len() as f64 * 1000.0 / (calm_to_ms - calm_from_ms) as f64;
        let breakdown = by_verb(reqs.into_iter());
        let all_reqs = requests_of(audit, &user, 0, i64::MAX).count();
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
            "fence_commit_request_ms_p50": percentile(commit_rtt, 0.5),
            "fence_commit_request_ms_max": percentile(commit_rtt, 1.0),
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
                "p50": percentile(decisions_outside, 0.5),
                "p99": percentile(decisions_outside, 0.99),
                "min": percentile(decisions_outside, 0.0),
                "max": percentile(decisions_outside, 1.0),
            },
        },
        "load": {
            "renewals_per_s": renew_rate,
            "agent_renewal_latency_calm_ms": { "p50": percentile(calm_lat, 0.5), "p99": percentile(calm_lat, 0.99), "max": percentile(calm_lat, 1.0) },
            "agent_renewal_latency_failover_ms": { "p50": percentile(failover_lat, 0.5), "p99": percentile(failover_lat, 0.99), "max": percentile(failover_lat, 1.0) },
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

    Figures {
        json: figures,
        build,
        requests,
        commits,
        decision_metric,
        load,
        cp,
        agent_figures,
    }
}

/// The block of figures, for a human.
fn block(run: &Run, figures: &Figures) -> String {
    let Run {
        n_total,
        n_pods,
        per_room,
        time_to_ready,
        timeline,
        ref samples,
        ..
    } = *run;
    let calm_secs = timeline.calm_secs;
    let s_ctrl0 = samples.s_ctrl0;
    let Figures {
        json: ref figures,
        build,
        ref requests,
        ref commits,
        ref decision_metric,
        ref load,
        ref cp,
        ref agent_figures,
    } = *figures;
    let ControllerRequests {
        calm_rate,
        failover_requests,
        failover_secs,
        failover_extra,
        ref calm_breakdown,
        ref failover_breakdown,
        ref after_breakdown,
        ref startup_breakdown,
        ref calm_lists,
        ..
    } = *requests;
    let FenceCommits {
        commit_first,
        commit_last,
        ref batches,
        ..
    } = *commits;
    let LoadHealth {
        failed,
        conflicts,
        max_gap_b,
        renew_rate,
        ..
    } = *load;
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
        show_counts(calm_breakdown)
    );
    let _ = writeln!(
        block,
        "controller LISTs and WATCHes, calm: {}",
        show_counts(calm_lists)
    );
    let _ = writeln!(
        block,
        "controller requests before the calm window: {}",
        show_counts(startup_breakdown)
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
        show_counts(failover_breakdown)
    );
    for b in batches {
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
        show_counts(after_breakdown)
    );
    match decision_metric {
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
    for p in cp {
        let _ = writeln!(
            block,
            "{}: calm {:.1} % CPU, failover {:.1} %, peak RSS {:.0} MiB",
            p["process"].as_str().unwrap_or_default(),
            p["calm_cpu_percent"].as_f64().unwrap_or(0.0),
            p["failover_cpu_percent"].as_f64().unwrap_or(0.0),
            p["peak_rss_mib"].as_f64().unwrap_or(0.0),
        );
    }
    for a in agent_figures {
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
    block
}
