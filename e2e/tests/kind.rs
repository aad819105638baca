//! The kind suite (`e2e/kind`), driven from cargo: `cargo test -p twosite-e2e --features kind`.
//!
//! Each test runs one shell scenario of `e2e/kind/scenarios/` through `e2e/kind/run.sh`
//! against the two-room cluster `e2e/kind/up.sh` made (`CLUSTER`, default `twosite`). The
//! scenarios stop and cut the network of node containers, so they run one at a time, in the
//! order of their names when the whole suite runs (`--test-threads=1` is not needed: a lock
//! serialises them). Without Docker, the cluster or twosite installed, every test fails at once
//! with the reason: the suite never passes without having run.
#![cfg(feature = "kind")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One scenario at a time: they share the cluster and take nodes down.
static CLUSTER: Mutex<()> = Mutex::new(());

fn kind_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kind")
}

/// Fails with a clear message unless Docker, kind, kubectl and the cluster with twosite are
/// there (the same checks as `lib.sh`'s `require_cluster`, so the reason is the same).
fn require_cluster() {
    for tool in ["bash", "docker", "kind", "kubectl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "kind suite: {tool} not found on PATH: the kind tests need Docker, kind and kubectl \
             and the cluster of e2e/kind/up.sh (see e2e/kind/README.md); they never pass without it"
        );
    }
    let check = Command::new("bash")
        .arg("-c")
        .arg("source \"$1\" && require_cluster")
        .arg("require_cluster")
        .arg(kind_dir().join("lib.sh"))
        .output();
    match check {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "kind suite: no cluster to run on: {}(create it with e2e/kind/up.sh; see e2e/kind/README.md)",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(err) => panic!("kind suite: cannot run bash: {err}"),
    }
}

/// Runs `e2e/kind/run.sh <scenario>`, its output passed through; fails on a non-zero exit.
fn scenario(name: &str) {
    let _one = CLUSTER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    require_cluster();
    let status = Command::new("bash")
        .arg(kind_dir().join("run.sh"))
        .arg(name)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("kind scenario {name} failed ({s}); its output is above"),
        Err(err) => panic!("kind scenario {name}: cannot run bash: {err}"),
    }
}

#[test]
fn s00_smoke() {
    scenario("00-smoke");
}

#[test]
fn s01_block_active_standby() {
    scenario("01-block-active-standby");
}

#[test]
fn s02_database() {
    scenario("02-database");
}

#[test]
fn s03_room_power_loss_vms() {
    scenario("03-room-power-loss-vms");
}

#[test]
fn s04_node_loss() {
    scenario("04-node-loss");
}

#[test]
fn s05_partition_with_witness() {
    scenario("05-partition-witness");
}

#[test]
fn s06_partition_without_witness() {
    scenario("06-partition-no-witness");
}

#[test]
fn s07_witness_down() {
    scenario("07-witness-down");
}

#[test]
fn s08_bad_input() {
    scenario("08-bad-input");
}

/// Every scenario file has a test above (a new script without one would never run from cargo).
#[test]
fn every_scenario_has_a_test() {
    let this = include_str!("kind.rs");
    let dir = kind_dir().join("scenarios");
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", dir.display()));
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".sh") {
            assert!(
                this.contains(&format!("scenario(\"{stem}\")")),
                "e2e/kind/scenarios/{name} has no test in e2e/tests/kind.rs"
            );
        }
    }
}
