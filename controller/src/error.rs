//! The controller crate's one error type.

use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
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

    /// The leader election timing is unsafe or the identity is empty.
    #[error("invalid leader election configuration")]
    LeaderConfig(#[source] node_health::leader::LeaderConfigError),

    /// No identity was given and the hostname is unusable.
    #[error("no leader identity: pass --identity or set POD_NAME")]
    NoIdentity(#[source] std::io::Error),

    /// The CRD could not be rendered.
    #[error("could not render the CustomResourceDefinition as YAML")]
    CrdYaml(#[source] serde_norway::Error),

    /// The admin HTTP port could not be opened or failed.
    #[error("admin HTTP server on {addr} failed")]
    Admin {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// A JSON document the controller builds (a JSON Patch) was malformed.
    #[error("could not build a JSON document")]
    Json(#[source] serde_json::Error),

    /// The node health timing is unsafe.
    #[error("invalid node health timing")]
    Timing(#[source] node_health::verdict::TimingError),

    /// The tokio runtime could not be built.
    #[error("could not start the async runtime")]
    Runtime(#[source] std::io::Error),

    /// The witness client could not be set up (its CA file, its token file).
    #[error("could not set up the witness client: {0}")]
    WitnessClient(String),

    /// A VM action could not be carried out as decided (its object changed in the cache).
    #[error("VM protection: {0}")]
    Vm(String),

    /// The admission webhook could not start (its certificate, its port).
    #[error("VM admission webhook: {0}")]
    Webhook(String),

    /// A main loop ended; the process must not keep running without it.
    #[error("the {0} loop ended")]
    LoopEnded(&'static str),

    /// A main loop panicked or was cancelled.
    #[error("the {name} task died")]
    TaskDied {
        name: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, bounded label for the `error` label of the error metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { source, .. } => match source {
                kube::Error::Api(s) if s.is_conflict() => "conflict",
                kube::Error::Api(s) if s.is_not_found() => "not_found",
                kube::Error::Api(s) if s.is_forbidden() => "forbidden",
                kube::Error::Api(_) => "api",
                _ => "transport",
            },
            Error::Timeout { .. } => "timeout",
            Error::ClientConfig(_) => "client_config",
            Error::LeaderConfig(_) => "leader_config",
            Error::NoIdentity(_) => "no_identity",
            Error::CrdYaml(_) => "crd_yaml",
            Error::Admin { .. } => "admin",
            Error::Json(_) => "json",
            Error::Timing(_) => "timing",
            Error::Runtime(_) => "runtime",
            Error::WitnessClient(_) => "witness_client",
            Error::Vm(_) => "vm",
            Error::Webhook(_) => "webhook",
            Error::LoopEnded(_) => "loop_ended",
            Error::TaskDied { .. } => "task_died",
        }
    }

    /// Whether the API server refused a write because the object changed (409 Conflict).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube { source: kube::Error::Api(s), .. } if s.is_conflict())
    }

    /// Whether the API server answered AlreadyExists to a create.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, Error::Kube { source: kube::Error::Api(s), .. } if s.is_already_exists())
    }
}

/// The error and all its sources on one line, for logs (shared with the agent; kept here so
/// that `crate::error::report` stays the one name to reach for).
pub use node_health::report::report;

/// Publishes one Event about `regarding`, best effort: a lost Event is logged, never an error
/// (the remediation and the volume loops share it).
pub async fn publish_event(
    recorder: &crate::events::EventSink,
    api_timeout: std::time::Duration,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    event: (&str, bool, &str),
    message: String,
) {
    use kube::runtime::events::{Event, EventType};
    let (reason, warning, action) = event;
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_string(),
        note: Some(message),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(err) = with_timeout(
        "publish event",
        api_timeout,
        recorder.publish(&event, regarding),
    )
    .await
    {
        tracing::warn!(
            object = regarding.name.as_deref().unwrap_or_default(),
            reason,
            error = %report(&err),
            "could not publish event"
        );
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_every_cause_once() {
        let inner = std::io::Error::other("disk on fire");
        let err = Error::Admin {
            addr: ([127, 0, 0, 1], 8080).into(),
            source: inner,
        };
        assert_eq!(
            report(&err),
            "admin HTTP server on 127.0.0.1:8080 failed: disk on fire"
        );
        let status = kube::core::Status::failure("nope", "Conflict").with_code(409);
        let err = Error::Kube {
            action: "replace lease",
            source: kube::Error::Api(status.boxed()),
        };
        assert!(err.is_conflict() && !err.is_already_exists());
        assert_eq!(err.metric_label(), "conflict");
        let text = report(&err);
        assert!(
            text.starts_with("Kubernetes API call failed: replace lease: ApiError: nope"),
            "{text}"
        );
        assert_eq!(text.matches("nope: Conflict").count(), 1, "{text}");
    }
}
