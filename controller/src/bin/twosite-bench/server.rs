//! The bench's in-process API server: a `tower` service that stores what is written, answers
//! reads from that store, counts what it was asked, and delivers every change of a Node or an
//! agent Lease to the controller's watch handlers at once.

use crate::VirtualClock;
use controller::heartbeats::SharedObserved;
use controller::pod_index::PodIndex;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::client::Body;
use kube::runtime::watcher::Event as W;
use node_health::{Clock, HealthTiming, MonoTime};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The in-process API server: objects by path, and what it was asked.
pub(crate) struct Server {
    /// Kept serialized: as `Value`s the bench's own store was ~8 MiB of the RSS at 1,000 nodes,
    /// which is not the controller's.
    pub(crate) objects: Objects,
    pub(crate) rv: u64,
    pub(crate) observed: SharedObserved,
    pub(crate) pods: PodIndex,
    pub(crate) clock: Arc<VirtualClock>,
    pub(crate) timing: HealthTiming,
    /// Requests by kind (`METHOD resource`), since the last reset.
    pub(crate) requests: BTreeMap<String, u64>,
    /// Fence commits: node, virtual time, wall-clock time.
    pub(crate) commits: Vec<(String, MonoTime, Instant)>,
    /// Wall-clock time spent in this server (not the controller's work).
    pub(crate) own: Duration,
}

/// Objects by path, each as its JSON bytes.
#[derive(Default)]
pub(crate) struct Objects(HashMap<String, Box<[u8]>>);

impl Objects {
    pub(crate) fn insert(&mut self, path: String, obj: &Value) {
        self.0
            .insert(path, serde_json::to_vec(obj).unwrap_or_default().into());
    }
    pub(crate) fn get(&self, path: &str) -> Option<Value> {
        self.0
            .get(path)
            .and_then(|b| serde_json::from_slice(b).ok())
    }
    pub(crate) fn contains_key(&self, path: &str) -> bool {
        self.0.contains_key(path)
    }
}

#[derive(Clone)]
pub(crate) struct Shared(pub(crate) Arc<Mutex<Server>>);

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Server> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(crate) fn status(code: u16, reason: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": reason, "message": reason, "code": code}),
    )
}

/// What kind of request this is, for the counts: the method and the resource.
pub(crate) fn kind_of(method: &Method, path: &str) -> String {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let resource = parts
        .iter()
        .rev()
        .find(|p| {
            matches!(
                **p,
                "pods" | "nodes" | "leases" | "events" | "virtualmachines" | "status"
            )
        })
        .copied()
        .unwrap_or("other");
    let resource = if resource == "leases" && path.contains("/twosite-agent-") {
        "agent lease"
    } else if resource == "leases" {
        "leader lease"
    } else {
        resource
    };
    let method = if *method == Method::GET && path.ends_with("/pods") {
        "LIST"
    } else {
        method.as_str()
    };
    format!("{method} {resource}")
}

impl Server {
    pub(crate) fn store(&mut self, path: &str, mut obj: Value) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects.insert(path.to_string(), &obj);
        let now = self.clock.now();
        // The watches deliver the change at once.
        if path.starts_with("/api/v1/nodes/") {
            if let Ok(node) = serde_json::from_value::<Node>(obj.clone()) {
                self.observed.lock().apply_node(W::Apply(node), now);
            }
        } else if path.contains("/leases/twosite-agent-")
            && let Ok(lease) = serde_json::from_value::<Lease>(obj.clone())
        {
            let t = self.timing;
            self.observed
                .lock()
                .apply_agent_lease(W::Apply(lease), now, &t);
        }
        obj
    }

    pub(crate) fn handle(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        ct: &str,
        body: Value,
    ) -> (u16, Value) {
        let mut kind = kind_of(method, path);
        if path.ends_with("/events") && *method == Method::POST {
            // Events by reason: a repeated one shows.
            if let Some(reason) = body["reason"].as_str() {
                kind = format!("{kind} {reason}");
            }
            *self.requests.entry(kind).or_default() += 1;
            return (201, body);
        }
        *self.requests.entry(kind).or_default() += 1;
        if *method == Method::GET && path == "/api/v1/pods" {
            let node = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("fieldSelector=spec.nodeName%3D"))
                .unwrap_or_default();
            let items = self.pods.pods_on(node).unwrap_or_default();
            return (
                200,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
                       "items": items}),
            );
        }
        if *method == Method::DELETE && path.contains("/pods/") {
            let mut parts = path.rsplit('/');
            let (name, _, ns) = (parts.next(), parts.next(), parts.next());
            let pod: Pod =
                serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}}))
                    .unwrap_or_default();
            self.pods.apply(W::Delete(pod.clone()));
            return (200, serde_json::to_value(pod).unwrap_or_default());
        }
        match *method {
            Method::GET => match self.objects.get(path) {
                Some(o) => (200, o),
                None => status(404, "NotFound"),
            },
            Method::POST => {
                let name = body["metadata"]["name"].as_str().unwrap_or("x").to_string();
                let at = format!("{path}/{name}");
                if self.objects.contains_key(&at) {
                    return status(409, "AlreadyExists");
                }
                (201, self.store(&at, body))
            }
            Method::PUT => (200, self.store(path, body)),
            Method::PATCH => {
                let Some(mut obj) = self.objects.get(path) else {
                    return status(404, "NotFound");
                };
                if ct.contains("json-patch") {
                    let Ok(patch) = serde_json::from_value::<json_patch::Patch>(body) else {
                        return status(400, "BadRequest");
                    };
                    if json_patch::patch(&mut obj, &patch).is_err() {
                        return status(409, "Conflict");
                    }
                } else {
                    json_patch::merge(&mut obj, &body);
                }
                if path.contains("/leases/twosite-agent-")
                    && obj["metadata"]["annotations"]
                        .get("twosite.dev/fenced-boot-id")
                        .is_some()
                {
                    let node = path.rsplit("twosite-agent-").next().unwrap_or_default();
                    self.commits
                        .push((node.to_string(), self.clock.now(), Instant::now()));
                }
                (200, self.store(path, obj))
            }
            _ => status(405, "MethodNotAllowed"),
        }
    }
}

/// The `tower` service the controller's kube client talks to.
/// A client of the in-process API server; every answer comes `latency` after the request was
/// handled (a round trip to a real API server and etcd).
pub(crate) fn client(server: Shared, latency: Duration) -> kube::Client {
    let service = tower::service_fn(move |req: Request<Body>| {
        let server = server.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let started = Instant::now();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let ct = parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let (code, bytes) = {
                let mut s = server.lock();
                let (code, answer) = s.handle(
                    &parts.method,
                    parts.uri.path(),
                    parts.uri.query().unwrap_or_default(),
                    &ct,
                    body,
                );
                let bytes = serde_json::to_vec(&answer).unwrap_or_default();
                s.own += started.elapsed();
                (code, bytes)
            };
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let response = Response::builder()
                .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
                .header("content-type", "application/json")
                .body(Body::from(bytes))
                .unwrap_or_else(|_| Response::new(Body::empty()));
            Ok::<_, Infallible>(response)
        }
    });
    kube::Client::new(service, "default")
}
