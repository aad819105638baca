//! Peer probes: every agent answers `GET /v1/peer?from=<node>&nonce=<nonce>` with its
//! [`AgentCore::report`] signed under the cluster's peer keys, and asks its partner in the
//! other room the same question, with a fresh random nonce, every probe interval. The core
//! takes a verified answer from the partner as a vouch or as contact with the other room
//! ([`AgentCore::partner_answered`]); anything else is refused, counted in
//! `twosite_agent_peer_refusals_total{reason}` (served on the same port at `/metrics`) and
//! logged once per partner and reason.
//!
//! [`AgentCore::report`]: crate::AgentCore::report
//! [`AgentCore::partner_answered`]: crate::AgentCore::partner_answered

use super::SharedCore;
use super::error::{Error, Result, report};
use super::partner::PartnerCache;
use super::peer_keys::KeyStore;
use crate::agent::PeerReport;
use crate::peer_auth::{MAX_ANSWER_BYTES, Nonce, PeerRefusal, Question};
use crate::time::Clock;
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The probe path.
pub const PEER_PATH: &str = "/v1/peer";
/// The metrics path on the peer port.
pub const METRICS_PATH: &str = "/metrics";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// The peer channel's metrics and its refusal log.
#[derive(Clone)]
pub struct PeerMetrics(Arc<PeerMetricsInner>);

struct PeerMetricsInner {
    registry: Registry,
    refusals: Family<ReasonLabels, Counter>,
    answers: Counter,
    logged: Mutex<HashSet<(String, PeerRefusal)>>,
}

impl Default for PeerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let refusals = Family::<ReasonLabels, Counter>::default();
        let answers = Counter::default();
        registry.register(
            "twosite_agent_peer_refusals",
            "Partner answers refused (counted as no answer), by reason",
            refusals.clone(),
        );
        registry.register(
            "twosite_agent_peer_answers",
            "Partner answers verified and taken",
            answers.clone(),
        );
        // Every reason is listed from the start, so a dashboard can tell 0 from absent.
        for r in PeerRefusal::ALL {
            let _ = refusals.get_or_create(&ReasonLabels {
                reason: r.label().into(),
            });
        }
        PeerMetrics(Arc::new(PeerMetricsInner {
            registry,
            refusals,
            answers,
            logged: Mutex::new(HashSet::new()),
        }))
    }

    /// Counts a refusal; logs it the first time for this partner and reason.
    pub fn refused(&self, partner: &str, addr: SocketAddr, refusal: PeerRefusal) {
        self.0
            .refusals
            .get_or_create(&ReasonLabels {
                reason: refusal.label().into(),
            })
            .inc();
        let first = self
            .0
            .logged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((partner.to_string(), refusal));
        if first {
            tracing::warn!(
                partner,
                %addr,
                reason = refusal.label(),
                "refused an answer from the partner's address: {refusal}; it counts as no answer \
                 (logged once per partner and reason; see twosite_agent_peer_refusals_total)"
            );
        } else {
            tracing::debug!(partner, %addr, reason = refusal.label(), "refused a partner answer");
        }
    }

    pub fn refusals(&self, refusal: PeerRefusal) -> u64 {
        self.0
            .refusals
            .get_or_create(&ReasonLabels {
                reason: refusal.label().into(),
            })
            .get()
    }

    pub fn answered(&self) {
        self.0.answers.inc();
    }

    fn encode(&self) -> std::result::Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.0.registry)?;
        Ok(out)
    }
}

#[derive(Clone)]
struct PeerState {
    core: SharedCore,
    clock: Arc<dyn Clock + Send + Sync>,
    keys: KeyStore,
    metrics: PeerMetrics,
}

/// The peer HTTP API: `GET /v1/peer` and `GET /metrics`.
pub fn peer_router(
    core: SharedCore,
    clock: Arc<dyn Clock + Send + Sync>,
    keys: KeyStore,
    metrics: PeerMetrics,
) -> Router {
    Router::new()
        .route(PEER_PATH, get(answer_probe))
        .route(METRICS_PATH, get(serve_metrics))
        .with_state(PeerState {
            core,
            clock,
            keys,
            metrics,
        })
}

