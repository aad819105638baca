//! The real-API-server tier: leader election between two real `twosite controller` processes
//! over the Lease `twosite-controller` in a real kube-apiserver 1.20.2, under the controller's
//! ServiceAccount and only the RBAC rules of deploy/rbac-controller.yaml.
//!
//! - `leader_failover_between_two_controllers`: exactly one replica leads (Lease holder, the
//!   `twosite_is_leader` metric, `status.leader` of TwoSite `default`), the follower never writes
//!   the status; after a SIGKILL of the leader (no release: a crash) the follower takes over
//!   once the dead leader's lease has expired, not before, and within the expiry plus the retry
//!   periods, and then writes the status as the new leader with the next epoch.
//! - `controller_without_rbac_never_leads`: the same binary under a ServiceAccount without the
//!   controller's bindings is refused (403) by the API server, never takes the Lease and never
//!   writes the status: the rules of deploy/rbac-controller.yaml are what make it work.
//!
//! Build the binary first: `cargo build -p twosite-controller --bin twosite` (same target
//! directory as the test). Without it or the API server the tests print a "skipped" line and
//! pass, unless `TWOSITE_REQUIRE_APISERVER=1`, where they fail.

mod common;

use common::{
    CONTROLLER_BIN, NAMESPACE, Process, Setup, admin_get, lease_holder, metric, metric_series,
    twosite_status, twosites, wait_for, workers,
};
use e2e::apiserver::{self, Identity, Options};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DynamicObject, PostParams};
use node_health::LeaderConfig;
use node_health::time::stretch;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The leader Lease's name (controller/src/leader_lease.rs `LEASE_NAME`).
const LEASE: &str = "twosite-controller";
const IDS: [&str; 2] = ["controller-1", "controller-2"];
const DEADLINE: Duration = Duration::from_secs(60);
/// How much later than the Lease the status may name the new leader: the new leader's first
/// remediation pass (every 500 ms) before its first status write, plus the test's 250 ms
/// polling of both, plus slack for a loaded machine. A failed first write (retried after 1-2 s)
/// does not fit.
const STATUS_LAG: Duration = Duration::from_millis(1500);

