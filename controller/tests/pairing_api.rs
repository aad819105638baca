//! The pairing reconciler against a mock API server: the status is server-side applied to
//! `/status` with the expected pairs, only when it changed, and a missing `default` TwoSite is
//! created first.

mod common;

use common::*;
use controller::crd::TwoSite;
use controller::metrics::Metrics;
use controller::pairing::{Context, Outcome};
use controller::status::{StatusInput, desired_status};
use http::Method;
use node_health::NodeFacts;
use serde_json::{Value, json};
use std::sync::Arc;

fn worker(name: &str, zone: &str) -> NodeFacts {
    NodeFacts {
        name: name.into(),
        zone: Some(zone.into()),
        control_plane: false,
        ready: true,
    }
}

/// A context whose replica has just created the Lease (epoch 0) and leads; the Lease shell
/// counts into the context's metrics.
async fn leading_context(client: kube::Client, api: &mut ApiServer) -> Context {
    let metrics = Arc::new(Metrics::new());
    let leadership = lead(client.clone(), api, Arc::clone(&metrics)).await;
    pairing_context(client, leadership, metrics)
}

/// Asserts the request is the controller's server-side apply of the status.
fn assert_status_apply(seen: &Seen) {
    assert_eq!(seen.method, Method::PATCH);
    assert_eq!(seen.path, STATUS_PATH);
    assert_eq!(
        seen.query_param("fieldManager").as_deref(),
        Some("twosite-controller")
    );
    assert_eq!(seen.query_param("force").as_deref(), Some("true"));
    assert_eq!(
        seen.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(seen.body["apiVersion"], "twosite.dev/v1alpha1");
    assert_eq!(seen.body["kind"], "TwoSite");
    assert!(
        seen.body.get("spec").is_none(),
        "only the status is applied"
    );
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("condition {type_} in {status}"))
}

