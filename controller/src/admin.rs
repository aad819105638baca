//! The admin HTTP port: `/livez`, `/readyz` and `/metrics`.
//!
//! Liveness is real: every main loop registers with [`Health`], beats while it works, and is
//! marked dead when it ends. `/livez` fails when a loop is dead or silent for longer than it
//! promised. Readiness waits for the first complete listing of every watch (Nodes, heartbeat Leases).

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct LoopState {
    name: &'static str,
    last_beat: Instant,
    /// How long the loop may stay silent; `None`: only its end counts.
    max_silence: Option<Duration>,
    ended: bool,
}

/// The liveness and readiness of the process.
#[derive(Debug, Default)]
pub struct Health {
    loops: Mutex<Vec<LoopState>>,
    nodes_synced: AtomicBool,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Health::default())
    }

    /// Registers a main loop. The loop counts as dead once the returned guard is dropped.
    pub fn register(
        self: &Arc<Self>,
        name: &'static str,
        max_silence: Option<Duration>,
    ) -> LoopGuard {
        let mut loops = self.loops.lock().unwrap_or_else(PoisonError::into_inner);
        loops.push(LoopState {
            name,
            last_beat: Instant::now(),
            max_silence,
            ended: false,
        });
        LoopGuard {
            health: Arc::clone(self),
            index: loops.len() - 1,
        }
    }

    /// `Ok` while every loop runs and has beaten recently; otherwise what is wrong.
    pub fn liveness(&self) -> Result<(), String> {
        let loops = self.loops.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let problems: Vec<String> = loops
            .iter()
            .filter_map(|l| {
                if l.ended {
                    Some(format!("{} loop ended", l.name))
                } else if l
                    .max_silence
                    .is_some_and(|max| now.duration_since(l.last_beat) > max)
                {
                    Some(format!(
                        "{} loop silent for {:?}",
                        l.name,
                        now.duration_since(l.last_beat)
                    ))
                } else {
                    None
                }
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Every watch has completed its first listing.
    pub fn set_nodes_synced(&self) {
        self.nodes_synced.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.nodes_synced.load(Ordering::Acquire)
    }
}

/// A registered loop's handle: beat while working; dropping it marks the loop ended.
#[derive(Debug)]
pub struct LoopGuard {
    health: Arc<Health>,
    index: usize,
}

impl LoopGuard {
    pub fn beat(&self) {
        let mut loops = self
            .health
            .loops
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = loops.get_mut(self.index) {
            l.last_beat = Instant::now();
        }
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let mut loops = self
            .health
            .loops
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = loops.get_mut(self.index) {
            l.ended = true;
        }
    }
}

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// The admin routes.
pub fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { health, metrics })
}

async fn livez(State(s): State<AdminState>) -> impl IntoResponse {
    match s.health.liveness() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the Node and heartbeat watches have not synced yet\n",
        )
    }
}

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    match s.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
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

/// Binds the admin port.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Admin { addr, source })
}

/// Serves the admin port until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let addr = listener.local_addr().map_err(|source| Error::Admin {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    axum::serve(listener, router(health, metrics))
        .await
        .map_err(|source| Error::Admin { addr, source })
}