/// The two tests of this file run one after the other: the failover timing is measured, and a
/// second API server starting on a 2-core machine meanwhile would only add noise to it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The last lines of every controller's log, for a failing assertion.
fn logs(procs: &[Process]) -> String {
    procs
        .iter()
        .map(|p| {
            format!(
                "--- {} log ---\n{}\n--- {} forbidden ---\n{}",
                p.name,
                p.log_tail(40),
                p.name,
                p.forbidden_lines().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Panics with the logs when a controller that should run has exited.
fn assert_running(procs: &mut [Process], which: &[usize]) {
    for &i in which {
        if let Ok(Some(exit)) = procs[i].child.try_wait() {
            panic!("{} exited with {exit}\n{}", procs[i].name, logs(procs));
        }
    }
}

fn expected_pairs() -> Value {
    json!([{ "a": "a-1", "b": "b-1" }, { "a": "a-2", "b": "b-2" }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_between_two_controllers() {
    const TEST: &str = "leader_failover_between_two_controllers";
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    let setup = Setup {
        binaries: &[CONTROLLER_BIN],
        options: Options::default(),
        rbac: &["rbac-controller.yaml"],
        nodes: &workers(&[
            ("a-1", "room-a"),
            ("a-2", "room-a"),
            ("b-1", "room-b"),
            ("b-2", "room-b"),
        ]),
    };
    let Some((server, admin)) = common::start(TEST, setup).await else {
        return;
    };
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);
    let twosites = twosites(&admin);

    // The timing the controller runs with (run.rs: `LeaderConfig::new(identity)`).
    let config = LeaderConfig::new("any");
    let expiry = stretch(config.lease_duration, config.drift_ppm);
    let retry = config.retry_period;

    let ports = [
        apiserver::free_port().expect("a free port"),
        apiserver::free_port().expect("a free port"),
    ];
    let mut procs = [
        Process::controller(&server, IDS[0], ports[0]),
        Process::controller(&server, IDS[1], ports[1]),
    ];
    let started = Instant::now();

    // 1. Exactly one leads: it holds the Lease, says so on /metrics and in the status.
    let mut last;
    let (leader, follower) = loop {
        assert_running(&mut procs, &[0, 1]);
        let holder = lease_holder(&leases, LEASE).await;
        let status = twosite_status(&twosites).await;
        let leading = [metric(ports[0], "is_leader"), metric(ports[1], "is_leader")];
        if let (Ok((Some(h), _)), Ok(st)) = (&holder, &status)
            && let Some(i) = IDS.iter().position(|id| id == h)
            && st["leader"]["identity"] == *h
            && st["pairs"] == expected_pairs()
            && leading[i] == Some(1.0)
            && leading[1 - i] == Some(0.0)
        {
            break (i, 1 - i);
        }
        last = format!("Lease {holder:?}, is_leader {leading:?}, status {status:?}");
        assert!(
            started.elapsed() < DEADLINE,
            "no single leader within {DEADLINE:?}: {last}\n{}",
            logs(&procs)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "{} leads, {} follows, {:?} after both started",
        IDS[leader],
        IDS[follower],
        started.elapsed()
    );
    assert!(
        metric(ports[leader], "status_writes").is_some_and(|w| w >= 1.0),
        "the leader wrote the status: {:?}",
        metric(ports[leader], "status_writes")
    );

    // Only the leader writes: over 5 s (two and a half election rounds), the follower's writes
    // stay 0, the gauges and the Lease holder do not move.
    let sampling = Instant::now();
    let mut samples = 0;
    while sampling.elapsed() < Duration::from_secs(5) {
        assert_running(&mut procs, &[0, 1]);
        let writes = metric(ports[follower], "status_writes");
        let leading = [
            metric(ports[leader], "is_leader"),
            metric(ports[follower], "is_leader"),
        ];
        let (holder, _) = lease_holder(&leases, LEASE).await.expect("read the Lease");
        assert_eq!(
            writes,
            Some(0.0),
            "the follower {} wrote the status (sample {samples})\n{}",
            IDS[follower],
            logs(&procs)
        );
        assert_eq!(
            leading,
            [Some(1.0), Some(0.0)],
            "is_leader of (leader, follower), sample {samples}\n{}",
            logs(&procs)
        );
        assert_eq!(holder.as_deref(), Some(IDS[leader]), "sample {samples}");
        samples += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let before = twosite_status(&twosites).await.expect("the status");
    assert_eq!(before["leader"]["identity"], IDS[leader], "{before}");
    let epoch_before = before["leader"]["epoch"].as_i64().expect("leader.epoch");
    let (_, transitions_before) = lease_holder(&leases, LEASE).await.expect("read the Lease");
    assert_eq!(
        i64::from(transitions_before),
        epoch_before,
        "status.leader.epoch is the Lease's leaseTransitions"
    );
    println!(
        "{samples} samples over {:?}: only the leader writes",
        sampling.elapsed()
    );

    // 2. The leader crashes: SIGKILL, so it never hands the Lease back.
    procs[leader].kill();
    let killed_at = Instant::now();
    let lease_takeover = loop {
        assert_running(&mut procs, &[follower]);
        let (holder, _) = lease_holder(&leases, LEASE).await.expect("read the Lease");
        if holder.as_deref() == Some(IDS[follower]) {
            break killed_at.elapsed();
        }
        assert_eq!(
            holder.as_deref(),
            Some(IDS[leader]),
            "the crashed leader's Lease was released or taken by someone else"
        );
        assert!(
            killed_at.elapsed() < DEADLINE,
            "{} did not take the Lease over within {DEADLINE:?}\n{}",
            IDS[follower],
            logs(&procs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let after = loop {
        assert_running(&mut procs, &[follower]);
        let status = twosite_status(&twosites).await;
        if let Ok(st) = &status
            && st["leader"]["identity"] == IDS[follower]
        {
            break st.clone();
        }
        assert!(
            killed_at.elapsed() < DEADLINE,
            "status.leader did not become {} within {DEADLINE:?}: {status:?}\n{}",
            IDS[follower],
            logs(&procs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status_takeover = killed_at.elapsed();
    println!(
        "takeover after the SIGKILL: Lease {lease_takeover:?}, status.leader {status_takeover:?}"
    );

    // Upper bound. The follower takes over in the first round in which it has seen the Lease
    // record unchanged for the lease duration stretched by the drift bound (node-health
    // leader.rs `decide`). It first saw the leader's last renewal at its next round after that
    // renewal, at most one retry period later, and the renewal came before the kill; from then
    // it checks once per retry period. So the takeover comes at most stretch(lease) + 2 retry
    // periods after the kill (15.15 s + 4 s); 1 s more for the rounds' own API calls (a round
    // sleeps a retry period after its calls, so the period is a little longer).
    let upper = expiry + retry * 2 + Duration::from_secs(1);
    // Lower bound: the follower waits out the full stretched lease from the moment it saw the
    // record, and it cannot have seen it before the leader wrote it. The leader renews every
    // retry period, so its last renewal came at most one retry period (plus its round's time,
    // 1 s is ample on loopback) before the kill. A takeover sooner than stretch(lease) - retry
    // - 1 s (12.15 s) would mean the follower took a lease that was still live. That is also
    // past the crashed leader's renew deadline (10 s after its last renewal), after which it
    // would have stopped acting even had it only been cut off.
    let lower = expiry
        .saturating_sub(retry)
        .saturating_sub(Duration::from_secs(1));
    assert!(
        lower > config.renew_deadline,
        "the lower bound {lower:?} is past the renew deadline"
    );
    assert!(
        lease_takeover >= lower,
        "the follower took the Lease {lease_takeover:?} after the kill, sooner than {lower:?}: the crashed leader's lease was still live\n{}",
        logs(&procs)
    );
    assert!(
        lease_takeover <= upper,
        "the Lease takeover took {lease_takeover:?}, more than {upper:?} (stretched lease {expiry:?} + 2 x retry {retry:?} + 1 s)\n{}",
        logs(&procs)
    );
    // The status follows the Lease: the new leader writes once its remediation loop has made
    // a pass. (Its first apply used to omit `nodes` and `witness`, and a `grant: null` that
    // server-side apply never counted as owned made it fail with 422: no reconcile may fail.)
    let status_lag = status_takeover.saturating_sub(lease_takeover);
    assert!(
        status_lag <= STATUS_LAG,
        "status.leader followed the Lease {status_lag:?} later, more than {STATUS_LAG:?}\n{}",
        logs(&procs)
    );
    let failed: Vec<String> = procs[follower]
        .log_text()
        .lines()
        .filter(|l| l.contains("pairing reconcile failed"))
        .map(str::to_string)
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed to reconcile after taking over:\n{}",
        IDS[follower],
        failed.join("\n")
    );

    // The new leader: the next epoch, its gauge, and it writes.
    let (_, transitions_after) = lease_holder(&leases, LEASE).await.expect("read the Lease");
    assert_eq!(
        transitions_after,
        transitions_before + 1,
        "leaseTransitions grows by one"
    );
    assert_eq!(after["leader"]["epoch"], epoch_before + 1, "{after}");
    assert_eq!(
        after["pairs"],
        expected_pairs(),
        "the pairs survive the failover"
    );
    let writes = wait_for(
        "the new leader's gauge and writes",
        Duration::from_secs(5),
        || async {
            let leading = metric(ports[follower], "is_leader");
            let writes = metric(ports[follower], "status_writes");
            match (leading, writes) {
                (Some(l), Some(w)) if l == 1.0 && w > 0.0 => Ok(w),
                _ => Err(format!("is_leader {leading:?}, status_writes {writes:?}")),
            }
        },
    )
    .await;
    println!(
        "{} wrote the status {writes} time(s) since it took over",
        IDS[follower]
    );
    assert_eq!(admin_get(ports[follower], "/readyz"), Some(200));
    assert_running(&mut procs, &[follower]);

    for p in &procs {
        let forbidden = p.forbidden_lines();
        assert!(
            forbidden.is_empty(),
            "the API server refused {} (RBAC in deploy/rbac-controller.yaml):\n{}",
            p.name,
            forbidden.join("\n")
        );
    }
    drop(procs);
    drop(server);
    println!("{TEST} passed in {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_without_rbac_never_leads() {
    const TEST: &str = "controller_without_rbac_never_leads";
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    // A ServiceAccount in the controller's namespace that no binding of deploy/ names.
    let intruder = Identity::service_account(NAMESPACE, "twosite-intruder");
    let mut options = Options::default();
    options.identities.push(intruder.clone());
    let setup = Setup {
        binaries: &[CONTROLLER_BIN],
        options,
        rbac: &["rbac-controller.yaml"],
        nodes: &workers(&[("a-1", "room-a"), ("b-1", "room-b")]),
    };
    let Some((server, admin)) = common::start(TEST, setup).await else {
        return;
    };
    // The TwoSite exists, so a controller allowed to would write its status at once.
    let twosites = twosites(&admin);
    let ts: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "twosite.dev/v1alpha1",
        "kind": "TwoSite",
        "metadata": { "name": "default" },
        "spec": {},
    }))
    .expect("a TwoSite");
    twosites
        .create(&PostParams::default(), &ts)
        .await
        .expect("create TwoSite default");

    let kubeconfig = server
        .kubeconfig(&intruder.user)
        .expect("the intruder's kubeconfig")
        .to_path_buf();
    let port = apiserver::free_port().expect("a free port");
    let mut procs = [Process::controller_with_kubeconfig(
        &server,
        &kubeconfig,
        "intruder",
        port,
    )];
    let started = Instant::now();

    // Three refused election rounds (one per retry period) at the least.
    let series = r#"twosite_leader_election_errors_total{error="forbidden"}"#;
    let refused = wait_for(
        "three refused election rounds",
        Duration::from_secs(20),
        || {
            let running = procs[0]
                .child
                .try_wait()
                .map(|s| s.is_none())
                .unwrap_or(true);
            async move {
                if !running {
                    return Ok(-1.0);
                }
                match metric_series(port, series) {
                    Some(n) if n >= 3.0 => Ok(n),
                    other => Err(format!("{series} = {other:?}")),
                }
            }
        },
    )
    .await;
    assert_running(&mut procs, &[0]);
    println!(
        "{refused} election rounds refused {:?} after the start",
        started.elapsed()
    );

    let leases: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);
    assert_eq!(
        lease_holder(&leases, LEASE).await.expect("read the Lease"),
        (None, 0),
        "nobody took the leader Lease"
    );
    assert_eq!(metric(port, "is_leader"), Some(0.0));
    assert_eq!(metric(port, "status_writes"), Some(0.0));
    let status = twosites
        .get("default")
        .await
        .expect("get TwoSite default")
        .data["status"]
        .clone();
    assert!(status.is_null(), "the status was written: {status}");
    // Its Node and Lease watches are refused too: it never reports ready.
    assert_eq!(admin_get(port, "/readyz"), Some(503));

    let forbidden = procs[0].forbidden_lines();
    let text = forbidden.join("\n");
    assert!(
        forbidden
            .iter()
            .any(|l| l.contains("leader election round failed") && l.contains("leases")),
        "no 403 on the leader Lease in the log:\n{text}\n{}",
        logs(&procs)
    );
    assert!(
        forbidden.iter().any(|l| l.contains("nodes")),
        "no 403 on the Node watch in the log:\n{text}"
    );
    println!(
        "{} forbidden line(s), e.g.\n{}",
        forbidden.len(),
        forbidden.first().map_or("", String::as_str)
    );
    drop(procs);
    drop(server);
    println!("{TEST} passed in {:?}", t0.elapsed());
}
