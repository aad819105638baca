//! Which consumer a planned switchover (`twosite switchover NAMESPACE/LEASE [--to POD]`) moves a
//! volume to, or why it is refused: a pure decision over the volume Lease and the pods read,
//! so the CLI and, later, the controller ask the same function.
//!
//! - The consumers of Lease `L` are the pods of its namespace labelled
//!   `twosite.dev/volume=L`; their identity on the Lease is their UID.
//! - `--to POD` names the target; it must exist, be a consumer of `L`, not be being deleted and
//!   be Running (a pod that is not running has no guard to take the volume: the holder would
//!   stand down for nobody).
//! - Without `--to`, the target is the one other consumer when there are exactly two; any
//!   other count needs `--to`.
//! - A target that holds the lease already is no switch ([`SwitchoverPlan::AlreadyHolder`]).
//! - While the controller hands the lease over after a fence, a switchover is refused: the
//!   handover decides who takes it.
//!
//! The controller's own rules for a request ([`super::plan_switchover`]) add what only it knows
//! (which nodes are live or fenced).

use super::VolumeLease;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The label that makes a pod a consumer of a volume Lease (and marks the Lease itself).
pub const VOLUME_LABEL: &str = "twosite.dev/volume";

/// A pod as the switchover decision reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodFacts {
    pub name: String,
    /// `metadata.uid`: the consumer's identity on the Lease.
    pub uid: String,
    /// `spec.nodeName`, once scheduled.
    pub node: Option<String>,
    /// The value of its `twosite.dev/volume` label.
    pub volume: Option<String>,
    /// `status.phase` (`Pending`, `Running`, ...).
    pub phase: Option<String>,
    /// It has a `deletionTimestamp`.
    pub deleting: bool,
}

/// `NAMESPACE/LEASE`, checked as Kubernetes checks the names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRef {
    pub namespace: String,
    pub lease: String,
}

impl std::fmt::Display for VolumeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.lease)
    }
}

/// Why `NAMESPACE/LEASE` is not one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VolumeRefError {
    #[error("{0:?} is not NAMESPACE/LEASE (one slash, e.g. block-demo/block-data)")]
    Syntax(String),
    #[error("{0:?} is not a valid namespace (lower-case letters, digits and '-', at most 63)")]
    Namespace(String),
    #[error(
        "{0:?} is not a valid Lease name (lower-case letters, digits, '-' and '.', at most 253)"
    )]
    Lease(String),
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns_label)
}

impl std::str::FromStr for VolumeRef {
    type Err = VolumeRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (namespace, lease) = s
            .split_once('/')
            .filter(|(_, l)| !l.contains('/'))
            .ok_or_else(|| VolumeRefError::Syntax(s.to_string()))?;
        if !dns_label(namespace) {
            return Err(VolumeRefError::Namespace(namespace.to_string()));
        }
        if !dns_subdomain(lease) {
            return Err(VolumeRefError::Lease(lease.to_string()));
        }
        Ok(VolumeRef {
            namespace: namespace.to_string(),
            lease: lease.to_string(),
        })
    }
}

/// What the switchover does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SwitchoverPlan {
    /// Set the preferred holder to this consumer and wait until it holds the lease.
    Switch {
        to: PodFacts,
        /// The current holder's pod, when it is a known consumer.
        from: Option<PodFacts>,
    },
    /// The target holds the lease already: nothing to write.
    AlreadyHolder { pod: PodFacts },
}

/// Why a switchover is refused (nothing is written).
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum SwitchoverRefusal {
    #[error("there is no pod {pod} in namespace {namespace}")]
    NoSuchPod { namespace: String, pod: String },
    #[error(
        "pod {pod} is not a consumer of the volume Lease {volume}: it is labelled {label}, not {VOLUME_LABEL}={lease}",
        label = labelled_as(.labelled.as_deref()),
        lease = .volume.lease
    )]
    NotAConsumer {
        volume: VolumeRef,
        pod: String,
        labelled: Option<String>,
    },
    #[error("the volume Lease {volume} has no consumer pods (none labelled {VOLUME_LABEL}={lease})", lease = .volume.lease)]
    NoConsumers { volume: VolumeRef },
    #[error(
        "the volume Lease {volume} has {} consumers ({}) {}: name the target with --to POD",
        .consumers.len(),
        .consumers.join(", "),
        holder_words(.holder.as_deref())
    )]
    NameTheTarget {
        volume: VolumeRef,
        consumers: Vec<String>,
        holder: Option<String>,
    },
    #[error("pod {pod} is being deleted: it cannot take the volume")]
    TargetDeleting { pod: String },
    #[error(
        "pod {pod} is {phase}, not Running: no guard runs there to take the volume",
        phase = .phase.as_deref().unwrap_or("without a phase")
    )]
    TargetNotRunning { pod: String, phase: Option<String> },
    #[error(
        "the controller is handing the volume over to {to} (epoch {epoch}) after a fence: wait until that is done"
    )]
    HandoverPending { to: String, epoch: u64 },
}

