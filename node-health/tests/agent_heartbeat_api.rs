//! The heartbeat renewal against a scripted mock API server (`tower-test`): create when
//! missing, replace with the resourceVersion precondition, a 409 counted as a failure.
#![cfg(feature = "agent")]

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use node_health::agentd::SharedCore;
use node_health::agentd::fake::FakeClock;
use node_health::agentd::heartbeat::{self, KubeLeases, NodeFacts, Renewed};
use node_health::{AgentCore, HealthTiming, MonoTime, RunBasis};
use serde_json::{Value, json};
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Responder = tower_test::mock::SendResponse<Response<Body>>;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/twosite-system/leases";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/twosite-system/leases/twosite-agent-a-1";

fn setup() -> (KubeLeases, Handle, SharedCore, FakeClock, NodeFacts) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let api = KubeLeases::new(client, "twosite-system", Duration::from_secs(2));
    let core = SharedCore::new(AgentCore::new("a-1", "room-a", HealthTiming::default()));
    let clock = FakeClock::new();
    clock.set(MonoTime(5_000));
    let facts = NodeFacts {
        node: "a-1".into(),
        namespace: "twosite-system".into(),
        boot_id: "3f1c-boot".into(),
        watchdog_enabled: true,
        lease_duration: Duration::from_secs(8),
    };
    (api, handle, core, clock, facts)
}

/// The next request: asserts method and path, returns the JSON body and the responder.
async fn expect(handle: &mut Handle, method: Method, path: &str) -> (Value, Responder) {
    let (request, responder) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request; expected {method} {path}"))
        .expect("client alive");
    assert_eq!(
        (request.method(), request.uri().path()),
        (&method, path),
        "unexpected request"
    );
    let bytes = request.into_body().collect_bytes().await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON body")
    };
    (body, responder)
}

fn respond(responder: Responder, status: u16, body: &Value) {
    responder.send_response(
        Response::builder()
            .status(StatusCode::from_u16(status).expect("status"))
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).expect("json")))
            .expect("response"),
    );
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

fn stored(mut body: Value, rv: &str) -> Value {
    body["metadata"]["resourceVersion"] = json!(rv);
    body
}

fn existing(rv: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {
            "name": "twosite-agent-a-1", "namespace": "twosite-system", "resourceVersion": rv,
            "labels": {"twosite.dev/agent-heartbeat": "true"},
            "annotations": {"example.com/keep": "me", "twosite.dev/renew-failures": "0"},
        },
        "spec": {"holderIdentity": "a-1", "leaseDurationSeconds": 8,
                 "acquireTime": "2026-11-01T10:00:00.000000Z",
                 "renewTime": "2026-11-01T10:00:00.000000Z"},
    })
}

#[tokio::test]
async fn a_missing_lease_is_created_with_labels_and_annotations() {
    let (api, mut server, core, clock, facts) = setup();
    let renewal = tokio::spawn({
        let (core, clock, facts) = (core.clone(), clock.clone(), facts.clone());
        async move { heartbeat::renew(&api, &facts, &core, &clock).await }
    });
    let (_, get) = expect(&mut server, Method::GET, LEASE).await;
    clock.set(MonoTime(5_300));
    respond(get, 404, &status(404, "NotFound"));
    let (body, create) = expect(&mut server, Method::POST, LEASES).await;
    assert_eq!(body["metadata"]["name"], "twosite-agent-a-1");
    assert_eq!(body["metadata"]["namespace"], "twosite-system");
    assert!(body["metadata"].get("resourceVersion").is_none(), "{body}");
    assert_eq!(
        body["metadata"]["labels"]["twosite.dev/agent-heartbeat"],
        "true"
    );
    let annotations = &body["metadata"]["annotations"];
    assert_eq!(annotations["twosite.dev/boot-id"], "3f1c-boot");
    assert_eq!(annotations["twosite.dev/renew-failures"], "0");
    assert_eq!(annotations["twosite.dev/watchdog"], "enabled");
    assert_eq!(annotations["twosite.dev/right-to-run"], "None");
    assert_eq!(body["spec"]["holderIdentity"], "a-1");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 8);
    assert!(body["spec"]["renewTime"].is_string(), "{body}");
    // The answer comes late: the right counts from when the write was sent.
    clock.set(MonoTime(6_500));
    respond(create, 201, &stored(body, "1"));
    assert_eq!(
        renewal.await.expect("joined").expect("renewed"),
        Renewed::Created
    );
    let c = core.lock();
    assert_eq!(c.failures_before_next_renewal(), 0);
    // Lease 8 s shrunk by 1% from 5.3 s (when the write was sent), not from 6.5 s: 13.22 s.
    assert_eq!(c.right_to_run(MonoTime(13_219)), Some(RunBasis::Lease));
    assert_eq!(c.right_to_run(MonoTime(13_220)), None);
}

