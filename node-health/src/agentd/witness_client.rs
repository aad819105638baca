//! A client of the twosite witness's HTTP API (see the `witness` crate's `http` module).
//!
//! - [`WitnessClient::claim`]: `POST {base}/v1/clusters/{cluster}/claim` with the cluster's
//!   bearer token and the JSON of a [`Claim`]; a 200 answer is the JSON of a [`ClaimOutcome`].
//!   [`WitnessClient::request`] sends a [`ClaimRequest`] (a claim, or a join) the same way.
//! - [`WitnessClient::healthz`]: `GET {base}/healthz`.
//!
//! Every exchange (connect, TLS, request and answer) has one deadline, 1 s unless
//! [`WitnessClient::with_timeout`] says otherwise: a claim answered late is worth nothing, since
//! the grant is counted from when the claim was sent. Refusals (401, 400, 409) are distinct
//! errors carrying the witness's own message; nothing the witness answers makes the client
//! panic.
//!
//! HTTPS uses rustls with ring. The server is verified against the CA certificates of
//! `ca_file` when one is given (a private CA: only those are trusted), else against the
//! system's trusted roots. Plain `http://` is accepted for tests and for a witness behind a
//! trusted tunnel.

use crate::witness::{Claim, ClaimOutcome, ClaimRequest};
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// The default deadline of one exchange with the witness.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest answer read from the witness.
const MAX_ANSWER: usize = 64 * 1024;
/// How much of an unexpected answer is quoted in an error.
const MAX_QUOTE: usize = 200;

/// What can go wrong talking to the witness, or setting up to.
#[derive(Debug, Error)]
pub enum WitnessError {
    /// The base URL is not an `http://` or `https://` URL.
    #[error("witness URL {url:?} is not usable: {what}")]
    BadUrl { url: String, what: String },

    /// The cluster name cannot be a path segment of the witness API.
    #[error("cluster name {0:?} must be 1 to 253 characters of [A-Za-z0-9._-]")]
    BadCluster(String),

    /// The token file could not be read.
    #[error("could not read the witness token file {path}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The token is empty or cannot be sent in a header.
    #[error("the witness token{} is {what}", from_file(.path.as_deref()))]
    BadToken {
        path: Option<PathBuf>,
        what: &'static str,
    },

    /// The CA file could not be read.
    #[error("could not read the witness CA file {path}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The CA file holds no usable certificate.
    #[error("witness CA file {path}: {what}")]
    BadCa { path: PathBuf, what: String },

