//! A scripted mock of the Kubernetes API server on `tower-test`: each test says which request
//! comes next (method, path, query), inspects its body and answers as the API server would.
//! Also the controller replica the tests run as ([`ME`]): its Lease shell and its contexts.
#![allow(dead_code)]

use controller::leader_lease::{LeaderLease, Leadership, RoundOutcome};
use controller::metrics::Metrics;
use controller::pairing::{Context, Outcome, reconcile_pairing};
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::events::Reporter;
use node_health::{LeaderConfig, NodeFacts};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
pub type Responder = tower_test::mock::SendResponse<Response<Body>>;

/// How long a test waits for the code under test to send its next request.
const NEXT_REQUEST: Duration = Duration::from_secs(5);

/// A client whose every request goes to the returned [`ApiServer`].
pub fn mock_client() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer { handle })
}

pub struct ApiServer {
    handle: Handle,
}

/// One request the code under test sent.
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    /// The JSON body (`Value::Null` when empty).
    pub body: Value,
    responder: Responder,
}

impl Seen {
    /// Asserts that this is `method` on `path`.
    fn assert_is(&self, method: Method, path: &str) {
        assert_eq!(
            (self.method.clone(), self.path.as_str()),
            (method, path),
            "unexpected request {} {}?{}",
            self.method,
            self.path,
            self.query
        );
    }

    /// The value of query parameter `key`.
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then(|| v.to_string())
        })
    }

    pub fn respond(self, status: u16, body: Value) {
        let response = Response::builder()
            .status(StatusCode::from_u16(status).expect("valid status"))
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).expect("json")))
            .expect("response");
        self.responder.send_response(response);
    }

    /// Answers with the API server's `Status` for an error.
    pub fn respond_status(self, code: u16, reason: &str, message: &str) {
        self.respond(
            code,
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code,
            }),
        );
    }
}

impl ApiServer {
    /// The next request, whatever it is.
    pub async fn next(&mut self) -> Seen {
        let (request, responder) = tokio::time::timeout(NEXT_REQUEST, self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came"))
            .expect("the client is alive");
        let uri = request.uri().clone();
        let content_type = request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let method = request.method().clone();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("the body is JSON")
        };
        Seen {
            method,
            path: uri.path().to_string(),
            query: uri.query().unwrap_or_default().to_string(),
            content_type,
            body,
            responder,
        }
    }

    /// The next request, which must be `method` on `path`.
    pub async fn expect(&mut self, method: Method, path: &str) -> Seen {
        let seen = self.next().await;
        seen.assert_is(method, path);
        seen
    }

    /// The next request other than an Event (Events are answered as created), which must be
    /// `method` on `path`. Returns it and the reasons of the Events seen before it.
    pub async fn expect_after_events(&mut self, method: Method, path: &str) -> (Seen, Vec<String>) {
        let mut reasons = Vec::new();
        loop {
            let seen = self.next().await;
            if seen.method == Method::POST && seen.path == EVENTS_PATH {
                reasons.push(seen.body["reason"].as_str().unwrap_or_default().to_string());
                let body = seen.body.clone();
                seen.respond(201, body);
                continue;
            }
            seen.assert_is(method, path);
            return (seen, reasons);
        }
    }

    /// Answers every request for a little while: Events as created, anything else with a
    /// 500. Returns what came, as `METHOD path` strings, and the Events' reasons.
    pub async fn drain(&mut self) -> (Vec<String>, Vec<String>) {
        let mut requests = Vec::new();
        let mut reasons = Vec::new();
        while let Ok(Some((request, responder))) =
            tokio::time::timeout(Duration::from_millis(300), self.handle.next_request()).await
        {
            let line = format!("{} {}", request.method(), request.uri().path());
            let is_event = request.method() == Method::POST && request.uri().path() == EVENTS_PATH;
            let bytes = request.into_body().collect_bytes().await.expect("body");
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (status, answer) = if is_event {
                reasons.push(body["reason"].as_str().unwrap_or_default().to_string());
                (StatusCode::CREATED, body)
            } else {
                requests.push(line);
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"kind": "Status", "code": 500}),
                )
            };
            responder.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                    .expect("response"),
            );
        }
        (requests, reasons)
    }

    /// Asserts that no request comes for a little while.
    pub async fn expect_nothing(&mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(300), self.handle.next_request()).await
        {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

pub const NAMESPACE: &str = "twosite-system";
pub const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/twosite-system/leases/twosite-controller";
pub const LEASES_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/twosite-system/leases";
pub const TWOSITE_PATH: &str = "/apis/twosite.dev/v1alpha1/twosites/default";
pub const TWOSITES_PATH: &str = "/apis/twosite.dev/v1alpha1/twosites";
pub const STATUS_PATH: &str = "/apis/twosite.dev/v1alpha1/twosites/default/status";
pub const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

/// A Lease as the API server returns it.
pub fn lease(holder: Option<&str>, transitions: i32, rv: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": "twosite-controller",
            "namespace": NAMESPACE,
            "resourceVersion": rv,
        },
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "leaseTransitions": transitions,
            "acquireTime": "2026-11-01T10:00:00.000000Z",
            "renewTime": "2026-11-01T10:00:00.000000Z",
        },
    })
}

