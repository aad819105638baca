//! The witness's HTTP API.
//!
//! - `POST /v1/clusters/{cluster}/claim`: a room asks for the right to run. Body: the JSON of
//!   [`node_health::witness::Claim`] (`{"room": "east", "epoch": 3, "api_reachable": true}`,
//!   `epoch` and `api_reachable` optional, nothing else), at most [`MAX_BODY`] bytes, with the
//!   cluster's bearer token; `"join": true` (optional) asks only to share the grant the room
//!   already holds ([`node_health::witness::ClaimRequest`]). Answer 200 with the
//!   [`ClaimOutcome`] (`granted` or `held`).
//! - `GET /v1/state`: every served cluster's epoch, holder and presence, for operators (any
//!   valid token).
//! - `GET /healthz`: `ok` (no token).
//!
//! Errors are JSON `{"error": "..."}`: 401 for a missing or wrong token and for a cluster this
//! witness does not serve (the same answer, so nobody learns which clusters exist), 400 for a
//! body that is not a claim or names a bad or third room, 409 for a stale or never-issued epoch,
//! 413 for a body over the limit, 503 when a grant could not be persisted (nothing granted).

use crate::error::{Error, Result};
use crate::grants::{ClusterView, RoomGrants};
use crate::tokens::Tokens;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use node_health::Clock;
use node_health::witness::{Claim, ClaimError, ClaimOutcome, ClaimRequest, valid_room};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The largest request body accepted (4 KiB): a claim is a few dozen bytes.
pub const MAX_BODY: usize = 4096;

/// What every request handler shares.
#[derive(Clone)]
pub struct Witness {
    inner: Arc<Inner>,
}

struct Inner {
    /// Claims are serialized: each one, and the persisting of a new grant, runs under this lock
    /// (on a blocking thread, since persisting fsyncs).
    grants: Mutex<RoomGrants>,
    tokens: Tokens,
    clock: Arc<dyn Clock + Send + Sync>,
}

impl Witness {
    /// `clock` must be the clock `grants` was loaded with.
    pub fn new(grants: RoomGrants, tokens: Tokens, clock: Arc<dyn Clock + Send + Sync>) -> Self {
        Witness {
            inner: Arc::new(Inner {
                grants: Mutex::new(grants),
                tokens,
                clock,
            }),
        }
    }

    /// Runs `f` on the grants under the lock, on a blocking thread.
    async fn with_grants<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut RoomGrants, &dyn Clock) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            // A panic while the lock was held may have left an arbiter ahead of the state file:
            // refuse to go on (a restart reloads the file).
            let mut grants = inner.grants.lock().map_err(|_| Error::Poisoned)?;
            f(&mut grants, inner.clock.as_ref())
        })
        .await
        .map_err(Error::Join)?
    }
}

pub fn router(witness: Witness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/state", get(state))
        .route("/v1/clusters/{cluster}/claim", post(claim))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(witness)
}

async fn healthz(State(w): State<Witness>) -> Response {
    if w.inner.grants.is_poisoned() {
        return Error::Poisoned.into_response();
    }
    (StatusCode::OK, "ok").into_response()
}

/// The wire form of [`Claim`], refusing fields it does not know (a typo like `"epok"` must not
/// silently turn a renewal into a fresh claim).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    room: String,
    #[serde(default)]
    epoch: Option<u64>,
    #[serde(default)]
    api_reachable: bool,
    #[serde(default)]
    join: bool,
}

/// Decodes a claim's (or a join's) body; the error says what is wrong.
pub fn decode_claim(body: &[u8]) -> Result<ClaimRequest> {
    let b: ClaimBody = serde_json::from_slice(body).map_err(|e| Error::BadClaim(e.to_string()))?;
    if !valid_room(&b.room) {
        return Err(Error::Claim(ClaimError::BadRoom));
    }
    Ok(ClaimRequest {
        claim: Claim {
            room: b.room,
            epoch: b.epoch,
            api_reachable: b.api_reachable,
        },
        join: b.join,
    })
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Result<&[u8]> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(Error::MissingToken)?
        .as_bytes();
    let (scheme, token) = value
        .iter()
        .position(|b| *b == b' ')
        .map(|i| value.split_at(i))
        .ok_or(Error::MissingToken)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(Error::MissingToken);
    }
    Ok(token.trim_ascii())
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::TooLarge { limit: MAX_BODY }
        } else {
            Error::BadBody(rejection.body_text())
        }
    })
}