    /// The system's trusted roots could not be loaded (for an `https://` URL without a CA file).
    #[error("could not load the system's trusted CA certificates")]
    NativeRoots(#[source] std::io::Error),

    /// The TLS configuration could not be built.
    #[error("could not configure TLS for the witness")]
    Tls(#[source] rustls::Error),

    /// 401: a missing or wrong token, or a cluster this witness does not serve.
    #[error("the witness refused the token for cluster {cluster}: {message}")]
    Unauthorized { cluster: String, message: String },

    /// 400: the witness does not take the claim (malformed, a bad or third room).
    #[error("the witness refused the claim: {message}")]
    BadRequest { message: String },

    /// 409: the claim's epoch is stale or was never issued.
    #[error("the witness refused the claim's epoch: {message}")]
    Conflict { message: String },

    /// Any other answer than 200, 400, 401 and 409.
    #[error("the witness answered {status}: {message}")]
    Status { status: StatusCode, message: String },

    /// A 200 answer that is not what the API promises.
    #[error("the witness's answer is malformed: {what}")]
    Malformed { what: String },

    /// The witness could not be reached, or the exchange broke off.
    #[error("could not reach the witness at {url}: {what}")]
    Unreachable { url: String, what: String },

    /// No complete answer within the deadline.
    #[error("the witness did not answer within {after:?}")]
    Timeout { after: Duration },
}

fn from_file(path: Option<&Path>) -> String {
    path.map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

impl WitnessError {
    /// Whether the witness answered and refused (as opposed to not being reachable or
    /// answering nonsense): retrying the same claim will not help until something changes.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            WitnessError::Unauthorized { .. }
                | WitnessError::BadRequest { .. }
                | WitnessError::Conflict { .. }
        )
    }
}

/// Reads a bearer token from a file (a mounted Secret): surrounding white space is dropped; an
/// empty token, or one that cannot be sent in an HTTP header, is refused.
pub fn read_token_file(path: impl AsRef<Path>) -> Result<String, WitnessError> {
    let path = path.as_ref();
    let raw = std::fs::read(path).map_err(|source| WitnessError::TokenFile {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(raw).map_err(|_| WitnessError::BadToken {
        path: Some(path.to_path_buf()),
        what: "not UTF-8",
    })?;
    let token = text.trim().to_string();
    check_token(&token).map_err(|what| WitnessError::BadToken {
        path: Some(path.to_path_buf()),
        what,
    })?;
    Ok(token)
}

fn check_token(token: &str) -> Result<HeaderValue, &'static str> {
    if token.is_empty() {
        return Err("empty");
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("not a single word of visible characters");
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "not sendable in an HTTP header")?;
    value.set_sensitive(true);
    Ok(value)
}

/// A client of one cluster's witness. Cheap to clone.
#[derive(Clone)]
pub struct WitnessClient {
    base: String,
    cluster: String,
    authorization: HeaderValue,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for WitnessClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("WitnessClient")
            .field("base", &self.base)
            .field("cluster", &self.cluster)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl WitnessClient {
    /// A client of the witness at `base_url` (`http://host:port` or `https://host[:port]`,
    /// optionally with a path prefix), for `cluster`, with its bearer `token`. `ca_file`: a PEM
    /// file of the CA certificates that may sign the witness's certificate (only these are then
    /// trusted); without it an `https://` witness is verified against the system's roots.
    pub fn new(
        base_url: &str,
        cluster: &str,
        token: &str,
        ca_file: Option<&Path>,
    ) -> Result<Self, WitnessError> {
        let bad_url = |what: &str| WitnessError::BadUrl {
            url: base_url.to_string(),
            what: what.to_string(),
        };
        let uri: Uri =
            base_url
                .parse()
                .map_err(|e: http::uri::InvalidUri| WitnessError::BadUrl {
                    url: base_url.to_string(),
                    what: e.to_string(),
                })?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(_) => return Err(bad_url("the scheme must be http or https")),
            None => return Err(bad_url("no scheme (http:// or https://)")),
        };
        let Some(authority) = uri.authority() else {
            return Err(bad_url("no host"));
        };
        if authority.as_str().contains('@') {
            return Err(bad_url("credentials do not belong in the URL"));
        }
        if authority.host().is_empty() {
            return Err(bad_url("no host"));
        }
        if uri.query().is_some() {
            return Err(bad_url("a query does not belong in the base URL"));
        }
        if !crate::witness::valid_cluster_name(cluster) {
            return Err(WitnessError::BadCluster(cluster.to_string()));
        }
        let authorization =
            check_token(token).map_err(|what| WitnessError::BadToken { path: None, what })?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match (https, ca_file) {
            (true, None) => builder
                .with_provider_and_native_roots(provider)
                .map_err(WitnessError::NativeRoots)?,
            (_, ca_file) => {
                // A plain http:// witness never uses the TLS configuration: no roots needed.
                let mut roots = rustls::RootCertStore::empty();
                if let Some(path) = ca_file {
                    load_ca(&mut roots, path)?;
                }
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(WitnessError::Tls)?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                builder.with_tls_config(config)
            }
        };
        let timeout = DEFAULT_TIMEOUT;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let connector = if https {
            builder.https_only().enable_http1().wrap_connector(http)
        } else {
            builder.https_or_http().enable_http1().wrap_connector(http)
        };
        Ok(WitnessClient {
            base: uri.to_string().trim_end_matches('/').to_string(),
            cluster: cluster.to_string(),
            authorization,
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        })
    }

    /// The same client with another deadline per exchange.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The cluster this client claims for.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The witness's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Asks the witness for the right to run. The caller records when it sent the claim: a
    /// grant is counted from then.
    pub async fn claim(&self, claim: &Claim) -> Result<ClaimOutcome, WitnessError> {
        self.request(&ClaimRequest::from(claim.clone())).await
    }

    /// Sends a claim or a join ([`ClaimRequest`]) to the claim endpoint; an ordinary claim goes
    /// out exactly as [`Self::claim`] sends it.
    pub async fn request(&self, claim: &ClaimRequest) -> Result<ClaimOutcome, WitnessError> {
        let url = format!("{}/v1/clusters/{}/claim", self.base, self.cluster);
        let body = serde_json::to_vec(claim).map_err(|e| WitnessError::Malformed {
            what: format!("could not encode the claim: {e}"),
        })?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| WitnessError::BadUrl {
                url: url.clone(),
                what: e.to_string(),
            })?;
        let (status, body) = self.exchange(&url, request).await?;
        if status == StatusCode::OK {
            return serde_json::from_slice(&body).map_err(|e| WitnessError::Malformed {
                what: format!("{e} in {}", quote(&body)),
            });
        }
        let message = error_message(&body);
        Err(match status {
            StatusCode::UNAUTHORIZED => WitnessError::Unauthorized {
                cluster: self.cluster.clone(),
                message,
            },
            StatusCode::BAD_REQUEST => WitnessError::BadRequest { message },
            StatusCode::CONFLICT => WitnessError::Conflict { message },
            status => WitnessError::Status { status, message },
        })
    }

    /// Whether the witness is up (`GET /healthz` answers 200).
    pub async fn healthz(&self) -> Result<(), WitnessError> {
        let url = format!("{}/healthz", self.base);
        let request = Request::builder()
            .method(Method::GET)
            .uri(&url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| WitnessError::BadUrl {
                url: url.clone(),
                what: e.to_string(),
            })?;
        let (status, body) = self.exchange(&url, request).await?;
        if status == StatusCode::OK {
            Ok(())
        } else {
            Err(WitnessError::Status {
                status,
                message: error_message(&body),
            })
        }
    }

    /// One request and its whole answer, within the deadline.
    async fn exchange(
        &self,
        url: &str,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), WitnessError> {
        let unreachable = |what: String| WitnessError::Unreachable {
            url: url.to_string(),
            what,
        };
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| unreachable(super::error::report(&e)))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(WitnessError::Timeout {
                after: self.timeout,
            }),
        }
    }
}