#[tokio::test]
async fn an_existing_lease_is_replaced_with_the_resource_version_precondition() {
    let (api, mut server, core, clock, facts) = setup();
    core.lock().renewal_succeeded(MonoTime(4_000));
    let renewal = tokio::spawn({
        let (core, clock, facts) = (core.clone(), clock.clone(), facts.clone());
        async move { heartbeat::renew(&api, &facts, &core, &clock).await }
    });
    let (_, get) = expect(&mut server, Method::GET, LEASE).await;
    respond(get, 200, &existing("41"));
    let (body, replace) = expect(&mut server, Method::PUT, LEASE).await;
    assert_eq!(body["metadata"]["resourceVersion"], "41", "{body}");
    let annotations = &body["metadata"]["annotations"];
    assert_eq!(
        annotations["example.com/keep"], "me",
        "foreign annotations survive"
    );
    assert_eq!(annotations["twosite.dev/right-to-run"], "Lease");
    assert_eq!(annotations["twosite.dev/renew-failures"], "0");
    assert_eq!(body["spec"]["acquireTime"], "2026-11-01T10:00:00.000000Z");
    assert_ne!(body["spec"]["renewTime"], "2026-11-01T10:00:00.000000Z");
    respond(replace, 200, &stored(body, "42"));
    assert_eq!(
        renewal.await.expect("joined").expect("renewed"),
        Renewed::Replaced
    );
}

#[tokio::test]
async fn a_conflict_is_a_failed_renewal_and_the_next_write_says_so() {
    let (api, mut server, core, clock, facts) = setup();
    let renewal = tokio::spawn({
        let (api, core, clock, facts) = (api.clone(), core.clone(), clock.clone(), facts.clone());
        async move { heartbeat::renew(&api, &facts, &core, &clock).await }
    });
    let (_, get) = expect(&mut server, Method::GET, LEASE).await;
    respond(get, 200, &existing("41"));
    let (_, replace) = expect(&mut server, Method::PUT, LEASE).await;
    respond(replace, 409, &status(409, "Conflict"));
    let err = renewal
        .await
        .expect("joined")
        .expect_err("a 409 fails the renewal");
    assert!(err.is_conflict(), "{err}");
    assert_eq!(core.lock().failures_before_next_renewal(), 1);
    assert_eq!(
        core.lock().right_to_run(MonoTime(5_000)),
        None,
        "no renewal yet"
    );

    let renewal = tokio::spawn({
        let (core, clock, facts) = (core.clone(), clock.clone(), facts.clone());
        async move { heartbeat::renew(&api, &facts, &core, &clock).await }
    });
    let (_, get) = expect(&mut server, Method::GET, LEASE).await;
    respond(get, 200, &existing("43"));
    let (body, replace) = expect(&mut server, Method::PUT, LEASE).await;
    assert_eq!(body["metadata"]["resourceVersion"], "43");
    assert_eq!(
        body["metadata"]["annotations"]["twosite.dev/renew-failures"],
        "1"
    );
    respond(replace, 200, &stored(body, "44"));
    renewal.await.expect("joined").expect("renewed");
    assert_eq!(core.lock().failures_before_next_renewal(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_api_server_that_does_not_answer_times_out_as_a_failure() {
    let (api, mut server, core, clock, facts) = setup();
    let renewal = tokio::spawn({
        let (core, clock, facts) = (core.clone(), clock.clone(), facts.clone());
        async move { heartbeat::renew(&api, &facts, &core, &clock).await }
    });
    // Take the GET and never answer it.
    let (_request, _never) = server.next_request().await.expect("a GET");
    let err = renewal.await.expect("joined").expect_err("timed out");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(core.lock().failures_before_next_renewal(), 1);
}

#[tokio::test]
async fn a_fence_marker_on_the_lease_is_kept_and_ends_the_right_to_run() {
    let (api, mut server, core, clock, facts) = setup();
    core.lock().renewal_succeeded(MonoTime(4_000));
    let renewal = tokio::spawn({
        let (core, clock, facts) = (core.clone(), clock.clone(), facts.clone());
        async move { heartbeat::renew(&api, &facts, &core, &clock).await }
    });
    let mut marked = existing("50");
    marked["metadata"]["annotations"]["twosite.dev/fenced-boot-id"] = json!("boot-0");
    let (_, get) = expect(&mut server, Method::GET, LEASE).await;
    respond(get, 200, &marked);
    let (body, replace) = expect(&mut server, Method::PUT, LEASE).await;
    assert_eq!(body["metadata"]["resourceVersion"], "50");
    let annotations = &body["metadata"]["annotations"];
    assert_eq!(
        annotations["twosite.dev/fenced-boot-id"], "boot-0",
        "the marker is kept"
    );
    assert_eq!(annotations["twosite.dev/right-to-run"], "None");
    respond(replace, 200, &stored(body, "51"));
    renewal.await.expect("joined").expect("renewed");
    let c = core.lock();
    assert!(c.fence_marker());
    assert_eq!(c.right_to_run(MonoTime(5_100)), None);
}
