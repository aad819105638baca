//! The `twosite-agent` binary's flags.
#![cfg(feature = "agent")]

use std::process::Command;

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twosite-agent"));
    for var in ["NODE_NAME", "NODE_ZONE", "POD_NAMESPACE", "KUBECONFIG"] {
        cmd.env_remove(var);
    }
    cmd
}

#[test]
fn no_watchdog_without_acknowledging_no_fencing_is_refused() {
    let out = agent()
        .args(["--node-name", "a-1", "--room", "room-a", "--no-watchdog"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--i-understand-no-fencing"), "{stderr}");
}

#[test]
fn the_node_name_is_required() {
    let out = agent().output().expect("runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--node-name"), "{stderr}");
}

#[test]
fn acknowledged_no_watchdog_gets_past_the_check() {
    // With no cluster to talk to it fails later (exit 1), not at the fencing check (exit 2).
    let out = agent()
        .args([
            "--node-name",
            "a-1",
            "--room",
            "room-a",
            "--no-watchdog",
            "--i-understand-no-fencing",
            "--boot-id-file",
            "/nonexistent/boot_id",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WITHOUT a watchdog"), "{stderr}");
    assert!(stderr.contains("/nonexistent/boot_id"), "{stderr}");
}