/// Adds the certificates of a PEM file to `roots`; at least one must be usable.
fn load_ca(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), WitnessError> {
    let pem = std::fs::read(path).map_err(|source| WitnessError::CaFile {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |what: String| WitnessError::BadCa {
        path: path.to_path_buf(),
        what,
    };
    let mut added = 0usize;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(bad("no certificate in it".to_string()));
    }
    Ok(())
}

/// The witness's `{"error": "..."}` message, or (quoted) whatever it answered instead.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => b.error.chars().take(MAX_QUOTE * 2).collect(),
        Err(_) if body.is_empty() => "(no message)".to_string(),
        Err(_) => quote(body),
    }
}

/// At most [`MAX_QUOTE`] characters of an answer, printable.
fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .take(MAX_QUOTE)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > MAX_QUOTE {
        out.push('…');
    }
    format!("{out:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_clusters_and_tokens_are_checked() {
        let ok = WitnessClient::new("http://127.0.0.1:8443/", "prod", "tok", None).expect("ok");
        assert_eq!(ok.base_url(), "http://127.0.0.1:8443");
        assert!(!format!("{ok:?}").contains("tok\""));
        for url in [
            "127.0.0.1:80",
            "ftp://x",
            "http://",
            "http://u:p@x",
            "http://x/?a=b",
        ] {
            assert!(
                matches!(
                    WitnessClient::new(url, "prod", "tok", None),
                    Err(WitnessError::BadUrl { .. })
                ),
                "{url}"
            );
        }
        for cluster in ["", "a/b", "..", "a b"] {
            assert!(matches!(
                WitnessClient::new("http://x", cluster, "tok", None),
                Err(WitnessError::BadCluster(_))
            ));
        }
        for token in ["", "a b", "a\nb"] {
            assert!(matches!(
                WitnessClient::new("http://x", "prod", token, None),
                Err(WitnessError::BadToken { .. })
            ));
        }
    }

    #[test]
    fn error_messages_are_the_witness_s_or_a_short_quote() {
        assert_eq!(error_message(br#"{"error":"bad token"}"#), "bad token");
        assert_eq!(error_message(b""), "(no message)");
        assert_eq!(error_message(b"oops\n"), "\"oops \"");
        let long = vec![b'x'; 1000];
        assert!(error_message(&long).len() < 210);
    }
}