fn labelled_as(value: Option<&str>) -> String {
    match value {
        Some(v) => format!("{VOLUME_LABEL}={v}"),
        None => format!("without {VOLUME_LABEL}"),
    }
}

fn holder_words(holder: Option<&str>) -> String {
    match holder {
        Some(h) => format!("and {h} holds it"),
        None => "and none of them holds it".to_string(),
    }
}

/// The switchover of `volume` to `to` (a pod name) or, without it, to the one other consumer.
/// `pods`: the consumers of the volume (labelled pods of its namespace) and, when `to` names a
/// pod that is not among them, that pod if it exists.
pub fn plan(
    volume: &VolumeRef,
    lease: &VolumeLease,
    pods: &[PodFacts],
    to: Option<&str>,
) -> Result<SwitchoverPlan, SwitchoverRefusal> {
    if let Some(h) = &lease.handover {
        return Err(SwitchoverRefusal::HandoverPending {
            to: name_of(pods, &h.to),
            epoch: h.epoch,
        });
    }
    let consumers: Vec<&PodFacts> = pods
        .iter()
        .filter(|p| p.volume.as_deref() == Some(volume.lease.as_str()))
        .collect();
    let holder = lease.holder();
    let holder_pod = holder.and_then(|h| consumers.iter().find(|p| p.uid == h).copied());
    let target = match to {
        Some(name) => {
            let pod = pods.iter().find(|p| p.name == name).ok_or_else(|| {
                SwitchoverRefusal::NoSuchPod {
                    namespace: volume.namespace.clone(),
                    pod: name.to_string(),
                }
            })?;
            if pod.volume.as_deref() != Some(volume.lease.as_str()) {
                return Err(SwitchoverRefusal::NotAConsumer {
                    volume: volume.clone(),
                    pod: name.to_string(),
                    labelled: pod.volume.clone(),
                });
            }
            pod
        }
        None => {
            if consumers.is_empty() {
                return Err(SwitchoverRefusal::NoConsumers {
                    volume: volume.clone(),
                });
            }
            let others: Vec<&PodFacts> = consumers
                .iter()
                .filter(|p| Some(p.uid.as_str()) != holder)
                .copied()
                .collect();
            match (consumers.len(), holder_pod, others.as_slice()) {
                (2, Some(_), [other]) => *other,
                _ => {
                    let mut names: Vec<String> = consumers.iter().map(|p| p.name.clone()).collect();
                    names.sort();
                    return Err(SwitchoverRefusal::NameTheTarget {
                        volume: volume.clone(),
                        consumers: names,
                        holder: holder.map(|h| name_of(pods, h)),
                    });
                }
            }
        }
    };
    if holder == Some(target.uid.as_str()) {
        return Ok(SwitchoverPlan::AlreadyHolder {
            pod: target.clone(),
        });
    }
    if target.deleting {
        return Err(SwitchoverRefusal::TargetDeleting {
            pod: target.name.clone(),
        });
    }
    if target.phase.as_deref() != Some("Running") {
        return Err(SwitchoverRefusal::TargetNotRunning {
            pod: target.name.clone(),
            phase: target.phase.clone(),
        });
    }
    Ok(SwitchoverPlan::Switch {
        to: target.clone(),
        from: holder_pod.cloned(),
    })
}

