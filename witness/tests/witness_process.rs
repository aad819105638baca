//! The real witness process: grants over HTTP, a SIGKILL and a restart on the same state file,
//! every kind of bad input, and the refusals at start.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::time::{Duration, Instant};

const GRANT: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_secs(1);

fn flags() -> Vec<&'static str> {
    vec![
        "--insecure-http",
        "--grant-duration-secs",
        "2",
        "--handover-margin-secs",
        "1",
    ]
}

fn outcome(a: &Answer) -> (String, u64) {
    assert_eq!(a.status, 200, "{a:?}");
    let j = a.json();
    (
        j["outcome"].as_str().unwrap().to_string(),
        j["epoch"].as_u64().unwrap(),
    )
}

#[test]
fn grants_survive_a_kill_and_every_bad_input_is_refused() {
    let site = Site::new();
    let east = r#"{"room":"east","api_reachable":true}"#;
    let west = r#"{"room":"west","api_reachable":true}"#;

    // --- first life: east is granted epoch 1, west is held ---
    let w = site.start(&flags(), "first.log");
    let a = claim(w.addr, "factory", FACTORY_TOKEN, east);
    assert_eq!(outcome(&a), ("granted".into(), 1), "{a:?}");
    assert_eq!(a.json()["valid_for_ms"], 2000);
    let on_disk = site.state_json();
    assert_eq!(on_disk["clusters"]["factory"]["epoch"], 1);
    assert_eq!(
        on_disk["clusters"]["factory"]["holder"],
        serde_json::json!(["east", 1])
    );
    let b = claim(w.addr, "factory", FACTORY_TOKEN, west);
    assert_eq!(outcome(&b), ("held".into(), 1), "{b:?}");
    assert_eq!(b.json()["holder"], "east");
    // Another cluster has its own epochs.
    let c = claim(w.addr, "campus", CAMPUS_TOKEN, west);
    assert_eq!(outcome(&c), ("granted".into(), 1), "{c:?}");
    w.kill();

    // --- second life on the same state file ---
    let w = site.start(&flags(), "second.log");
    let b = claim(w.addr, "factory", FACTORY_TOKEN, west);
    assert_eq!(
        outcome(&b),
        ("held".into(), 1),
        "right after a restart east's grant is assumed live: {b:?}"
    );
    assert_eq!(b.json()["holder"], "east");
    let deadline = Instant::now() + Duration::from_secs(20);
    let granted_epoch = loop {
        let b = claim(w.addr, "factory", FACTORY_TOKEN, west);
        let (what, epoch) = outcome(&b);
        if what == "granted" {
            break epoch;
        }
        assert!(Instant::now() < deadline, "west never granted: {b:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        w.started.elapsed() >= GRANT + MARGIN,
        "west was granted {:?} after the restart, before east's grant and the margin ran out",
        w.started.elapsed()
    );
    assert_eq!(
        granted_epoch, 2,
        "a restarted witness never reissues epoch 1"
    );
    assert_eq!(
        site.state_json()["clusters"]["factory"]["holder"],
        serde_json::json!(["west", 2])
    );
    assert_eq!(site.state_json()["clusters"]["campus"]["epoch"], 1);
    let state_before_bad_input = std::fs::read(site.state()).unwrap();

    // --- bad input against the running process ---
    let claim_path = "/v1/clusters/factory/claim";
    let stale = claim(
        w.addr,
        "factory",
        FACTORY_TOKEN,
        r#"{"room":"east","epoch":1}"#,
    );
    assert_eq!(stale.status, 409, "{stale:?}");
    assert!(stale.error().contains("stale"), "{stale:?}");
    let unknown_epoch = claim(
        w.addr,
        "factory",
        FACTORY_TOKEN,
        r#"{"room":"west","epoch":9}"#,
    );
    assert_eq!(unknown_epoch.status, 409, "{unknown_epoch:?}");
    assert!(
        unknown_epoch.error().contains("never issued"),
        "{unknown_epoch:?}"
    );

    let wrong = claim(w.addr, "factory", CAMPUS_TOKEN, west);
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert!(
        wrong.headers.contains("www-authenticate: bearer"),
        "{wrong:?}"
    );
    let unknown_cluster = claim(w.addr, "nowhere", FACTORY_TOKEN, west);
    assert_eq!(unknown_cluster.status, 401, "{unknown_cluster:?}");
    assert_eq!(
        unknown_cluster.body, wrong.body,
        "an unknown cluster looks like a wrong token"
    );
    let missing = request(w.addr, "POST", claim_path, None, west.as_bytes());
    assert_eq!(missing.status, 401, "{missing:?}");
    assert!(
        missing.error().contains("missing bearer token"),
        "{missing:?}"
    );

    let malformed = claim(w.addr, "factory", FACTORY_TOKEN, r#"{"room": "east""#);
    assert_eq!(malformed.status, 400, "{malformed:?}");
    assert!(
        malformed.error().starts_with("bad claim: "),
        "{malformed:?}"
    );
    let typo = claim(
        w.addr,
        "factory",
        FACTORY_TOKEN,
        r#"{"room":"east","epok":2}"#,
    );
    assert_eq!(typo.status, 400, "{typo:?}");
    assert!(typo.error().contains("unknown field `epok`"), "{typo:?}");
    let bad_room = claim(w.addr, "factory", FACTORY_TOKEN, r#"{"room":"East Wing"}"#);
    assert_eq!(bad_room.status, 400, "{bad_room:?}");
    assert!(bad_room.error().contains("room name"), "{bad_room:?}");
    // East claims (held), so the cluster has two rooms; a third is refused.
    let east_again = claim(w.addr, "factory", FACTORY_TOKEN, east);
    assert_eq!(outcome(&east_again).0, "held", "{east_again:?}");
    let third = claim(w.addr, "factory", FACTORY_TOKEN, r#"{"room":"north"}"#);
    assert_eq!(third.status, 400, "{third:?}");
    assert!(third.error().contains("neither"), "{third:?}");

    let mut big = br#"{"room":"east","pad":""#.to_vec();
    big.resize(5000, b'x');
    big.extend_from_slice(br#""}"#);
    let too_big = request(w.addr, "POST", claim_path, Some(FACTORY_TOKEN), &big);
    assert_eq!(too_big.status, 413, "{too_big:?}");
    assert!(too_big.error().contains("4096"), "{too_big:?}");

    let health = request(w.addr, "GET", "/healthz", None, b"");
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));

    // --- operators' view ---
    let no_token = request(w.addr, "GET", "/v1/state", None, b"");
    assert_eq!(no_token.status, 401);
    let bad_token = request(w.addr, "GET", "/v1/state", Some("not-a-token-at-all"), b"");
    assert_eq!(bad_token.status, 401);
    let view = request(w.addr, "GET", "/v1/state", Some(CAMPUS_TOKEN), b"");
    assert_eq!(view.status, 200, "{view:?}");
    let factory = &view.json()["clusters"]["factory"];
    assert_eq!(factory["epoch"], 2);
    assert_eq!(
        factory["holder"],
        serde_json::json!({"room": "west", "epoch": 2, "live": true})
    );
    assert!(
        factory["presence_ms"]["west"].as_u64().is_some(),
        "{view:?}"
    );
    assert!(
        factory["presence_ms"]["east"].as_u64().is_some(),
        "{view:?}"
    );
    assert!(
        !view.body.contains(FACTORY_TOKEN) && !view.body.contains(CAMPUS_TOKEN),
        "{view:?}"
    );

    // Nothing of that changed the state file.
    assert_eq!(std::fs::read(site.state()).unwrap(), state_before_bad_input);
    let log = w.log();
    assert!(log.contains("granted the right to run"), "{log}");
    assert!(!log.contains(FACTORY_TOKEN), "tokens never reach the log");
}

#[test]
fn refuses_plain_http_unless_acknowledged() {
    let site = Site::new();
    let mut args = site.base_args();
    args.extend(["--listen".into(), free_addr().to_string()]);
    let (status, stderr) = site.run_to_exit(&args);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--insecure-http"), "{stderr}");
    assert!(!site.state().exists());
}

#[test]
fn refuses_a_malformed_tokens_file_naming_the_line() {
    let site = Site::new();
    write(
        &site.path("tokens"),
        &format!("# tokens\nfactory {FACTORY_TOKEN}\ncampus\n"),
    );
    let mut args = site.base_args();
    args.extend([
        "--insecure-http".into(),
        "--listen".into(),
        free_addr().to_string(),
    ]);
    let (status, stderr) = site.run_to_exit(&args);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 3"), "{stderr}");
    assert!(stderr.contains("CLUSTER_NAME TOKEN"), "{stderr}");
}

#[test]
fn refuses_a_corrupt_state_file_and_leaves_it_alone() {
    let site = Site::new();
    let corrupt = r#"{"version":1,"clusters":{"factory":{"epoch":"#;
    write(&site.state(), corrupt);
    let mut args = site.base_args();
    args.extend([
        "--insecure-http".into(),
        "--listen".into(),
        free_addr().to_string(),
    ]);
    let (status, stderr) = site.run_to_exit(&args);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("corrupt"), "{stderr}");
    assert_eq!(std::fs::read_to_string(site.state()).unwrap(), corrupt);
}

#[test]
fn a_second_witness_on_the_same_state_file_refuses_and_sigterm_stops_cleanly() {
    let site = Site::new();
    let mut first = site.start(&flags(), "first.log");
    let mut args = site.base_args();
    args.extend([
        "--insecure-http".into(),
        "--listen".into(),
        free_addr().to_string(),
    ]);
    let (status, stderr) = site.run_to_exit(&args);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another witness"), "{stderr}");

    // SAFETY: signalling our own child process by its pid.
    let pid = libc::pid_t::try_from(first.child.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = first.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", first.log());
}
