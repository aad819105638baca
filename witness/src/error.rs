//! The witness's one error type: refusals at start (flags, tokens, state, TLS), failures while
//! serving, and the answers to bad requests (each with its HTTP status).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use node_health::witness::ClaimError;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- refused at start: flags ---
    #[error(
        "refusing to serve plain HTTP: give --tls-cert and --tls-key, or --insecure-http to accept \
         that bearer tokens cross the network in clear text"
    )]
    InsecureNotAcknowledged,
    #[error("--tls-cert and --tls-key must be given together")]
    TlsHalfConfigured,
    #[error("--preferred-room {0:?}: a room name is 1 to 63 characters of [a-z0-9._-]")]
    BadPreferredRoom(String),

    // --- refused at start: files ---
    #[error("cannot read the tokens file {path}")]
    TokensRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tokens file {path}, line {line}: {reason}")]
    TokensLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("tokens file {0} names no cluster")]
    TokensEmpty(PathBuf),
    #[error("cannot read the state file {path}")]
    StateRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state file {path} is corrupt ({reason}); refusing to start rather than risk issuing an \
         epoch twice: restore it from a backup, or (only if no room can still hold a grant) move \
         it away"
    )]
    StateCorrupt { path: PathBuf, reason: String },
    #[error("state file {path} is in use by another witness (lock file {lock})")]
    StateLocked { path: PathBuf, lock: PathBuf },
    #[error("cannot lock the state file {path}")]
    StateLock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the TLS {what} {path}")]
    TlsRead {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS certificate file {0} holds no certificate")]
    TlsNoCertificate(PathBuf),
    #[error("TLS certificate and key are not usable")]
    TlsConfig(#[source] rustls::Error),

    // --- while serving ---
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("accepting connections failed")]
    Accept(#[source] std::io::Error),
    #[error("cannot persist the witness state to {path} while {action}")]
    Persist {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the witness state")]
    Encode(#[source] serde_json::Error),
    #[error("the witness state is unusable after an internal failure; restart the witness")]
    Poisoned,
    #[error("internal task failed")]
    Join(#[source] tokio::task::JoinError),

    // --- answers to bad requests ---
    #[error("missing bearer token (Authorization: Bearer <token>)")]
    MissingToken,
    /// A wrong token, or a cluster this witness does not serve: the same answer for both, so a
    /// caller learns nothing about which clusters exist.
    #[error("invalid bearer token for this cluster")]
    BadToken,
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    #[error("bad claim: {0}")]
    BadClaim(String),
    #[error(transparent)]
    Claim(#[from] ClaimError),
}

impl Error {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::MissingToken | Error::BadToken => StatusCode::UNAUTHORIZED,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::BadBody(_) | Error::BadClaim(_) => StatusCode::BAD_REQUEST,
            Error::Claim(ClaimError::StaleEpoch { .. } | ClaimError::UnknownEpoch { .. }) => {
                StatusCode::CONFLICT
            }
            Error::Claim(ClaimError::BadRoom | ClaimError::ThirdRoom(..)) => {
                StatusCode::BAD_REQUEST
            }
            // Nothing was granted: the claimant asks again later.
            Error::Persist { .. } | Error::Encode(_) | Error::Poisoned | Error::Join(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Exit status when the witness cannot start: 2 for what the operator gave (flags, tokens,
    /// TLS material), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::InsecureNotAcknowledged
            | Error::TlsHalfConfigured
            | Error::BadPreferredRoom(_)
            | Error::TokensRead { .. }
            | Error::TokensLine { .. }
            | Error::TokensEmpty(_)
            | Error::TlsRead { .. }
            | Error::TlsNoCertificate(_)
            | Error::TlsConfig(_) => 2,
            _ => 1,
        }
    }
}

/// The error and its causes on one line.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Json(serde_json::json!({ "error": report(&self) }));
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"twosite-witness\""),
            );
        }
        response
    }
}
