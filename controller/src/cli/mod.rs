//! The operator's commands: `twosite switchover` ([`switchover`]) and `twosite status`
//! ([`status`]). Both run with the user's kubeconfig; their decisions are pure functions
//! (`node_health::volume::switchover::plan`, [`status::report`]), the rest only reads (and the
//! switchover sets one annotation).
//!
//! Exit status: 0 done, 1 failed (timeout, API error), 2 refused (bad input; nothing written).

pub mod status;
pub mod switchover;

use k8s_openapi::api::core::v1::Pod;
use node_health::volume::switchover::{PodFacts, SwitchoverRefusal, VOLUME_LABEL, VolumeRefError};
use std::process::ExitCode;
use std::time::Duration;
use thiserror::Error;

/// Every API call's time limit.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a command did not do what was asked.
#[derive(Debug, Error)]
pub enum CliError {
    #[error(transparent)]
    VolumeRef(#[from] VolumeRefError),
    #[error("switchover refused: {0}")]
    Refused(#[from] SwitchoverRefusal),
    #[error("there is no Lease {lease} in namespace {namespace}")]
    NoLease { namespace: String, lease: String },
    #[error(
        "the Lease {namespace}/{lease} is not a readable volume lease: {reason}; fix or remove the annotation first"
    )]
    BadLease {
        namespace: String,
        lease: String,
        reason: String,
    },
    #[error("--timeout-secs must be at least 1")]
    BadTimeout,
    #[error(
        "the switch to {to} did not finish within {after:?}: {state}; the preferred holder stays set to {to} (clear it with `kubectl -n {namespace} annotate lease {lease} twosite.dev/preferred-holder-`)"
    )]
    Timeout {
        namespace: String,
        lease: String,
        to: String,
        /// Where the switch stands (see [`timeout_state`]).
        state: String,
        after: Duration,
    },
    #[error(
        "the switchover to {to} was abandoned: {}; the Lease {}. The controller clears the preferred holder when the target cannot take the volume: see `kubectl -n {namespace} get events`",
        match .preferred {
            Some(p) => format!("the preferred holder now names {p}"),
            None => "the preferred holder was cleared".to_string(),
        },
        match .holder {
            Some(h) => format!("is held by {h} (epoch {epoch})"),
            None => format!("is released (epoch {epoch})"),
        }
    )]
    Abandoned {
        namespace: String,
        to: String,
        preferred: Option<String>,
        /// The holder's pod name and UID; `None`: released.
        holder: Option<String>,
        epoch: u64,
    },
    #[error("the Lease {namespace}/{lease} was deleted during the switchover")]
    LeaseGone { namespace: String, lease: String },
    #[error("the Lease kept changing under the switchover: {attempts} conflicting writes")]
    Conflicts { attempts: u32 },
    #[error(transparent)]
    Api(#[from] crate::Error),
    #[error("could not print JSON")]
    Json(#[source] serde_json::Error),
}

impl CliError {
    /// 2 when the request was refused and nothing was written, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::VolumeRef(_)
            | CliError::Refused(_)
            | CliError::NoLease { .. }
            | CliError::BadLease { .. }
            | CliError::BadTimeout => 2,
            _ => 1,
        }
    }
}

/// Where a switch that timed out stands: still held by `holder` (a pod name and UID), or
/// released and not taken.
pub fn timeout_state(holder: Option<&str>, epoch: u64, to: &str) -> String {
    match holder {
        Some(h) => format!(
            "the Lease is still held by {h} at epoch {epoch}: the holder has not stood down (is its guard running, is its app slow to stop?)"
        ),
        None => format!(
            "the holder stood down and released the Lease (epoch {epoch}), but {to} has not taken it (is its guard running?)"
        ),
    }
}

/// Logs go to stderr (warnings by default; `RUST_LOG` to see more), the output to stdout.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one command on a fresh runtime and turns its outcome into the exit status.
fn run<F, Fut>(command: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), CliError>>,
{
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {}", crate::error::report(&crate::Error::Runtime(e)));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::error::report(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

/// A client from the user's kubeconfig (or the pod's service account).
async fn client() -> Result<kube::Client, CliError> {
    kube::Client::try_default()
        .await
        .map_err(|e| CliError::Api(crate::Error::ClientConfig(e)))
}

/// What the switchover decision and the status read of a pod.
pub fn pod_facts(pod: &Pod) -> PodFacts {
    let meta = &pod.metadata;
    PodFacts {
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        node: pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        volume: meta
            .labels
            .as_ref()
            .and_then(|l| l.get(VOLUME_LABEL))
            .cloned(),
        phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
        deleting: meta.deletion_timestamp.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_exit_2_failures_exit_1() {
        let refused = CliError::NoLease {
            namespace: "ns".into(),
            lease: "l".into(),
        };
        assert_eq!(refused.exit_code(), 2);
        assert_eq!(refused.to_string(), "there is no Lease l in namespace ns");
        let timeout = CliError::Timeout {
            namespace: "ns".into(),
            lease: "l".into(),
            to: "b".into(),
            state: timeout_state(Some("a (uid u-a)"), 3, "b"),
            after: Duration::from_secs(60),
        };
        assert_eq!(timeout.exit_code(), 1);
        assert!(
            timeout
                .to_string()
                .starts_with("the switch to b did not finish within 60s: the Lease is still held by a (uid u-a) at epoch 3"),
            "{timeout}"
        );
        assert!(timeout_state(None, 3, "b").contains("but b has not taken it"));
        let abandoned = CliError::Abandoned {
            namespace: "ns".into(),
            to: "b".into(),
            preferred: None,
            holder: None,
            epoch: 3,
        };
        assert_eq!(abandoned.exit_code(), 1);
        assert!(
            abandoned.to_string().starts_with(
                "the switchover to b was abandoned: the preferred holder was cleared; the Lease is released (epoch 3)."
            ),
            "{abandoned}"
        );
    }

    #[test]
    fn a_pod_reads_as_its_name_uid_node_label_and_phase() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "block-a", "uid": "u-1",
                         "labels": {"twosite.dev/volume": "block-data"},
                         "deletionTimestamp": "2026-12-07T02:00:00Z"},
            "spec": {"nodeName": "a-1", "containers": []},
            "status": {"phase": "Running"}
        }))
        .expect("a pod");
        assert_eq!(
            pod_facts(&pod),
            PodFacts {
                name: "block-a".into(),
                uid: "u-1".into(),
                node: Some("a-1".into()),
                volume: Some("block-data".into()),
                phase: Some("Running".into()),
                deleting: true,
            }
        );
    }
}