/// The object the API server stores for a sent Lease: the body with a new resourceVersion.
pub fn stored(mut sent: Value, rv: &str) -> Value {
    sent["metadata"]["resourceVersion"] = json!(rv);
    sent
}

/// A TwoSite as the API server returns it.
pub fn twosite(spec: Value, status: Option<Value>) -> Value {
    let mut obj = json!({
        "apiVersion": "twosite.dev/v1alpha1",
        "kind": "TwoSite",
        "metadata": {
            "name": "default",
            "uid": "2f7a4a2e-0000-4000-8000-000000000001",
            "resourceVersion": "100",
            "generation": 1,
            "creationTimestamp": "2026-11-01T09:00:00Z",
        },
        "spec": spec,
    });
    if let Some(s) = status {
        obj["status"] = s;
    }
    obj
}

/// The identity of the controller replica under test.
pub const ME: &str = "ctl-0";
/// The API call timeout the tests give the controller.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);

/// The Lease shell of replica [`ME`], not leading yet.
pub fn lease_shell(client: Client, metrics: Arc<Metrics>) -> LeaderLease {
    let leadership = Leadership::new(LeaderConfig::new(ME)).expect("valid config");
    LeaderLease::new(client, NAMESPACE, leadership, metrics, API_TIMEOUT)
}

/// One leader election round of `shell`, in the background.
pub fn spawn_round(shell: &LeaderLease) -> JoinHandle<controller::Result<RoundOutcome>> {
    let shell = shell.clone();
    tokio::spawn(async move { shell.round().await })
}

/// Makes [`ME`] the leader: its first round finds no Lease and creates it (epoch 0).
pub async fn lead(client: Client, api: &mut ApiServer, metrics: Arc<Metrics>) -> Leadership {
    let shell = lease_shell(client, metrics);
    let round = spawn_round(&shell);
    api.expect(Method::GET, LEASE_PATH)
        .await
        .respond_status(404, "NotFound", "not found");
    let create = api.expect(Method::POST, LEASES_PATH).await;
    let body = create.body.clone();
    create.respond(201, stored(body, "1"));
    assert_eq!(
        round.await.expect("joined").expect("round"),
        RoundOutcome::Created
    );
    let leadership = shell.leadership().clone();
    assert!(leadership.is_leader());
    leadership
}

/// The Event recorder of replica [`ME`].
pub fn recorder(client: Client) -> controller::events::EventSink {
    controller::events::EventSink::new(
        client,
        Reporter {
            controller: "twosite-controller".into(),
            instance: Some(ME.into()),
        },
    )
}

/// The pairing reconciler's context of replica [`ME`].
pub fn pairing_context(client: Client, leadership: Leadership, metrics: Arc<Metrics>) -> Context {
    Context::new(
        kube::Api::all(client.clone()),
        recorder(client),
        leadership,
        metrics,
        API_TIMEOUT,
    )
}

/// One pairing reconcile over `nodes`, in the background.
pub fn spawn_reconcile(
    ctx: &Context,
    nodes: Vec<NodeFacts>,
) -> JoinHandle<controller::Result<Outcome>> {
    let ctx = ctx.clone();
    tokio::spawn(async move { reconcile_pairing(&ctx, &nodes).await })
}
