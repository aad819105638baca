//! The controller's narrow view of a witness: claim a room, check its health.
//!
//! A small object-safe trait, so the remediation loop and its tests do not depend on the HTTP
//! client: the real one ([`HttpWitness`], over `node_health::agentd::witness_client`) and the
//! tests' fakes implement it. The token is read once, when the flags are checked (a rotated
//! token needs a restart).

use node_health::agentd::witness_client::{WitnessClient, WitnessError};
use node_health::agentd::witness_flags::WitnessSettings;
use node_health::witness::{Claim, ClaimOutcome};
use std::future::Future;
use std::pin::Pin;

/// A boxed future of a witness call.
pub type PortFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, PortError>> + Send + 'a>>;

/// Why a witness call did not give an answer the controller can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// No answer: connection refused or reset, TLS failure, timeout.
    #[error("the witness did not answer: {0}")]
    Unreachable(String),
    /// The witness answered with an error (a wrong token, a refused claim, a failed persist).
    #[error("the witness refused the request (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
}

impl PortError {
    /// The witness answered (it is reachable, even if it said no).
    pub fn answered(&self) -> bool {
        matches!(self, PortError::Refused { .. })
    }
}

/// A witness the controller talks to.
pub trait WitnessPort: Send + Sync {
    /// `POST /v1/clusters/{cluster}/claim`.
    fn claim<'a>(&'a self, claim: &'a Claim) -> PortFuture<'a, ClaimOutcome>;
    /// `GET /healthz`.
    fn healthz(&self) -> PortFuture<'_, ()>;
}

/// The real witness, over HTTP(S): `node_health::agentd::witness_client`.
#[derive(Debug)]
pub struct HttpWitness {
    client: WitnessClient,
}

/// The deadline of one exchange with the witness (below the link's own [`CALL_TIMEOUT`]).
///
/// [`CALL_TIMEOUT`]: crate::witness_link::CALL_TIMEOUT
pub const HTTP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl HttpWitness {
    /// A client for `settings` (their token was read when the flags were checked).
    pub fn new(settings: &WitnessSettings) -> crate::Result<Self> {
        let client = settings
            .client()
            .map_err(|e| crate::Error::WitnessClient(crate::error::report(&e)))?
            .with_timeout(HTTP_TIMEOUT);
        Ok(HttpWitness { client })
    }
}

/// Sorts the client's errors: an HTTP answer means the witness is reachable.
pub fn port_error(err: &WitnessError) -> PortError {
    let message = crate::error::report(err);
    let status = match err {
        WitnessError::Unauthorized { .. } => 401,
        WitnessError::BadRequest { .. } => 400,
        WitnessError::Conflict { .. } => 409,
        WitnessError::Status { status, .. } => status.as_u16(),
        WitnessError::Malformed { .. } => 200,
        _ => return PortError::Unreachable(message),
    };
    PortError::Refused { status, message }
}

impl WitnessPort for HttpWitness {
    fn claim<'a>(&'a self, claim: &'a Claim) -> PortFuture<'a, ClaimOutcome> {
        Box::pin(async move { self.client.claim(claim).await.map_err(|e| port_error(&e)) })
    }

    fn healthz(&self) -> PortFuture<'_, ()> {
        Box::pin(async move { self.client.healthz().await.map_err(|e| port_error(&e)) })
    }
}
