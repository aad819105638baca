//! `twosite switchover NAMESPACE/LEASE [--to POD]`: a planned switchover of a protected volume.
//!
//! Reads the Lease and its consumer pods, asks [`node_health::volume::switchover::plan`] for the
//! target, sets the annotation `twosite.dev/preferred-holder=<target UID>` with a merge patch
//! that carries the resourceVersion read (a 409 reads and decides again), then polls the Lease
//! until the target holds it. The holder's guard stops its app, unmounts and releases; the
//! target's guard takes the released lease. Refusals write nothing and exit 2; a timeout exits 1
//! and leaves the preferred holder set.

use super::{CliError, REQUEST_TIMEOUT, client, pod_facts};
use crate::error::with_timeout;
use crate::guard::lease_io::{PREFERRED_HOLDER_ANNOTATION, to_volume_lease};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use node_health::volume::switchover::{
    PodFacts, SwitchoverPlan, VOLUME_LABEL, VolumeRef, name_of, plan,
};
use serde_json::json;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How often the Lease is read while waiting for the new holder.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// Conflicting writes (409) tolerated before giving up.
const MAX_CONFLICTS: u32 = 5;
const FIELD_MANAGER: &str = "twosite-cli";

/// Move a protected volume to another consumer pod and wait until it holds the volume.
#[derive(clap::Args, Debug, Clone)]
pub struct SwitchoverArgs {
    /// The volume Lease: NAMESPACE/LEASE (e.g. block-demo/block-data).
    pub volume: String,
    /// The consumer pod to move the volume to. Default: the other consumer, when the volume has
    /// exactly two.
    #[arg(long, value_name = "POD")]
    pub to: Option<String>,
    /// How long to wait for the target to hold the volume.
    #[arg(long, default_value_t = 60, value_name = "N")]
    pub timeout_secs: u64,
}

pub fn main(args: SwitchoverArgs) -> ExitCode {
    super::run(|| switchover(args))
}

async fn read_lease(leases: &Api<Lease>, name: &str) -> Result<Option<Lease>, CliError> {
    Ok(with_timeout(
        "get the volume Lease",
        REQUEST_TIMEOUT,
        leases.get_opt(name),
    )
    .await?)
}

/// The consumers of the volume and, when `to` names a pod that is not one, that pod if it exists.
async fn read_pods(
    pods: &Api<Pod>,
    volume: &VolumeRef,
    to: Option<&str>,
) -> Result<Vec<PodFacts>, CliError> {
    let selector = format!("{VOLUME_LABEL}={}", volume.lease);
    let list = with_timeout(
        "list the consumer pods",
        REQUEST_TIMEOUT,
        pods.list(&ListParams::default().labels(&selector)),
    )
    .await?;
    let mut facts: Vec<PodFacts> = list.items.iter().map(pod_facts).collect();
    if let Some(name) = to.filter(|n| !facts.iter().any(|p| &p.name == n)) {
        let pod = with_timeout("get the target pod", REQUEST_TIMEOUT, pods.get_opt(name)).await?;
        facts.extend(pod.as_ref().map(pod_facts));
    }
    Ok(facts)
}

/// The holder and epoch as the Lease shows them (no other field needs to parse).
fn holder_and_epoch(lease: &Lease) -> (Option<String>, u64) {
    let spec = lease.spec.as_ref();
    (
        spec.and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty()),
        spec.and_then(|s| s.lease_transitions)
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(0),
    )
}

/// Where a switchover stands, from one read of the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Progress {
    /// The target holds the Lease.
    Done { epoch: u64 },
    /// The preferred holder still names the target, which does not hold the Lease yet.
    Waiting { holder: Option<String>, epoch: u64 },
    /// The preferred holder no longer names the target (cleared by the controller, replaced by
    /// another switchover, or dropped by a consumer that took the Lease by expiry).
    Abandoned {
        preferred: Option<String>,
        holder: Option<String>,
        epoch: u64,
    },
}

fn progress(lease: &Lease, to: &str) -> Progress {
    let (holder, epoch) = holder_and_epoch(lease);
    if holder.as_deref() == Some(to) {
        return Progress::Done { epoch };
    }
    // As the guards read it: the annotation, else spec.preferredHolder.
    let preferred = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PREFERRED_HOLDER_ANNOTATION).cloned())
        .or_else(|| lease.spec.as_ref().and_then(|s| s.preferred_holder.clone()))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty());
    if preferred.as_deref() == Some(to) {
        Progress::Waiting { holder, epoch }
    } else {
        Progress::Abandoned {
            preferred,
            holder,
            epoch,
        }
    }
}

