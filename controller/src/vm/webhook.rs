//! The mutating admission webhook for launcher pods of opted-in VMs, on HTTPS.
//!
//! The MutatingWebhookConfiguration selects pods labelled `twosite.dev/ha=true` (the label the
//! controller puts on opted-in VMs' templates, which KubeVirt copies onto launcher pods), with
//! `failurePolicy: Fail`: only those pods wait when no replica answers. The decision is the
//! core's [`node_health::vm::admit`]; this file reads the caches for it and writes the patch:
//! the scheduling gate [`GATE`], the annotation [`GATED_ANNOTATION`] saying why the pod waits,
//! and a preferred node affinity to the lost node's partner.

use super::types::{self, GATED_ANNOTATION};
use super::watch::VmStores;
use crate::status::RemediationView;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use node_health::rooms::Pairing;
use node_health::vm::{self, Admission, AdmissionFacts, GATE, HELD_FOR_NODE_ANNOTATION};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub const PATH: &str = "/mutate-launcher";

/// What the webhook reads.
#[derive(Clone)]
pub struct WebhookState {
    pub stores: VmStores,
    pub view: watch::Receiver<Option<RemediationView>>,
    pub pairing: watch::Receiver<Option<Pairing>>,
    /// `--dry-run`: admit every pod unchanged, saying what would have been done.
    pub dry_run: bool,
}

pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route(PATH, post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

async fn mutate(State(state): State<WebhookState>, body: Bytes) -> axum::Json<Value> {
    let review = review(&state, &body);
    axum::Json(serde_json::to_value(&review).unwrap_or_else(|e| {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
               "response": {"uid": "", "allowed": false,
                            "status": {"message": format!("twosite: cannot encode the answer: {e}")}}})
    }))
}

/// The answer to one AdmissionReview body.
pub fn review(state: &WebhookState, body: &[u8]) -> AdmissionReview<DynamicObject> {
    let parsed: Result<AdmissionReview<DynamicObject>, _> = serde_json::from_slice(body);
    let req: AdmissionRequest<DynamicObject> =
        match parsed.map_err(|e| e.to_string()).and_then(|r| {
            r.try_into()
                .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| e.to_string())
        }) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = e, "webhook: unreadable AdmissionReview");
                return AdmissionResponse::invalid(format!(
                    "twosite: unreadable AdmissionReview: {e}"
                ))
                .into_review();
            }
        };
    let response = AdmissionResponse::from(&req);
    let pod: Pod = match req
        .object
        .as_ref()
        .ok_or_else(|| "the request carries no object".to_string())
        .and_then(|o| serde_json::to_value(o).map_err(|e| e.to_string()))
        .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => {
            // Fail closed: this pod is labelled as an opted-in VM's, and an ungated launcher
            // could start beside the old instance.
            tracing::warn!(
                error = e,
                name = req.name,
                "webhook: a pod it cannot read; refused"
            );
            return response
                .deny(format!(
                    "twosite: cannot read the pod, so cannot gate it: {e}"
                ))
                .into_review();
        }
    };
    if !state.stores.ready() {
        return response
            .deny("twosite is starting (its caches are not filled yet); retry shortly")
            .into_review();
    }
    let namespace = pod
        .namespace()
        .or_else(|| Some(req.namespace.clone().unwrap_or_default()))
        .unwrap_or_default();
    match decide(state, &pod, &namespace) {
        Admission::Allow { warning } => with_warning(response, warning).into_review(),
        Admission::Gate { prefer_node, .. } if state.dry_run => {
            tracing::info!(namespace, prefer = ?prefer_node, "dry-run: would gate a launcher pod");
            with_warning(
                response,
                Some(
                    "twosite dry-run: this launcher pod would wait at the gate for its disk Leases"
                        .into(),
                ),
            )
            .into_review()
        }
        Admission::Gate {
            prefer_node,
            warning,
        } => match gate_patch(&pod, prefer_node.as_deref()) {
            Ok(patch) => {
                tracing::info!(pod = pod.metadata.generate_name.as_deref().or(pod.metadata.name.as_deref()).unwrap_or_default(), namespace, prefer = ?prefer_node, "launcher pod gated");
                match with_warning(response.clone(), warning).with_patch(patch) {
                    Ok(r) => r.into_review(),
                    Err(e) => response
                        .deny(format!("twosite: cannot encode the gate: {e}"))
                        .into_review(),
                }
            }
            Err(e) => response.deny(format!("twosite: {e}")).into_review(),
        },
    }
}

fn with_warning(mut r: AdmissionResponse, warning: Option<String>) -> AdmissionResponse {
    if let Some(w) = warning {
        r.warnings = Some(vec![w]);
    }
    r
}

