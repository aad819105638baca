use super::*;
use crate::heartbeats::Observed;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus as K8sNodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::runtime::watcher::Event as W;
use node_health::RemediationInput;
use node_health::assess::Assessment;
use node_health::rooms::ZONE_LABEL;
use node_health::{NodeVerdict, Pair, Room};

fn node(name: &str, zone: &str, labels: &[(&str, &str)]) -> Node {
    let mut l: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.insert(ZONE_LABEL.into(), zone.into());
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(l),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(K8sNodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..NodeCondition::default()
            }]),
            node_info: Some(NodeSystemInfo {
                boot_id: format!("boot-{name}"),
                ..NodeSystemInfo::default()
            }),
            ..K8sNodeStatus::default()
        }),
    }
}

fn agent(node: &str, rv: &str, failures: &str, watchdog: &str) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(format!("twosite-agent-{node}")),
            resource_version: Some(rv.into()),
            annotations: Some(
                [
                    (
                        "twosite.dev/renew-failures".to_string(),
                        failures.to_string(),
                    ),
                    ("twosite.dev/watchdog".to_string(), watchdog.to_string()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.into()),
            // Each fixture resourceVersion stands for one renewal: a distinct renewTime.
            renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                jiff::Timestamp::from_second(rv.parse::<i64>().unwrap_or(0)).expect("time"),
            )),
            ..LeaseSpec::default()
        }),
    }
}

fn pairing(pairs: &[(&str, &str)]) -> Pairing {
    Pairing {
        rooms: Some((Room("east".into()), Room("west".into()))),
        pairs: pairs
            .iter()
            .map(|(a, b)| Pair {
                a: a.to_string(),
                b: b.to_string(),
            })
            .collect(),
        ..Pairing::default()
    }
}

const T: HealthTiming = HealthTiming {
    agent_renew: Duration::from_secs(2),
    agent_lease: Duration::from_secs(8),
    watchdog: Duration::from_secs(5),
    fence_margin: Duration::from_secs(2),
    kubelet_lease: Duration::from_secs(40),
    request_timeout: Duration::from_secs(2),
    feed_interval: Duration::from_secs(1),
    probe_interval: Duration::from_millis(500),
    vouch_after_silence: Duration::from_millis(4500),
    vouch_validity: Duration::from_secs(3),
    clear_gap: Duration::from_secs(3),
    drift_ppm: 10_000,
};

fn at(ms: u64) -> MonoTime {
    MonoTime(ms)
}

/// a1 (east) / b1 (west) paired, b2 (west) unpaired; every watch synced at t = 0.
fn cluster() -> Observed {
    let mut o = Observed::default();
    o.apply_node(W::Init, at(0));
    for n in [
        node("a1", "east", &[]),
        node("b1", "west", &[]),
        node("b2", "west", &[]),
    ] {
        o.apply_node(W::InitApply(n), at(0));
    }
    o.apply_node(W::InitDone, at(0));
    o.apply_agent_lease(W::Init, at(0), &T);
    for n in ["a1", "b1", "b2"] {
        o.apply_agent_lease(W::InitApply(agent(n, "1", "0", "enabled")), at(0), &T);
    }
    o.apply_agent_lease(W::InitDone, at(0), &T);
    o.apply_kubelet_lease(W::Init, at(0));
    o.apply_kubelet_lease(W::InitDone, at(0));
    o
}

/// Everyone but `dead` renews cleanly every 2 s until `until` ms.
fn renew_all_but(o: &mut Observed, dead: &[&str], until: u64) {
    for (i, t) in (2_000..=until).step_by(2_000).enumerate() {
        for n in ["a1", "b1", "b2"] {
            if !dead.contains(&n) {
                let rv = (i + 2).to_string();
                o.apply_agent_lease(W::Apply(agent(n, &rv, "0", "enabled")), at(t), &T);
            }
        }
    }
}

