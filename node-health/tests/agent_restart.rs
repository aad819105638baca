//! The real `twosite-agent` process resuming from a state file left by a previous agent process
//! of the same boot, with an API server that never answers: it feeds the test watchdog file at
//! once, stops at the inherited deadline, and a process started after that never feeds.
#![cfg(all(feature = "agent", target_os = "linux"))]

use node_health::agentd::state::{BootClock, FORMAT_VERSION, SavedState, StateFile};
use node_health::{Clock, LossReason};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Files {
    _dir: tempfile::TempDir,
    boot_id: PathBuf,
    state: PathBuf,
    watchdog: PathBuf,
    stops: PathBuf,
    kubeconfig: PathBuf,
    dir: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let f = Files {
        boot_id: path.join("boot_id"),
        state: path.join("run/agent-state.json"),
        watchdog: path.join("watchdog"),
        stops: path.join("stops"),
        kubeconfig: path.join("kubeconfig"),
        dir: path,
        _dir: dir,
    };
    std::fs::write(&f.boot_id, "boot-test-1\n").expect("boot id");
    std::fs::create_dir(f.dir.join("peer-key")).expect("key dir");
    std::fs::write(
        f.dir.join("peer-key/current"),
        "a test peer key of more than 32 bytes\n",
    )
    .expect("peer key");
    // An API server that refuses every connection: nothing is ever renewed.
    std::fs::write(
        &f.kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: \
         http://127.0.0.1:1\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  \
         context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
    )
    .expect("kubeconfig");
    f
}

fn start(f: &Files, run: u32) -> Child {
    let log = std::fs::File::create(f.dir.join(format!("agent-{run}.log"))).expect("log");
    Command::new(env!("CARGO_BIN_EXE_twosite-agent"))
        .args(["--node-name", "a-1", "--room", "room-a"])
        .args(["--peer-addr", "127.0.0.1:0", "--i-understand-no-fencing"])
        .arg("--test-watchdog-file")
        .arg(&f.watchdog)
        .arg("--boot-id-file")
        .arg(&f.boot_id)
        .arg("--state-file")
        .arg(&f.state)
        .arg("--peer-key-dir")
        .arg(f.dir.join("peer-key"))
        .arg("--stop-command")
        .arg(format!("echo stopped >> '{}'", f.stops.display()))
        .env("KUBECONFIG", &f.kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("NODE_NAME")
        .env_remove("NODE_ZONE")
        .env_remove("POD_NAMESPACE")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the agent starts")
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Polls `cond` every 50 ms for up to `limit`.
fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_restarted_agent_feeds_at_once_stops_at_the_inherited_deadline_and_stays_lost() {
    let f = files();
    let boot = BootClock::new().expect("CLOCK_BOOTTIME");
    let now = boot.now().as_millis();
    // The previous process renewed 4 s ago and had armed the watchdog: 3.92 s of right remain.
    let previous = SavedState {
        version: FORMAT_VERSION,
        boot_id: "boot-test-1".into(),
        node: "a-1".into(),
        room: "room-a".into(),
        written_at_boot_ms: now,
        renewed_at_boot_ms: Some(now - 4_000),
        armed: true,
        lost: None,
        fence_marker: false,
        watchdog_failed: false,
        renew_failures: 0,
        other_room_seen_at_boot_ms: None,
        other_room_heard: false,
        witness_grant: None,
    };
    let state = StateFile::new(&f.state);
    state.write(&previous).expect("write the state file");

    let agent = start(&f, 1);
    wait_for(Duration::from_secs(3), "a feed before any renewal", || {
        size(&f.watchdog) > 0
    });
    wait_for(Duration::from_secs(10), "the loss on file", || {
        state
            .read()
            .ok()
            .flatten()
            .is_some_and(|s| s.lost.is_some())
    });
    let lost_at = boot.now().as_millis();
    assert!(
        lost_at >= now + 3_920,
        "lost {} ms after the inherited renewal, before its deadline",
        lost_at - (now - 4_000)
    );
    let saved = state.read().expect("read").expect("state");
    assert_eq!(saved.lost, Some(LossReason::LeaseExpired));
    let renewed = saved.renewed_at_boot_ms.expect("inherited");
    assert!(
        (now - 4_010..=now - 4_000).contains(&renewed),
        "handed on rounded to the earlier side, never later: {renewed} vs {}",
        now - 4_000
    );
    wait_for(Duration::from_secs(10), "the workloads stopped", || {
        size(&f.stops) > 0
    });
    let fed = size(&f.watchdog);
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(size(&f.watchdog), fed, "no feed after the loss");
    stop(agent);

    // The next process inherits the loss: it stops the workloads again and never feeds.
    let agent = start(&f, 2);
    wait_for(Duration::from_secs(10), "the stop repeated", || {
        std::fs::read_to_string(&f.stops).is_ok_and(|s| s.lines().count() == 2)
    });
    std::thread::sleep(Duration::from_millis(1_000));
    stop(agent);
    assert_eq!(size(&f.watchdog), fed, "the second process never fed");
    let log = std::fs::read_to_string(f.dir.join("agent-2.log")).expect("log");
    assert!(
        log.contains("had lost the right to run"),
        "the log says why: {log}"
    );
}