async fn switchover(args: SwitchoverArgs) -> Result<(), CliError> {
    let volume: VolumeRef = args.volume.parse()?;
    if args.timeout_secs == 0 {
        return Err(CliError::BadTimeout);
    }
    let timeout = Duration::from_secs(args.timeout_secs);
    let client = client().await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &volume.namespace);
    let pods: Api<Pod> = Api::namespaced(client, &volume.namespace);
    let no_lease = || CliError::NoLease {
        namespace: volume.namespace.clone(),
        lease: volume.lease.clone(),
    };

    let mut conflicts = 0;
    let (to, from, facts) = loop {
        let lease = read_lease(&leases, &volume.lease)
            .await?
            .ok_or_else(no_lease)?;
        let view = to_volume_lease(&lease).map_err(|e| CliError::BadLease {
            namespace: volume.namespace.clone(),
            lease: volume.lease.clone(),
            reason: e.to_string(),
        })?;
        let facts = read_pods(&pods, &volume, args.to.as_deref()).await?;
        let (to, from) = match plan(&volume, &view, &facts, args.to.as_deref())? {
            SwitchoverPlan::AlreadyHolder { pod } => {
                println!(
                    "{} holds {volume} already (uid {}, epoch {}): nothing to do",
                    pod.name, pod.uid, view.epoch
                );
                return Ok(());
            }
            SwitchoverPlan::Switch { to, from } => (to, from),
        };
        let patch = json!({
            "metadata": {
                "resourceVersion": view.resource_version,
                "annotations": { PREFERRED_HOLDER_ANNOTATION: to.uid },
            }
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        match with_timeout(
            "set the preferred holder",
            REQUEST_TIMEOUT,
            leases.patch(&volume.lease, &params, &Patch::Merge(&patch)),
        )
        .await
        {
            Ok(_) => break (to, from, facts),
            Err(e) if e.is_conflict() => {
                conflicts += 1;
                tracing::info!(volume = %volume, conflicts, "the Lease changed under the write: reading it again");
                if conflicts >= MAX_CONFLICTS {
                    return Err(CliError::Conflicts {
                        attempts: conflicts,
                    });
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    let started = Instant::now();
    let from_words = match &from {
        Some(p) => format!("{} on {}", p.name, p.node.as_deref().unwrap_or("no node")),
        None => "the holder".to_string(),
    };
    println!(
        "asked {from_words} to hand {volume} over to {} (uid {}) on {}; waiting up to {} s",
        to.name,
        to.uid,
        to.node.as_deref().unwrap_or("no node"),
        timeout.as_secs()
    );
    tracing::info!(volume = %volume, to = %to.name, uid = %to.uid, "preferred holder set");

    let mut last = (None, 0);
    loop {
        match read_lease(&leases, &volume.lease).await {
            Ok(Some(lease)) => match progress(&lease, &to.uid) {
                Progress::Done { epoch } => {
                    println!(
                        "switched {volume} to {} (uid {}) in {:.2} s, epoch {epoch}",
                        to.name,
                        to.uid,
                        started.elapsed().as_secs_f64(),
                    );
                    return Ok(());
                }
                Progress::Waiting { holder, epoch } => last = (holder, epoch),
                Progress::Abandoned {
                    preferred,
                    holder,
                    epoch,
                } => {
                    let holder = holder.map(|uid| format!("{} (uid {uid})", name_of(&facts, &uid)));
                    return Err(CliError::Abandoned {
                        namespace: volume.namespace.clone(),
                        to: to.name.clone(),
                        preferred: preferred.map(|p| name_of(&facts, &p)),
                        holder,
                        epoch,
                    });
                }
            },
            Ok(None) => {
                return Err(CliError::LeaseGone {
                    namespace: volume.namespace.clone(),
                    lease: volume.lease.clone(),
                });
            }
            // A failed read is retried until the deadline.
            Err(e) => {
                tracing::warn!(volume = %volume, error = %crate::error::report(&e), "could not read the Lease")
            }
        }
        if started.elapsed() >= timeout {
            let holder = last
                .0
                .as_deref()
                .map(|uid| format!("{} (uid {uid})", name_of(&facts, uid)));
            return Err(CliError::Timeout {
                namespace: volume.namespace.clone(),
                lease: volume.lease.clone(),
                to: to.name.clone(),
                state: super::timeout_state(holder.as_deref(), last.1, &to.name),
                after: timeout,
            });
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_and_epoch_read_an_empty_holder_as_released() {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": "l"},
            "spec": {"holderIdentity": "", "leaseTransitions": 4}
        }))
        .expect("a lease");
        assert_eq!(holder_and_epoch(&lease), (None, 4));
        let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "l"}})).expect("l");
        assert_eq!(holder_and_epoch(&lease), (None, 0));
    }

    #[test]
    fn progress_is_done_waiting_or_abandoned() {
        let lease = |holder: &str, preferred: Option<&str>| -> Lease {
            let annotations = match preferred {
                Some(p) => json!({ PREFERRED_HOLDER_ANNOTATION: p }),
                None => json!({}),
            };
            serde_json::from_value(json!({
                "metadata": {"name": "l", "annotations": annotations},
                "spec": {"holderIdentity": holder, "leaseTransitions": 4}
            }))
            .expect("a lease")
        };
        // Done even when the controller has already cleared the preferred holder.
        assert_eq!(
            progress(&lease("b", None), "b"),
            Progress::Done { epoch: 4 }
        );
        assert_eq!(
            progress(&lease("a", Some("b")), "b"),
            Progress::Waiting {
                holder: Some("a".into()),
                epoch: 4
            }
        );
        assert_eq!(
            progress(&lease("", Some("b")), "b"),
            Progress::Waiting {
                holder: None,
                epoch: 4
            }
        );
        assert_eq!(
            progress(&lease("a", None), "b"),
            Progress::Abandoned {
                preferred: None,
                holder: Some("a".into()),
                epoch: 4
            }
        );
        assert_eq!(
            progress(&lease("a", Some("c")), "b"),
            Progress::Abandoned {
                preferred: Some("c".into()),
                holder: Some("a".into()),
                epoch: 4
            }
        );
    }
}