/// The core's assessment of what the controller observed.
fn core_assessment(
    o: &Observed,
    pairing: Option<&Pairing>,
    now: MonoTime,
    t: &HealthTiming,
    pct: u8,
) -> Assessment {
    assess(&o.cluster_view(now, t), pairing, now, t, pct)
}

fn input<'a>(a: &'a Assessment, name: &str) -> &'a RemediationInput {
    &a.nodes
        .iter()
        .find(|n| n.name == name)
        .expect("node assessed")
        .input
}

#[test]
fn a_dead_node_with_a_clear_partner_is_ready_to_fence() {
    let mut o = cluster();
    renew_all_but(&mut o, &["a1"], 30_000);
    let a = core_assessment(&o, Some(&pairing(&[("a1", "b1")])), at(30_000), &T, 50);
    assert_eq!(a.pause, None);
    let i = input(&a, "a1");
    assert!(matches!(
        i.verdict,
        NodeVerdict::Dead {
            fence_deadline: Some(_)
        }
    ));
    assert_eq!(i.vouchers_clear_since, Some(at(0)), "b1 clear since t=0");
    assert_eq!(i.boot_id.as_deref(), Some("boot-a1"));
    assert!(i.ready && !i.excluded && !i.tainted && !i.paused);
    let mut r = NodeRemediation::default();
    assert_eq!(i.heartbeat.as_deref(), Some("1"), "the version judged dead");
    // First the early NoSchedule taint; the fence once it has been seen on for a second.
    let actions = r.step(i, at(30_000), &T);
    assert_eq!(
        actions.first(),
        Some(&Action::MarkUnschedulable),
        "{actions:?}"
    );
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::CommitFence { .. }))
    );
    let marked = RemediationInput {
        unschedulable_since: Some(at(30_100)),
        ..i.clone()
    };
    assert!(r.step(&marked, at(30_100), &T).is_empty());
    let actions = r.step(&marked, at(31_100), &T);
    assert!(
        actions.contains(&Action::CommitFence {
            heartbeat: "1".into(),
            fenced_boot_id: Some("boot-a1".into())
        }),
        "{actions:?}"
    );
    let b1 = a.nodes.iter().find(|n| n.name == "b1").expect("b1");
    assert_eq!(b1.partner.as_deref(), Some("a1"));
    assert_eq!(b1.room.as_deref(), Some("west"));
}

#[test]
fn an_unpaired_worker_needs_every_worker_of_the_other_room_clear() {
    let mut o = cluster();
    // b2 is unpaired: a1 may vouch for it. a1 renewed after a failure at 20 s.
    renew_all_but(&mut o, &["b2"], 18_000);
    o.apply_agent_lease(W::Apply(agent("a1", "50", "1", "enabled")), at(20_000), &T);
    o.apply_agent_lease(W::Apply(agent("a1", "51", "0", "enabled")), at(22_000), &T);
    o.apply_agent_lease(W::Apply(agent("b1", "52", "0", "enabled")), at(22_000), &T);
    let a = core_assessment(&o, Some(&pairing(&[("a1", "b1")])), at(23_000), &T, 50);
    let i = input(&a, "b2");
    assert!(i.verdict.is_dead());
    assert_eq!(
        i.vouchers_clear_since,
        Some(at(22_000)),
        "a1 clear again only since 22 s"
    );
    // Without a pairing, nobody may be fenced.
    let a = core_assessment(&o, None, at(23_000), &T, 50);
    assert_eq!(input(&a, "b2").vouchers_clear_since, None);
    assert_eq!(a.pause.map(|p| p.reason), Some(pause::ROOMS_UNKNOWN));
}

