//! The Lease shell against a mock API server: create a missing Lease, acquire a free one with
//! the resourceVersion precondition, lose the race on 409, wait for a live holder.

mod common;

use common::*;
use controller::leader_lease::RoundOutcome;
use controller::metrics::Metrics;
use controller::pairing::{Outcome, reconcile_pairing};
use http::Method;
use node_health::NodeFacts;
use serde_json::json;
use std::sync::Arc;

#[tokio::test]
async fn a_missing_lease_is_created_and_makes_us_leader() {
    let (client, mut api) = mock_client();
    let shell = lease_shell(client, Arc::new(Metrics::new()));
    let round = spawn_round(&shell);

    api.expect(Method::GET, LEASE_PATH).await.respond_status(
        404,
        "NotFound",
        "leases \"twosite-controller\" not found",
    );
    let create = api.expect(Method::POST, LEASES_PATH).await;
    let body = create.body.clone();
    assert_eq!(body["metadata"]["name"], "twosite-controller");
    assert_eq!(body["metadata"]["namespace"], NAMESPACE);
    assert!(
        body["metadata"].get("resourceVersion").is_none(),
        "a create carries no precondition"
    );
    assert_eq!(body["spec"]["holderIdentity"], ME);
    assert_eq!(body["spec"]["leaseTransitions"], 0);
    assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
    assert!(body["spec"]["acquireTime"].is_string());
    assert!(body["spec"]["renewTime"].is_string());
    create.respond(201, stored(body, "1"));

    let outcome = round.await.expect("joined").expect("round succeeds");
    assert_eq!(outcome, RoundOutcome::Created);
    assert!(shell.leadership().is_leader());
    assert_eq!(shell.leadership().epoch(), Some(0));
}

#[tokio::test]
async fn a_free_lease_is_acquired_with_the_resource_version_precondition() {
    let (client, mut api) = mock_client();
    let shell = lease_shell(client, Arc::new(Metrics::new()));
    let round = spawn_round(&shell);

    api.expect(Method::GET, LEASE_PATH)
        .await
        .respond(200, lease(None, 2, "41"));
    let replace = api.expect(Method::PUT, LEASE_PATH).await;
    let body = replace.body.clone();
    assert_eq!(
        body["metadata"]["resourceVersion"], "41",
        "the precondition is the last-seen resourceVersion"
    );
    assert_eq!(body["spec"]["holderIdentity"], ME);
    assert_eq!(
        body["spec"]["leaseTransitions"], 3,
        "a new term, a new epoch"
    );
    assert_ne!(
        body["spec"]["acquireTime"], "2026-11-01T10:00:00.000000Z",
        "a new term sets acquireTime"
    );
    replace.respond(200, stored(body, "42"));

    assert_eq!(
        round.await.expect("joined").expect("round"),
        RoundOutcome::Wrote
    );
    assert!(shell.leadership().is_leader());
    assert_eq!(shell.leadership().epoch(), Some(3));

    // The next round renews: same epoch, acquireTime kept, precondition the new version.
    let round = spawn_round(&shell);
    let mut ours = lease(Some(ME), 3, "42");
    ours["spec"]["acquireTime"] = json!("2026-11-01T10:00:07.000000Z");
    api.expect(Method::GET, LEASE_PATH).await.respond(200, ours);
    let renew = api.expect(Method::PUT, LEASE_PATH).await;
    assert_eq!(renew.body["metadata"]["resourceVersion"], "42");
    assert_eq!(renew.body["spec"]["leaseTransitions"], 3);
    assert_eq!(
        renew.body["spec"]["acquireTime"],
        "2026-11-01T10:00:07.000000Z"
    );
    let body = renew.body.clone();
    renew.respond(200, stored(body, "43"));
    assert_eq!(
        round.await.expect("joined").expect("round"),
        RoundOutcome::Wrote
    );
    assert!(shell.leadership().is_leader());
}

#[tokio::test]
async fn a_conflict_means_not_leader_and_no_status_write() {
    let (client, mut api) = mock_client();
    let shell = lease_shell(client.clone(), Arc::new(Metrics::new()));
    let round = spawn_round(&shell);

    api.expect(Method::GET, LEASE_PATH)
        .await
        .respond(200, lease(Some(""), 5, "77"));
    let replace = api.expect(Method::PUT, LEASE_PATH).await;
    assert_eq!(replace.body["metadata"]["resourceVersion"], "77");
    replace.respond_status(
        409,
        "Conflict",
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"twosite-controller\": \
         the object has been modified; please apply your changes to the latest version and try again",
    );
    assert_eq!(
        round
            .await
            .expect("joined")
            .expect("a conflict is an outcome"),
        RoundOutcome::Conflicted
    );
    assert!(!shell.leadership().is_leader());

    // The pairing reconciler of this replica neither reads nor writes anything.
    let ctx = pairing_context(client, shell.leadership().clone(), Arc::new(Metrics::new()));
    let nodes = [NodeFacts {
        name: "a1".into(),
        zone: Some("east".into()),
        control_plane: false,
        ready: true,
    }];
    let outcome = reconcile_pairing(&ctx, &nodes).await.expect("reconcile");
    assert_eq!(outcome, Outcome::NotLeader);
    api.expect_nothing().await;
}

#[tokio::test]
async fn a_live_holder_is_waited_for() {
    let (client, mut api) = mock_client();
    let shell = lease_shell(client, Arc::new(Metrics::new()));
    let round = spawn_round(&shell);
    api.expect(Method::GET, LEASE_PATH)
        .await
        .respond(200, lease(Some("ctl-1"), 4, "9"));
    assert_eq!(
        round.await.expect("joined").expect("round"),
        RoundOutcome::Waited
    );
    api.expect_nothing().await;
    assert!(!shell.leadership().is_leader());
}

#[tokio::test]
async fn a_lost_create_race_means_not_leader() {
    let (client, mut api) = mock_client();
    let shell = lease_shell(client, Arc::new(Metrics::new()));
    let round = spawn_round(&shell);
    api.expect(Method::GET, LEASE_PATH)
        .await
        .respond_status(404, "NotFound", "not found");
    api.expect(Method::POST, LEASES_PATH).await.respond_status(
        409,
        "AlreadyExists",
        "leases.coordination.k8s.io \"twosite-controller\" already exists",
    );
    assert_eq!(
        round.await.expect("joined").expect("round"),
        RoundOutcome::Conflicted
    );
    assert!(!shell.leadership().is_leader());
}

#[tokio::test]
async fn a_failed_write_is_an_error_and_not_leadership() {
    let (client, mut api) = mock_client();
    let shell = lease_shell(client, Arc::new(Metrics::new()));
    let round = spawn_round(&shell);
    api.expect(Method::GET, LEASE_PATH)
        .await
        .respond(200, lease(None, 0, "5"));
    api.expect(Method::PUT, LEASE_PATH)
        .await
        .respond_status(500, "InternalError", "etcd is sad");
    let err = round.await.expect("joined").expect_err("a 500 is an error");
    assert_eq!(err.metric_label(), "api");
    assert!(!shell.leadership().is_leader());
}