#[tokio::test]
async fn the_pairing_is_server_side_applied_to_the_status() {
    let (client, mut api) = mock_client();
    let ctx = leading_context(client, &mut api).await;
    let nodes = vec![
        worker("a2", "east"),
        worker("a1", "east"),
        worker("b1", "west"),
        worker("b2", "west"),
        NodeFacts {
            control_plane: true,
            ..worker("cp1", "east")
        },
    ];
    let reconcile = spawn_reconcile(&ctx, nodes);

    // Previous pair a1/b2 survives: pairs are stable across restarts.
    let previous = json!({"pairs": [{"a": "a1", "b": "b2"}]});
    api.expect(Method::GET, TWOSITE_PATH)
        .await
        .respond(200, twosite(json!({}), Some(previous)));
    let apply = api.expect(Method::PATCH, STATUS_PATH).await;
    assert_status_apply(&apply);
    let status = apply.body["status"].clone();
    assert_eq!(
        status["pairs"],
        json!([{"a": "a1", "b": "b2"}, {"a": "a2", "b": "b1"}])
    );
    assert_eq!(status["pairCount"], 2);
    assert_eq!(
        status["unpaired"],
        json!([{"node": "cp1", "reason": "ControlPlane", "message": "control-plane node"}])
    );
    assert_eq!(status["unpairedCount"], 1);
    assert_eq!(
        status["rooms"],
        json!({"a": "east", "b": "west", "source": "Automatic"})
    );
    assert_eq!(status["leader"], json!({"identity": ME, "epoch": 0}));
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(condition(&status, "RoomsResolved")["status"], "True");
    assert_eq!(condition(&status, "Paired")["status"], "True");
    assert_eq!(condition(&status, "Paired")["reason"], "AllWorkersPaired");
    apply.respond(200, twosite(json!({}), Some(status)));

    let event = api.expect(Method::POST, EVENTS_PATH).await;
    assert_eq!(event.body["reason"], "PairingChanged");
    assert_eq!(event.body["type"], "Normal");
    assert_eq!(event.body["regarding"]["kind"], "TwoSite");
    assert_eq!(event.body["regarding"]["name"], "default");
    assert_eq!(event.body["reportingController"], "twosite-controller");
    assert_eq!(event.body["reportingInstance"], ME);
    assert_eq!(event.body["note"], "paired a2/b1; 2 pair(s) now");
    let body = event.body.clone();
    event.respond(201, body);

    let outcome = reconcile.await.expect("joined").expect("reconcile");
    assert_eq!(outcome, Outcome::Written);
    let metrics = ctx.metrics.encode().expect("metrics");
    assert!(metrics.contains("twosite_pairs 2"), "{metrics}");
    assert!(metrics.contains("twosite_unpaired_nodes 1"), "{metrics}");
    assert!(
        metrics.contains("twosite_status_writes_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_unchanged_status_is_not_written() {
    let (client, mut api) = mock_client();
    let ctx = leading_context(client, &mut api).await;
    let nodes = vec![worker("a1", "east"), worker("b1", "west")];

    // What this leader wrote a while ago (with an older clock reading).
    let obj: TwoSite = serde_json::from_value(twosite(json!({}), None)).expect("a TwoSite");
    let leader = controller::crd::LeaderStatus {
        identity: ME.into(),
        epoch: 0,
    };
    let written = desired_status(&StatusInput::for_object(
        &obj,
        &nodes,
        leader,
        "2026-11-01T09:30:00Z",
    ));

    let reconcile = spawn_reconcile(&ctx, nodes.clone());
    api.expect(Method::GET, TWOSITE_PATH).await.respond(
        200,
        twosite(
            json!({}),
            Some(serde_json::to_value(&written).expect("json")),
        ),
    );
    assert_eq!(
        reconcile.await.expect("joined").expect("reconcile"),
        Outcome::Unchanged
    );
    api.expect_nothing().await;
}

#[tokio::test]
async fn a_missing_twosite_is_created_with_automatic_rooms() {
    let (client, mut api) = mock_client();
    let ctx = leading_context(client, &mut api).await;
    let nodes = vec![worker("a1", "east"), worker("b1", "west")];
    let reconcile = spawn_reconcile(&ctx, nodes);

    api.expect(Method::GET, TWOSITE_PATH).await.respond_status(
        404,
        "NotFound",
        "twosites.twosite.dev \"default\" not found",
    );
    let create = api.expect(Method::POST, TWOSITES_PATH).await;
    assert_eq!(create.body["apiVersion"], "twosite.dev/v1alpha1");
    assert_eq!(create.body["kind"], "TwoSite");
    assert_eq!(create.body["metadata"]["name"], "default");
    assert_eq!(
        create.body["spec"],
        json!({}),
        "an empty spec: automatic rooms"
    );
    create.respond(201, twosite(json!({}), None));

    let apply = api.expect(Method::PATCH, STATUS_PATH).await;
    assert_status_apply(&apply);
    assert_eq!(
        apply.body["status"]["pairs"],
        json!([{"a": "a1", "b": "b1"}])
    );
    let status = apply.body["status"].clone();
    apply.respond(200, twosite(json!({}), Some(status)));
    let event = api.expect(Method::POST, EVENTS_PATH).await;
    assert_eq!(event.body["reason"], "PairingChanged");
    event.respond(201, json!({}));

    assert_eq!(
        reconcile.await.expect("joined").expect("reconcile"),
        Outcome::Written
    );
}

#[tokio::test]
async fn an_invalid_spec_is_a_condition_and_an_event_not_pairs() {
    let (client, mut api) = mock_client();
    let ctx = leading_context(client, &mut api).await;
    let nodes = vec![worker("a1", "east"), worker("b1", "west")];
    let reconcile = spawn_reconcile(&ctx, nodes);

    api.expect(Method::GET, TWOSITE_PATH)
        .await
        .respond(200, twosite(json!({"rooms": ["east", "east"]}), None));
    let apply = api.expect(Method::PATCH, STATUS_PATH).await;
    assert_status_apply(&apply);
    let status = apply.body["status"].clone();
    assert_eq!(status["pairs"], json!([]), "no pairs are written");
    let rooms = condition(&status, "RoomsResolved");
    assert_eq!(rooms["status"], "False");
    assert_eq!(rooms["reason"], "InvalidSpec");
    assert!(
        rooms["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"east\" twice")),
        "{rooms}"
    );
    assert_eq!(condition(&status, "Paired")["reason"], "InvalidSpec");
    apply.respond(
        200,
        twosite(json!({"rooms": ["east", "east"]}), Some(status)),
    );

    let event = api.expect(Method::POST, EVENTS_PATH).await;
    assert_eq!(event.body["reason"], "InvalidSpec");
    assert_eq!(event.body["type"], "Warning");
    event.respond(201, json!({}));
    assert_eq!(
        reconcile.await.expect("joined").expect("reconcile"),
        Outcome::Written
    );
    api.expect_nothing().await;
}

#[tokio::test]
async fn a_failed_status_write_is_an_error_for_the_backoff() {
    let (client, mut api) = mock_client();
    let ctx = leading_context(client, &mut api).await;
    let nodes = vec![worker("a1", "east"), worker("b1", "west")];
    let reconcile = spawn_reconcile(&ctx, nodes);
    api.expect(Method::GET, TWOSITE_PATH)
        .await
        .respond(200, twosite(json!({}), None));
    api.expect(Method::PATCH, STATUS_PATH).await.respond_status(
        403,
        "Forbidden",
        "twosites/status is forbidden",
    );
    let err = reconcile
        .await
        .expect("joined")
        .expect_err("a refused write is an error");
    assert_eq!(err.metric_label(), "forbidden");
    api.expect_nothing().await;
}

#[tokio::test]
async fn the_loop_waits_for_the_first_node_listing_then_reconciles_on_change() {
    let (client, mut api) = mock_client();
    let ctx = leading_context(client, &mut api).await;
    let health = controller::admin::Health::new();
    let (facts_tx, facts_rx) = tokio::sync::watch::channel(None);
    let (leading_tx, leading_rx) = tokio::sync::watch::channel(false);
    let twosite_changed = Arc::new(tokio::sync::Notify::new());
    let pairing = tokio::spawn(controller::pairing::run_pairing_loop(
        ctx,
        facts_rx,
        Arc::clone(&twosite_changed),
        leading_rx,
        health.register("pairing", None),
    ));

    // Leadership and TwoSite changes before the Node watch synced: nothing is read or written
    // (pairing from a partial view would break pairs).
    leading_tx.send_replace(true);
    twosite_changed.notify_one();
    api.expect_nothing().await;

    facts_tx.send_replace(Some(vec![worker("a1", "east"), worker("b1", "west")]));
    api.expect(Method::GET, TWOSITE_PATH)
        .await
        .respond(200, twosite(json!({}), None));
    let apply = api.expect(Method::PATCH, STATUS_PATH).await;
    assert_status_apply(&apply);
    assert_eq!(
        apply.body["status"]["pairs"],
        json!([{"a": "a1", "b": "b1"}])
    );
    let status = apply.body["status"].clone();
    apply.respond(200, twosite(json!({}), Some(status.clone())));
    api.expect(Method::POST, EVENTS_PATH)
        .await
        .respond(201, json!({}));

    // A spec edit wakes it again; the status is already right: read, no write.
    twosite_changed.notify_one();
    api.expect(Method::GET, TWOSITE_PATH)
        .await
        .respond(200, twosite(json!({}), Some(status)));
    api.expect_nothing().await;
    assert!(!pairing.is_finished(), "the loop keeps running");
    pairing.abort();
}

#[tokio::test]
async fn a_new_leader_writes_no_status_before_its_remediation_view() {
    let (client, mut api) = mock_client();
    let mut ctx = leading_context(client, &mut api).await;
    // A remediation loop exists (its sender is alive) but has not passed as leader yet.
    let (view_tx, view_rx) = tokio::sync::watch::channel(None);
    ctx.remediation = view_rx;
    let nodes = vec![worker("a1", "east"), worker("b1", "west")];

    let reconcile = spawn_reconcile(&ctx, nodes.clone());
    api.expect(Method::GET, TWOSITE_PATH)
        .await
        .respond(200, twosite(json!({}), None));
    assert_eq!(
        reconcile.await.expect("joined").expect("reconcile"),
        Outcome::WaitingForView
    );
    api.expect_nothing().await;

    // Once the loop has made its pass, the status is written (with the nodes it saw).
    view_tx.send_replace(Some(controller::status::RemediationView {
        witness: Some(controller::witness_link::WitnessView {
            reachable: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }));
    let reconcile = spawn_reconcile(&ctx, nodes);
    api.expect(Method::GET, TWOSITE_PATH)
        .await
        .respond(200, twosite(json!({}), None));
    let apply = api.expect(Method::PATCH, STATUS_PATH).await;
    assert_status_apply(&apply);
    let witness = &apply.body["status"]["witness"];
    assert_eq!(witness["configured"], true, "{}", apply.body);
    assert!(
        witness.get("grant").is_none(),
        "no grant is written as absent, never null: {}",
        apply.body
    );
    apply.respond(200, twosite(json!({}), None));
    assert_eq!(
        reconcile.await.expect("joined").expect("reconcile"),
        Outcome::Written
    );
}
