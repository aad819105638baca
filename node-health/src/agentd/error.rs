//! The agent's one error type.

use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// `--no-watchdog` or `--test-watchdog-file` without `--i-understand-no-fencing`.
    #[error(
        "{flag} turns self-fencing off: the controller may then release this node's \
         workloads while they still run here. Pass --i-understand-no-fencing as well to accept that"
    )]
    FencingNotAcknowledged { flag: &'static str },

    /// A witness flag is missing, does not go with the others, or is unusable.
    #[error(transparent)]
    WitnessFlags(#[from] super::witness_flags::WitnessFlagError),

    /// The agent's timing is unsafe.
    #[error("invalid agent timing")]
    Timing(#[source] crate::verdict::TimingError),

    /// A Kubernetes API call answered with an error.
    #[error("Kubernetes API call failed: {action}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },

    /// A Kubernetes API call did not answer in time.
    #[error("Kubernetes API call timed out after {after:?}: {action}")]
    Timeout {
        action: &'static str,
        after: Duration,
    },

    /// The in-cluster or kubeconfig client configuration could not be loaded.
    #[error("could not configure the Kubernetes client")]
    ClientConfig(#[source] kube::Error),

    /// No `--room`, and the Node has no `topology.kubernetes.io/zone` label.
    #[error("node {node} has no topology.kubernetes.io/zone label; pass --room or set NODE_ZONE")]
    NoRoom { node: String },

    /// The boot ID could not be read.
    #[error("could not read the boot ID from {path}")]
    BootId {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// CLOCK_BOOTTIME could not be read: the agent judges every deadline on it.
    #[error("could not read the boot clock (CLOCK_BOOTTIME)")]
    BootClock(#[source] std::io::Error),

    /// The watchdog device could not be found, loaded, opened or written.
    #[error("watchdog {path}: {what}")]
    Watchdog {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// A peer did not answer a probe usefully.
    #[error("peer probe to {addr} failed: {what}")]
    Probe {
        addr: std::net::SocketAddr,
        what: String,
    },

    /// A partner's answer was refused: it counts as no answer.
    #[error("refused the answer from {addr}: {refusal}")]
    PeerRefused {
        addr: std::net::SocketAddr,
        refusal: crate::peer_auth::PeerRefusal,
    },

    /// The peer keys could not be read at start.
    #[error(
        "no usable peer key: without it any process on the node network could vouch for this \
         node. Mount the Secret twosite-peer-key (see the README), or pass \
         --insecure-peer-probes --i-understand-no-fencing for tests"
    )]
    PeerKeys(#[source] super::peer_keys::KeyFileError),

    /// `--insecure-peer-probes` without `--i-understand-no-fencing`.
    #[error(
        "--insecure-peer-probes lets anyone who can answer on the partner's address vouch for \
         this node, so the controller may release its workloads while they still run here. \
         Pass --i-understand-no-fencing as well to accept that"
    )]
    InsecurePeersNotAcknowledged,

    /// The peer HTTP port could not be opened or failed.
    #[error("peer HTTP server on {addr} failed")]
    PeerServer {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// The guards' socket could not be bound.
    #[error("could not listen for volume guards on {path}")]
    GuardSocket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The tokio runtime could not be built.
    #[error("could not start the async runtime")]
    Runtime(#[source] std::io::Error),

    /// A main task ended; the agent must not keep running without it.
    #[error("the {0} task ended")]
    TaskEnded(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the API server refused a write because the object changed (409 Conflict).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube { source: kube::Error::Api(s), .. } if s.is_conflict())
    }

    /// Whether the API server answered 404 Not Found.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Kube { source: kube::Error::Api(s), .. } if s.is_not_found())
    }
}

/// The error and all its sources on one line, for logs (shared with the controller).
pub use crate::report::report;

/// Runs one Kubernetes API call with a deadline, naming it for errors and logs.
pub async fn with_timeout<T>(
    action: &'static str,
    after: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T> {
    match tokio::time::timeout(after, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(Error::Kube { action, source }),
        Err(_) => Err(Error::Timeout { action, after }),
    }
}
