//! `twosite simulate` through the real binary: output shape and exit statuses.

use std::process::Command;

fn twosite(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twosite"))
        .args(args)
        .output()
        .expect("run twosite");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn default_json_has_the_promised_shape_and_a_dead_verdict() {
    let (code, out, err) = twosite(&["simulate", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("exactly one JSON object");
    assert_eq!(v["scenario"], "node-loss");
    assert_eq!(v["seed"], 1);
    assert_eq!(v["schedules"], 1);
    assert_eq!(v["violations"].as_array().map(Vec::len), Some(0));
    let dead = v["figures"]["time_to_dead_verdict_ms"]
        .as_u64()
        .expect("dead verdict figure");
    assert!(dead > 0 && dead <= 15_000, "{dead}");
    assert_eq!(v["figures"]["pairs"], 3);
    let timeline = v["timeline"].as_array().expect("timeline");
    assert!(timeline.iter().any(|e| e["actor"].is_string()
        && e["t_ms"].is_u64()
        && e["event"] == "verdict a-2: Suspect -> Dead"));
}

#[test]
fn text_output_has_timeline_and_summary() {
    let (code, out, _) = twosite(&["simulate", "--scenario", "smallest", "--seed", "3"]);
    assert_eq!(code, 0);
    assert!(out.contains("power off b-1"), "{out}");
    assert!(out.contains("no invariant violated"), "{out}");
}

#[test]
fn schedules_summarise_without_violations() {
    let (code, out, err) = twosite(&["simulate", "--schedules", "20", "--seed", "5", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["schedules"], 20);
    assert_eq!(v["figures"]["failing_schedules"], 0);
}

#[test]
fn bad_arguments_exit_2_and_name_the_argument() {
    for (args, needle) in [
        (vec!["simulate", "--scenario", "nope"], "--scenario"),
        (vec!["simulate", "--seed", "x"], "--seed"),
        (vec!["simulate", "--schedules", "0"], "--schedules"),
        (vec!["simulate", "--frobnicate"], "--frobnicate"),
        (
            vec!["simulate", "--schedules", "3", "--scenario", "room-loss"],
            "--scenario",
        ),
    ] {
        let (code, _, err) = twosite(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn list_names_every_scenario() {
    let (code, out, _) = twosite(&["simulate", "--list"]);
    assert_eq!(code, 0);
    for name in ["node-loss", "room-loss", "partition", "random"] {
        assert!(out.contains(name), "{out}");
    }
}

#[test]
fn compare_node_loss_json_through_the_binary() {
    let (code, out, err) = twosite(&["simulate", "--compare", "--scenario", "node-loss", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("exactly one JSON object");
    assert_eq!(v["seed"], 1);
    assert!(v["schedules"].is_null());
    let scenarios = v["scenarios"].as_array().expect("scenarios");
    assert_eq!(scenarios.len(), 1);
    assert_eq!(scenarios[0]["scenario"], "node-loss");
    assert_eq!(scenarios[0]["target"], "a-2");
    let policies = scenarios[0]["policies"].as_array().expect("policies");
    let names: Vec<&str> = policies
        .iter()
        .filter_map(|p| p["policy"].as_str())
        .collect();
    assert_eq!(names, ["twosite", "k8s-alone", "nhc-snr", "configmap-lock"]);
    let twosite = policies[0]["elsewhere_ms"]
        .as_u64()
        .expect("twosite fails over");
    assert!(twosite <= 30_000, "{twosite}");
    assert_eq!(policies[1]["elsewhere_ms"], "never");
    assert_eq!(policies[1]["elsewhere_ratio"], "never");
    assert!(
        policies[0]["violations"]
            .as_object()
            .is_some_and(|m| m.is_empty())
    );
}

#[test]
fn compare_refuses_an_unknown_scenario() {
    let (code, _, err) = twosite(&["simulate", "--compare", "--scenario", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown --scenario"), "{err}");
}