#[test]
fn a_watchdog_that_is_not_enabled_counts_as_no_agent_but_still_clears_a_voucher() {
    let mut o = cluster();
    o.apply_agent_lease(W::Apply(agent("a1", "9", "0", "disabled")), at(1_000), &T);
    renew_all_but(&mut o, &["a1"], 30_000);
    let a = core_assessment(&o, Some(&pairing(&[("a1", "b1")])), at(30_000), &T, 50);
    // No agent and no kubelet lease seen: judged by Ready alone, never dead by time.
    assert_eq!(input(&a, "a1").verdict, NodeVerdict::Healthy);
    // b1's partner a1 renewed cleanly at 1 s, then went silent: not clear.
    assert_eq!(input(&a, "b1").vouchers_clear_since, None);
}

#[test]
fn excluded_nodes_and_a_fresh_relist_are_not_remediated() {
    let mut o = cluster();
    o.apply_node(
        W::Apply(node(
            "a1",
            "east",
            &[("twosite.dev/exclude-from-remediation", "true")],
        )),
        at(1_000),
    );
    renew_all_but(&mut o, &["a1"], 30_000);
    let p = pairing(&[("a1", "b1")]);
    assert!(input(&core_assessment(&o, Some(&p), at(30_000), &T, 50), "a1").excluded);
    // The agent lease watch breaks and re-lists at 30 s: nobody is dead for 4 s.
    o.apply_agent_lease(W::Init, at(30_000), &T);
    o.apply_agent_lease(
        W::InitApply(agent("b1", "99", "0", "enabled")),
        at(30_000),
        &T,
    );
    o.apply_agent_lease(W::InitDone, at(30_000), &T);
    let a = core_assessment(&o, Some(&p), at(33_000), &T, 50);
    assert_eq!(
        a.pause.as_ref().map(|p| p.reason),
        Some(pause::WATCHES_NOT_SETTLED)
    );
    assert!(a.nodes.iter().all(|n| !n.input.verdict.is_dead()));
    // a1's and b2's leases vanished in the re-list: they count as without agent.
    assert_eq!(o.agent("a1"), None);
    assert!(o.settled(at(34_000), &T));
}

#[test]
fn dead_nodes_in_both_rooms_pause_remediation() {
    let mut o = cluster();
    renew_all_but(&mut o, &["a1", "b2"], 30_000);
    let a = core_assessment(&o, Some(&pairing(&[("a1", "b1")])), at(30_000), &T, 50);
    assert_eq!(
        a.pause.map(|p| p.reason),
        Some(pause::DEAD_NODES_IN_BOTH_ROOMS)
    );
    assert!(a.nodes.iter().all(|n| n.input.paused));
}

#[test]
fn pods_are_counted_without_daemonsets() {
    let pod = |ds: bool, terminating: bool| Pod {
        metadata: ObjectMeta {
            owner_references: ds.then(|| {
                vec![OwnerReference {
                    kind: "DaemonSet".into(),
                    ..OwnerReference::default()
                }]
            }),
            deletion_timestamp: terminating.then_some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
            ),
            ..ObjectMeta::default()
        },
        ..Pod::default()
    };
    assert_eq!(
        pod_counts(
            &[pod(false, false), pod(true, false), pod(false, true)],
            &|_: &str| None
        ),
        (2, 1)
    );
}

/// Pod deletions give way to fence commits: `idle` waits while a commit is in flight and
/// returns once it ends (also when it ends between the count's read and the wait).
#[tokio::test(start_paused = true)]
async fn pod_deletions_wait_while_a_fence_commit_is_in_flight() {
    let commits = FenceCommits::default();
    tokio::time::timeout(Duration::from_millis(1), commits.idle())
        .await
        .expect("idle when nothing is in flight");
    let first = commits.start();
    let second = commits.start();
    let waiting = tokio::spawn({
        let commits = commits.clone();
        async move { commits.idle().await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "a deletion waits for the commits");
    drop(first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "one commit is still in flight");
    drop(second);
    tokio::time::timeout(Duration::from_millis(1), waiting)
        .await
        .expect("idle once the last commit ends")
        .expect("task");
}
