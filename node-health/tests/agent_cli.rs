//! The `twosite-agent` binary's flags.
#![cfg(feature = "agent")]

use std::process::Command;

/// A key directory with a usable key.
fn key_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("current"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .expect("key");
    dir
}

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twosite-agent"));
    for var in [
        "NODE_NAME",
        "NODE_ZONE",
        "POD_NAMESPACE",
        "KUBECONFIG",
        "CLUSTER_NAME",
    ] {
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
fn the_test_watchdog_file_without_acknowledging_no_fencing_is_refused() {
    let out = agent()
        .args(["--node-name", "a-1", "--room", "room-a"])
        .args(["--test-watchdog-file", "/tmp/twosite-test-watchdog"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--test-watchdog-file"), "{stderr}");
    assert!(stderr.contains("--i-understand-no-fencing"), "{stderr}");
}

#[test]
fn a_regular_file_as_watchdog_device_is_refused() {
    let keys = key_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("watchdog");
    std::fs::write(&file, b"").expect("write");
    let out = agent()
        .args([
            "--node-name",
            "a-1",
            "--room",
            "room-a",
            "--watchdog-device",
        ])
        .arg(&file)
        .arg("--peer-key-dir")
        .arg(keys.path())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a watchdog device"), "{stderr}");
    assert_eq!(
        std::fs::metadata(&file).expect("file").len(),
        0,
        "never fed"
    );
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
            "--insecure-peer-probes",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WITHOUT a watchdog"), "{stderr}");
    assert!(stderr.contains("INSECURE PEER PROBES"), "{stderr}");
    assert!(stderr.contains("/nonexistent/boot_id"), "{stderr}");
}

const BASE: [&str; 4] = ["--node-name", "a-1", "--room", "room-a"];

/// Runs the agent with `args` after the base flags; expects exit 2 naming `flag`.
fn refused(args: &[&str], envs: &[(&str, &str)], flag: &str) {
    let out = agent()
        .args(BASE)
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(flag), "{args:?}: {stderr}");
}

#[test]
fn witness_flags_that_do_not_go_together_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("write");
    let token = token.to_str().expect("utf-8");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("write");
    let empty = empty.to_str().expect("utf-8");
    let url = "https://witness.example:8443";

    refused(
        &["--witness-url", url, "--witness-token-file", token],
        &[],
        "--cluster-name",
    );
    refused(
        &["--witness-url", url, "--cluster-name", "prod"],
        &[],
        "--witness-token-file",
    );
    refused(
        &["--witness-url", url, "--witness-token-file", empty],
        &[("CLUSTER_NAME", "prod")],
        "--witness-token-file",
    );
    refused(
        &[
            "--witness-url",
            url,
            "--cluster-name",
            "prod",
            "--witness-token-file",
            "/nonexistent/t",
        ],
        &[],
        "/nonexistent/t",
    );
    refused(
        &[
            "--witness-url",
            "witness.example:8443",
            "--cluster-name",
            "prod",
            "--witness-token-file",
            token,
        ],
        &[],
        "--witness-url",
    );
    refused(
        &[
            "--witness-url",
            url,
            "--cluster-name",
            "a/b",
            "--witness-token-file",
            token,
        ],
        &[],
        "--cluster-name",
    );
    refused(
        &[
            "--witness-url",
            url,
            "--cluster-name",
            "prod",
            "--witness-token-file",
            token,
            "--witness-ca-file",
            "/nonexistent/ca.crt",
        ],
        &[],
        "--witness-ca-file",
    );
    refused(&["--witness-token-file", token], &[], "--witness-url");
}

#[test]
fn a_complete_witness_configuration_gets_past_the_flag_checks() {
    let keys = key_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("write");
    // CLUSTER_NAME from the environment; with no cluster to talk to it fails later (exit 1).
    let out = agent()
        .args(BASE)
        .args([
            "--no-watchdog",
            "--i-understand-no-fencing",
            "--boot-id-file",
            "/nonexistent/boot_id",
            "--witness-url",
            "http://127.0.0.1:1",
            "--witness-token-file",
        ])
        .arg(&token)
        .arg("--peer-key-dir")
        .arg(keys.path())
        .env("CLUSTER_NAME", "prod")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/boot_id"), "{stderr}");
    assert!(
        !stderr.contains("s3cret"),
        "the token is never logged: {stderr}"
    );
}

#[test]
fn the_agent_refuses_to_start_without_a_usable_peer_key() {
    let empty = tempfile::tempdir().expect("tempdir");
    let short = tempfile::tempdir().expect("tempdir");
    std::fs::write(short.path().join("current"), "too short\n").expect("key");
    for (dir, says) in [
        (empty.path(), "No such file"),
        (short.path(), "at least 32 are required"),
    ] {
        let out = agent()
            .args(BASE)
            .args([
                "--no-watchdog",
                "--i-understand-no-fencing",
                "--peer-key-dir",
            ])
            .arg(dir)
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no usable peer key"), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(
            !stderr.contains("too short"),
            "the key is never printed: {stderr}"
        );
    }
}

#[test]
fn insecure_peer_probes_without_acknowledging_no_fencing_are_refused() {
    let out = agent()
        .args(BASE)
        .args(["--insecure-peer-probes"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--insecure-peer-probes lets anyone"),
        "{stderr}"
    );
}