async fn answer_probe(State(state): State<PeerState>, RawQuery(query): RawQuery) -> Response {
    let question = match Question::from_query(query.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(err) => return (StatusCode::BAD_REQUEST, format!("{err}\n")).into_response(),
    };
    let keys = state.keys.get();
    let body = {
        let now = state.clock.now();
        state.core.lock().answer(now, keys.as_ref(), &question)
    };
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn serve_metrics(State(state): State<PeerState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
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
    keys: KeyStore,
    metrics: PeerMetrics,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    axum::serve(listener, peer_router(core, clock, keys, metrics))
        .await
        .map_err(|source| Error::PeerServer { addr, source })
}

/// Asks a peer a question; the answer's body, unverified.
pub trait PeerProbe: Send + Sync {
    fn probe(
        &self,
        addr: SocketAddr,
        question: &Question,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send;
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

    async fn exchange(&self, addr: SocketAddr, question: &Question) -> Result<Vec<u8>> {
        let failed = |what: String| Error::Probe { addr, what };
        let uri: http::Uri = format!("http://{addr}{PEER_PATH}?{}", question.to_query())
            .parse()
            .map_err(|e: http::uri::InvalidUri| failed(e.to_string()))?;
        let response = self.client.get(uri).await.map_err(|e| failed(report(&e)))?;
        let status = response.status();
        // One byte over the limit is enough to refuse it as too large.
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES + 1)
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec());
        if status != StatusCode::OK {
            return Err(failed(format!("answered {status}")));
        }
        match body {
            Ok(body) => Ok(body),
            // Larger than the limit: handed on as such, so the core refuses it by name.
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Ok(vec![b' '; MAX_ANSWER_BYTES + 1])
            }
            Err(e) => Err(failed(format!("reading the answer: {e}"))),
        }
    }
}

impl PeerProbe for HttpProbe {
    async fn probe(&self, addr: SocketAddr, question: &Question) -> Result<Vec<u8>> {
        match tokio::time::timeout(self.timeout, self.exchange(addr, question)).await {
            Ok(answer) => answer,
            Err(_) => Err(Error::Probe {
                addr,
                what: format!("no answer within {:?}", self.timeout),
            }),
        }
    }
}

/// A fresh random nonce from the system's generator.
pub fn fresh_nonce(rng: &SystemRandom) -> Result<Nonce> {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes).map_err(|_| Error::Probe {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        what: "the system's random generator failed: no nonce, no probe".into(),
    })?;
    Ok(Nonce(bytes))
}

/// What probes need besides the core: the keys, the metrics and the nonce source.
#[derive(Clone)]
pub struct ProbeContext {
    pub keys: KeyStore,
    pub metrics: PeerMetrics,
    pub rng: SystemRandom,
}

impl ProbeContext {
    pub fn new(keys: KeyStore, metrics: PeerMetrics) -> Self {
        ProbeContext {
            keys,
            metrics,
            rng: SystemRandom::new(),
        }
    }
}

/// Probes the partner once, if its address is known, and hands the answer to the core.
/// `None`: no partner (or its address) known.
pub async fn probe_partner<P: PeerProbe>(
    probe: &P,
    partners: &PartnerCache,
    core: &SharedCore,
    clock: &(dyn Clock + Send + Sync),
    ctx: &ProbeContext,
) -> Option<Result<PeerReport>> {
    let addr = partners.partner_addr()?;
    let nonce = match fresh_nonce(&ctx.rng) {
        Ok(n) => n,
        Err(err) => return Some(Err(err)),
    };
    let (question, partner) = {
        let mut c = core.lock();
        let question = c.ask_partner(clock.now(), nonce)?;
        (question, c.partner().unwrap_or_default().to_string())
    };
    let body = match probe.probe(addr, &question).await {
        Ok(body) => body,
        Err(err) => return Some(Err(err)),
    };
    let keys = ctx.keys.get();
    let taken = core.lock().partner_answered(keys.as_ref(), &body);
    Some(match taken {
        Ok(report) => {
            ctx.metrics.answered();
            Ok(report)
        }
        Err(refusal) => {
            ctx.metrics.refused(&partner, addr, refusal);
            Err(Error::PeerRefused { addr, refusal })
        }
    })
}

/// Probes the partner every `every`; failures and refused answers are logged and ignored.
pub async fn run_probes<P: PeerProbe>(
    probe: P,
    partners: PartnerCache,
    core: SharedCore,
    clock: Arc<dyn Clock + Send + Sync>,
    ctx: ProbeContext,
    every: Duration,
) -> Result<()> {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match probe_partner(&probe, &partners, &core, clock.as_ref(), &ctx).await {
            None => tracing::trace!("no partner address known: not probing"),
            Some(Ok(answer)) => tracing::trace!(?answer, "partner answered"),
            Some(Err(Error::PeerRefused { .. })) => {}
            Some(Err(err)) => tracing::debug!(error = %report(&err), "partner probe failed"),
        }
    }
}
