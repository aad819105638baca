//! `twosite simulate --compare`: twosite against what users run today, on the same worlds and
//! fault schedules.

use e2e::sim::compare::{self, PolicyRun, Time};
use e2e::sim::policy::Policy;

fn run(scenario: &str, policy: Policy) -> PolicyRun {
    let s = compare::named(scenario, 1).expect("a known scenario");
    compare::run_policy(&s, 1, policy)
}

#[test]
fn node_loss_kubernetes_alone_never_runs_the_workload_elsewhere_twosite_within_30_s() {
    let k8s = run("node-loss", Policy::K8sAlone);
    assert!(
        match k8s.elsewhere_ms {
            Time::Never => true,
            Time::Ms(t) => t >= 300_000,
            Time::NotApplicable => false,
        },
        "{k8s:?}"
    );
    let twosite = run("node-loss", Policy::Twosite);
    assert!(
        matches!(twosite.elsewhere_ms, Time::Ms(t) if t <= 30_000),
        "{twosite:?}"
    );
    assert!(twosite.violations.is_empty(), "{twosite:?}");
}

#[test]
fn a_node_that_stays_off_is_released_by_nhc_snr_after_minutes_and_never_by_kubernetes_alone() {
    let nhc = run("node-loss-long", Policy::NhcSnr);
    // 50 s to NotReady, 300 s of NHC, 180 s of SNR's safe time.
    assert!(
        matches!(nhc.released_ms, Time::Ms(t) if (500_000..600_000).contains(&t)),
        "{nhc:?}"
    );
    assert_eq!(
        run("node-loss-long", Policy::K8sAlone).released_ms,
        Time::Never
    );
}

#[test]
fn the_configmap_lock_lets_a_frozen_holder_write_beside_the_standby_twosite_does_not() {
    let lock = run("holder-frozen", Policy::ConfigMapLock);
    assert!(
        lock.violations
            .get("S1-single-writer")
            .copied()
            .unwrap_or(0)
            > 0,
        "{lock:?}"
    );
    let twosite = run("holder-frozen", Policy::Twosite);
    assert!(twosite.violations.is_empty(), "{twosite:?}");
    assert!(
        matches!(twosite.volume_failover_ms, Time::Ms(t) if t <= 30_000),
        "{twosite:?}"
    );
}

#[test]
fn nhc_snr_runs_a_cut_off_room_twice_and_min_healthy_blocks_a_room_loss() {
    let nhc = run("partition-long", Policy::NhcSnr);
    assert!(nhc.violations.contains_key("S1-single-copy"), "{nhc:?}");
    assert!(nhc.violations.contains_key("S2-no-unsafe-taint"), "{nhc:?}");
    assert!(run("partition-long", Policy::Twosite).violations.is_empty());
    // 3 of 6 nodes down: 3 healthy < 51 % of 6 rounded up.
    assert_eq!(run("room-loss", Policy::NhcSnr).elsewhere_ms, Time::Never);
}

#[test]
fn the_comparison_is_deterministic() {
    let s = compare::named("holder-partitioned", 3).expect("known");
    let a = serde_json::to_string(&compare::compare(&s, 3)).expect("json");
    let b = serde_json::to_string(&compare::compare(&s, 3)).expect("json");
    assert_eq!(a, b);
}