/// The pod name of identity `uid`, or the identity itself when no pod read has it.
pub fn name_of(pods: &[PodFacts], uid: &str) -> String {
    pods.iter()
        .find(|p| p.uid == uid)
        .map(|p| p.name.clone())
        .unwrap_or_else(|| uid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Handover;
    use std::time::Duration;

    fn vref() -> VolumeRef {
        "block-demo/block-data".parse().expect("valid")
    }

    fn pod(name: &str, volume: Option<&str>) -> PodFacts {
        PodFacts {
            name: name.into(),
            uid: format!("uid-{name}"),
            node: Some(format!("node-{name}")),
            volume: volume.map(str::to_string),
            phase: Some("Running".into()),
            deleting: false,
        }
    }

    fn consumers(names: &[&str]) -> Vec<PodFacts> {
        names.iter().map(|n| pod(n, Some("block-data"))).collect()
    }

    fn lease(holder: Option<&str>) -> VolumeLease {
        VolumeLease {
            held_for_node: None,
            holder: holder.map(|h| format!("uid-{h}")),
            released: holder.is_none(),
            epoch: 3,
            resource_version: "7".into(),
            preferred_holder: None,
            handover: None,
            duration: Duration::from_secs(10),
        }
    }

    #[test]
    fn volume_refs_are_checked_like_kubernetes_names() {
        assert_eq!(
            vref(),
            VolumeRef {
                namespace: "block-demo".into(),
                lease: "block-data".into()
            }
        );
        assert_eq!(vref().to_string(), "block-demo/block-data");
        assert!("ns/a.b-c".parse::<VolumeRef>().is_ok());
        for bad in ["block-data", "a/b/c", ""] {
            assert!(
                matches!(bad.parse::<VolumeRef>(), Err(VolumeRefError::Syntax(_))),
                "{bad}"
            );
        }
        for bad in ["ns/", "ns/-x", "ns/X", "ns/a..b", "ns/a_b"] {
            assert!(
                matches!(bad.parse::<VolumeRef>(), Err(VolumeRefError::Lease(_))),
                "{bad}"
            );
        }
        for bad in [
            "/x",
            "Ns/x",
            "a.b/x",
            "-a/x",
            &format!("{}/x", "n".repeat(64)),
        ] {
            assert!(
                matches!(bad.parse::<VolumeRef>(), Err(VolumeRefError::Namespace(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn without_to_the_one_other_of_two_consumers_is_the_target() {
        let pods = consumers(&["a", "b"]);
        let plan = plan(&vref(), &lease(Some("a")), &pods, None).expect("a switch");
        assert_eq!(
            plan,
            SwitchoverPlan::Switch {
                to: pods[1].clone(),
                from: Some(pods[0].clone())
            }
        );
    }

    #[test]
    fn without_to_any_other_count_or_no_known_holder_asks_for_to() {
        for (names, holder) in [
            (&["a", "b", "c"][..], Some("a")),
            (&["a", "b"][..], None),
            (&["a", "b"][..], Some("x")),
            (&["a"][..], Some("a")),
        ] {
            let err =
                plan(&vref(), &lease(holder), &consumers(names), None).expect_err("ambiguous");
            assert!(
                matches!(err, SwitchoverRefusal::NameTheTarget { .. }),
                "{names:?} {holder:?}: {err}"
            );
            assert!(err.to_string().contains("--to POD"), "{err}");
        }
        let err = plan(&vref(), &lease(Some("a")), &[], None).expect_err("none");
        assert_eq!(
            err.to_string(),
            "the volume Lease block-demo/block-data has no consumer pods (none labelled twosite.dev/volume=block-data)"
        );
    }

    #[test]
    fn to_names_any_consumer_even_among_three_or_with_no_holder() {
        let pods = consumers(&["a", "b", "c"]);
        for holder in [Some("a"), None] {
            match plan(&vref(), &lease(holder), &pods, Some("c")) {
                Ok(SwitchoverPlan::Switch { to, .. }) => assert_eq!(to.name, "c"),
                other => panic!("{holder:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_pod_that_is_missing_or_no_consumer_of_this_lease_is_refused() {
        let mut pods = consumers(&["a", "b"]);
        let err = plan(&vref(), &lease(Some("a")), &pods, Some("ghost")).expect_err("missing");
        assert_eq!(
            err.to_string(),
            "there is no pod ghost in namespace block-demo"
        );
        pods.push(pod("web", None));
        pods.push(pod("other", Some("other-data")));
        let err = plan(&vref(), &lease(Some("a")), &pods, Some("web")).expect_err("no label");
        assert_eq!(
            err.to_string(),
            "pod web is not a consumer of the volume Lease block-demo/block-data: it is labelled without twosite.dev/volume, not twosite.dev/volume=block-data"
        );
        let err = plan(&vref(), &lease(Some("a")), &pods, Some("other")).expect_err("other");
        assert!(
            err.to_string()
                .contains("it is labelled twosite.dev/volume=other-data"),
            "{err}"
        );
        // A pod of another volume never counts as a consumer of this one.
        assert!(plan(&vref(), &lease(Some("a")), &pods, None).is_ok());
    }

    #[test]
    fn the_holder_as_target_is_no_switch() {
        let pods = consumers(&["a", "b"]);
        assert_eq!(
            plan(&vref(), &lease(Some("a")), &pods, Some("a")),
            Ok(SwitchoverPlan::AlreadyHolder {
                pod: pods[0].clone()
            })
        );
    }

    #[test]
    fn a_target_without_a_running_guard_is_refused() {
        let mut pods = consumers(&["a", "b"]);
        pods[1].phase = Some("Pending".into());
        assert_eq!(
            plan(&vref(), &lease(Some("a")), &pods, None),
            Err(SwitchoverRefusal::TargetNotRunning {
                pod: "b".into(),
                phase: Some("Pending".into())
            })
        );
        pods[1].phase = None;
        let err = plan(&vref(), &lease(Some("a")), &pods, Some("b")).expect_err("no phase");
        assert_eq!(
            err.to_string(),
            "pod b is without a phase, not Running: no guard runs there to take the volume"
        );
        pods[1].phase = Some("Running".into());
        pods[1].deleting = true;
        assert_eq!(
            plan(&vref(), &lease(Some("a")), &pods, Some("b")),
            Err(SwitchoverRefusal::TargetDeleting { pod: "b".into() })
        );
    }

    #[test]
    fn a_pending_handover_refuses_every_switchover() {
        let pods = consumers(&["a", "b"]);
        let mut l = lease(Some("a"));
        l.handover = Some(Handover {
            to: "uid-b".into(),
            epoch: 4,
        });
        let err = plan(&vref(), &l, &pods, Some("b")).expect_err("handover");
        assert_eq!(
            err,
            SwitchoverRefusal::HandoverPending {
                to: "b".into(),
                epoch: 4
            }
        );
        assert!(
            err.to_string()
                .contains("handing the volume over to b (epoch 4)")
        );
    }
}
