//! Peer probes: every agent answers `GET /v1/peer` with [`AgentCore::report`], and asks its
//! partner in the other room the same question every probe interval. A partner that cannot
//! reach the API server either, and still has the right to run, vouches for this node
//! ([`AgentCore::peer_answered`]): a whole-cluster API outage stops nothing. An answer from a
//! partner of the other room that has the right to run is also evidence that the rooms are in
//! contact ([`AgentCore::observe_other_room`]).
//!
//! [`AgentCore::report`]: crate::AgentCore::report
//! [`AgentCore::peer_answered`]: crate::AgentCore::peer_answered
//! [`AgentCore::observe_other_room`]: crate::AgentCore::observe_other_room

use super::SharedCore;
use super::error::{Error, Result, report};
use super::partner::PartnerCache;
use crate::agent::PeerReport;
use crate::time::Clock;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The probe path.
pub const PEER_PATH: &str = "/v1/peer";
/// The largest answer read from a peer.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Clone)]
struct PeerState {
    core: SharedCore,
    clock: Arc<dyn Clock + Send + Sync>,
}

/// The peer HTTP API: `GET /v1/peer`.
pub fn peer_router(core: SharedCore, clock: Arc<dyn Clock + Send + Sync>) -> Router {
    Router::new()
        .route(PEER_PATH, get(answer_probe))
        .with_state(PeerState { core, clock })
}

async fn answer_probe(State(state): State<PeerState>) -> Response {
    let report = {
        let now = state.clock.now();
        state.core.lock().report(now)
    };
    match serde_json::to_vec(&report) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "could not encode the peer report");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Opens the peer port.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::PeerServer { addr, source })
}

/// Serves the peer API until the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    core: SharedCore,
    clock: Arc<dyn Clock + Send + Sync>,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    axum::serve(listener, peer_router(core, clock))
        .await
        .map_err(|source| Error::PeerServer { addr, source })
}

/// Asks a peer how it is.
pub trait PeerProbe: Send + Sync {
    fn probe(&self, addr: SocketAddr) -> impl Future<Output = Result<PeerReport>> + Send;
}

/// [`PeerProbe`] over HTTP/1, with a timeout on the whole exchange.
#[derive(Clone)]
pub struct HttpProbe {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl HttpProbe {
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        HttpProbe {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    async fn exchange(&self, addr: SocketAddr) -> Result<PeerReport> {
        let failed = |what: String| Error::Probe { addr, what };
        let uri: http::Uri = format!("http://{addr}{PEER_PATH}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| failed(e.to_string()))?;
        let response = self.client.get(uri).await.map_err(|e| failed(report(&e)))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| failed(format!("reading the answer: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(failed(format!("answered {status}")));
        }
        serde_json::from_slice(&body).map_err(|e| failed(format!("malformed answer: {e}")))
    }
}

impl PeerProbe for HttpProbe {
    async fn probe(&self, addr: SocketAddr) -> Result<PeerReport> {
        match tokio::time::timeout(self.timeout, self.exchange(addr)).await {
            Ok(answer) => answer,
            Err(_) => Err(Error::Probe {
                addr,
                what: format!("no answer within {:?}", self.timeout),
            }),
        }
    }
}

/// Probes the partner once, if its address is known, and reports the answer to the core.
/// `None`: no partner address known.
pub async fn probe_partner<P: PeerProbe>(
    probe: &P,
    partners: &PartnerCache,
    core: &SharedCore,
    clock: &(dyn Clock + Send + Sync),
) -> Option<Result<PeerReport>> {
    let addr = partners.partner_addr()?;
    let sent_at = clock.now();
    let answer = probe.probe(addr).await;
    if let Ok(report) = &answer {
        let mut c = core.lock();
        c.peer_answered(sent_at, report);
        // A partner of the other room that may run is evidence that the rooms are in contact
        // (counted from when the probe was sent, never from the answer).
        if report.has_right && report.room != c.report(sent_at).room {
            c.observe_other_room(sent_at);
        }
    }
    Some(answer)
}

/// Probes the partner every `every`; failures and malformed answers are logged and ignored.
pub async fn run_probes<P: PeerProbe>(
    probe: P,
    partners: PartnerCache,
    core: SharedCore,
    clock: Arc<dyn Clock + Send + Sync>,
    every: Duration,
) -> Result<()> {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match probe_partner(&probe, &partners, &core, clock.as_ref()).await {
            None => tracing::trace!("no partner address known: not probing"),
            Some(Ok(answer)) => tracing::trace!(?answer, "partner answered"),
            Some(Err(err)) => tracing::debug!(error = %report(&err), "partner probe failed"),
        }
    }
}