async fn claim(
    State(w): State<Witness>,
    cluster: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let cluster = cluster.map(|Path(c)| c).unwrap_or_default();
    match handle_claim(&w, &cluster, &headers, body).await {
        Ok(outcome) => Json(outcome).into_response(),
        Err(err) => {
            if err.status().is_server_error() {
                tracing::error!(cluster, error = %crate::error::report(&err), "claim failed");
            } else {
                tracing::info!(
                    status = err.status().as_u16(),
                    error = %crate::error::report(&err),
                    "claim refused"
                );
            }
            err.into_response()
        }
    }
}

async fn handle_claim(
    w: &Witness,
    cluster: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<ClaimOutcome> {
    let token = bearer(headers)?;
    if !w.inner.tokens.check(cluster, token) {
        return Err(Error::BadToken);
    }
    let claim = decode_claim(&body_bytes(body)?)?;
    let cluster = cluster.to_string();
    w.with_grants(move |grants, clock| {
        let outcome = grants.request(&cluster, &claim, clock.now())?;
        tracing::debug!(cluster, room = %claim.claim.room, join = claim.join, ?outcome, "claim answered");
        Ok(outcome)
    })
    .await
}

/// `GET /v1/state`.
#[derive(Debug, Serialize)]
pub struct StateView {
    pub clusters: BTreeMap<String, ClusterView>,
}

async fn state(State(w): State<Witness>, headers: HeaderMap) -> Response {
    let result = async {
        let token = bearer(&headers)?;
        if !w.inner.tokens.check_any(token) {
            return Err(Error::BadToken);
        }
        w.with_grants(|grants, clock| {
            Ok(StateView {
                clusters: grants.view(clock.now()),
            })
        })
        .await
    };
    match result.await {
        Ok(view) => Json(view).into_response(),
        Err(err) => err.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_core_claim_and_refuses_what_is_not_one() {
        let c = Claim {
            room: "east".into(),
            epoch: Some(3),
            api_reachable: true,
        };
        let wire = serde_json::to_vec(&c).expect("encode");
        assert_eq!(
            decode_claim(&wire).expect("decode"),
            ClaimRequest::from(c.clone())
        );
        let join = ClaimRequest {
            claim: c,
            join: true,
        };
        let wire = serde_json::to_vec(&join).expect("encode");
        assert_eq!(decode_claim(&wire).expect("decode"), join);
        let minimal = decode_claim(br#"{"room":"west"}"#).expect("decode");
        assert_eq!(minimal.claim.epoch, None);
        assert!(!minimal.claim.api_reachable);
        assert!(!minimal.join);
        for (body, what) in [
            (&br#"{"room":"east","epok":3}"#[..], "unknown field `epok`"),
            (br#"{"epoch":3}"#, "missing field `room`"),
            (br#"{"room":"east","epoch":-1}"#, "invalid value"),
            (b"room=east", "expected value"),
            (b"", "EOF"),
        ] {
            let err = decode_claim(body).expect_err("refused");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST);
            assert!(err.to_string().contains(what), "{err}");
        }
        let err = decode_claim(br#"{"room":"East Wing"}"#).expect_err("bad room");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        assert!(matches!(bearer(&h), Err(Error::MissingToken)));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().expect("hv"));
        assert!(matches!(bearer(&h), Err(Error::MissingToken)));
        h.insert(header::AUTHORIZATION, "bearer  tok ".parse().expect("hv"));
        assert_eq!(bearer(&h).expect("token"), b"tok");
    }
}