fn decide(state: &WebhookState, pod: &Pod, namespace: &str) -> Admission {
    let vm_name = types::launcher_vm(pod);
    let vm = vm_name.and_then(|n| {
        state
            .stores
            .vms
            .get(&kube::runtime::reflector::ObjectRef::new(n).within(namespace))
    });
    let opt_in = vm.as_ref().map(|v| types::vm_opt_in(v));
    // The node the VM last ran on: what its disk Leases are held for.
    let last_node = vm.as_ref().and_then(|v| {
        let wanted: BTreeSet<String> = types::claim_names(v)
            .iter()
            .map(|c| vm::disk_lease_name(c))
            .collect();
        state
            .stores
            .disk_leases
            .state()
            .iter()
            .filter(|l| {
                l.namespace().as_deref() == Some(namespace) && wanted.contains(&l.name_any())
            })
            .find_map(|l| {
                l.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(HELD_FOR_NODE_ANNOTATION))
                    .filter(|n| !n.is_empty())
                    .cloned()
            })
    });
    let view = state.view.borrow().clone().unwrap_or_default();
    let partner = last_node.as_deref().and_then(|n| {
        state
            .pairing
            .borrow()
            .as_ref()
            .and_then(|p| p.partner_of(n).map(str::to_string))
    });
    vm::admit(&AdmissionFacts {
        is_launcher: types::is_launcher(pod),
        vm_name,
        vm: opt_in.as_ref(),
        last_node: last_node.as_deref(),
        partner: partner.as_deref(),
        live_nodes: &view.live,
        fenced_nodes: &view.fenced,
    })
}

/// The JSON patch that gates `pod` (idempotent) and prefers `prefer` if given.
pub fn gate_patch(pod: &Pod, prefer: Option<&str>) -> Result<json_patch::Patch, String> {
    let mut ops = Vec::new();
    let spec = pod.spec.as_ref();
    match spec.and_then(|s| s.scheduling_gates.as_ref()) {
        None => ops
            .push(json!({"op": "add", "path": "/spec/schedulingGates", "value": [{"name": GATE}]})),
        Some(g) if !g.iter().any(|g| g.name == GATE) => ops
            .push(json!({"op": "add", "path": "/spec/schedulingGates/-", "value": {"name": GATE}})),
        Some(_) => {}
    }
    let why = "waits for its disk Leases (twosite)";
    match pod.metadata.annotations.as_ref() {
        None => ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {GATED_ANNOTATION: why}})),
        Some(_) => ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", GATED_ANNOTATION.replace('/', "~1")), "value": why})),
    }
    if let Some(node) = prefer {
        let term = json!({"weight": 100, "preference": {"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}});
        let affinity = spec.and_then(|s| s.affinity.as_ref());
        let node_affinity = affinity.and_then(|a| a.node_affinity.as_ref());
        let preferred = node_affinity.and_then(|n| {
            n.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        });
        ops.push(match (affinity, node_affinity, preferred) {
            (None, _, _) => json!({"op": "add", "path": "/spec/affinity",
                "value": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [term]}}}),
            (Some(_), None, _) => json!({"op": "add", "path": "/spec/affinity/nodeAffinity",
                "value": {"preferredDuringSchedulingIgnoredDuringExecution": [term]}}),
            (Some(_), Some(_), None) => json!({"op": "add",
                "path": "/spec/affinity/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution",
                "value": [term]}),
            (Some(_), Some(_), Some(_)) => json!({"op": "add",
                "path": "/spec/affinity/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution/-",
                "value": term}),
        });
    }
    serde_json::from_value(Value::Array(ops))
        .map_err(|e| format!("cannot build the gate patch: {e}"))
}

/// Serves `router` over TLS on `listener` until the process ends; a failed handshake or
/// connection is logged and ends only that connection.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
) -> crate::error::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "webhook: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper::service::service_fn(move |req| {
                use tower::ServiceExt;
                router.clone().oneshot(req)
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "webhook: connection ended with an error");
            }
        });
    }
}

/// The webhook task: the certificate from its Secret (made on first start), the CA into the
/// webhook configuration (checked again every 30 s: an install that resets it is mended), then
/// HTTPS on the port. Failures to reach the Secret are retried; the rest of the controller runs
/// meanwhile, and opted-in launcher pods wait (the configuration fails closed).
pub async fn run(
    client: kube::Client,
    namespace: String,
    flags: crate::run::VmFlags,
    state: WebhookState,
    api_timeout: std::time::Duration,
) -> crate::error::Result<()> {
    use super::cert;
    let names = flags.cert_names(&namespace);
    let mut wait = std::time::Duration::from_secs(1);
    let pair = loop {
        match cert::ensure(
            &client,
            &namespace,
            &flags.webhook_secret,
            &names,
            api_timeout,
        )
        .await
        {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(secret = flags.webhook_secret, error = %crate::error::report(&e), "webhook certificate unavailable; opted-in launcher pods wait until it is");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(30));
            }
        }
    };
    let tls = Arc::new(cert::server_config(&pair)?);
    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], flags.webhook_port));
    // A port taken is retried, not fatal: the rest of the controller keeps running, and the
    // opted-in launcher pods wait (the configuration fails closed) until it is free.
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "webhook cannot listen; retrying in 10 s");
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            }
        }
    };
    tracing::info!(%addr, path = PATH, "VM admission webhook serving");
    let bundle = {
        let client = client.clone();
        let config = flags.webhook_config.clone();
        async move {
            let mut reported = false;
            loop {
                match cert::patch_ca_bundle(&client, &config, &pair.ca_pem, api_timeout).await {
                    Ok(wrote) => {
                        if wrote {
                            tracing::info!(config, "webhook caBundle set");
                        }
                        reported = false;
                    }
                    Err(e) if !reported => {
                        reported = true;
                        tracing::warn!(config, error = %crate::error::report(&e), "cannot set the webhook caBundle; retrying");
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            }
        }
    };
    tokio::select! {
        r = serve(listener, tls, router(state)) => r,
        () = bundle => Ok(()),
    }
}

#[cfg(test)]
#[path = "webhook_tests.rs"]
mod tests;
