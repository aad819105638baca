//! A volume Lease as the API server keeps it, and as the core reads it
//! ([`node_health::volume::VolumeLease`]): the mapping, and the guard's three writes.
//!
//! - `spec.holderIdentity`: who may write (empty: released).
//! - `spec.leaseTransitions`: the epoch.
//! - `spec.leaseDurationSeconds`: the duration the holder promises to stay within.
//! - annotation `twosite.dev/preferred-holder`: the planned switchover's target. The field
//!   `spec.preferredHolder` exists only where the `CoordinatedLeaderElection` feature gate is on
//!   (alpha in 1.31, off by default through 1.33) and an API server without the gate drops it
//!   silently, so twosite writes the annotation; a `spec.preferredHolder` someone else set is
//!   honoured too (the annotation wins when both are set).
//! - annotation `twosite.dev/handover`: the controller's handover, `{"to": ID, "epoch": N}`.
//!
//! Every write is a PUT of the object last read, carrying its `resourceVersion`: a racing
//! writer gets 409.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use node_health::volume::{Handover, VolumeLease, acquire_keeps_preferred};
use std::time::Duration;

pub const PREFERRED_HOLDER_ANNOTATION: &str = "twosite.dev/preferred-holder";
pub const HANDOVER_ANNOTATION: &str = "twosite.dev/handover";
/// Marks a Lease as a protected volume's (the controller lists them by it).
pub const VOLUME_LABEL: &str = "twosite.dev/volume";

/// Why a Lease cannot be read as a volume lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseFormatError {
    #[error("leaseTransitions is negative ({0})")]
    NegativeEpoch(i32),
    #[error("the annotation {HANDOVER_ANNOTATION} is not {{\"to\": ID, \"epoch\": N}}: {0}")]
    Handover(String),
}

fn annotation<'a>(lease: &'a Lease, key: &str) -> Option<&'a str> {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// The core's view of `lease`.
pub fn to_volume_lease(lease: &Lease) -> Result<VolumeLease, LeaseFormatError> {
    let spec = lease.spec.clone().unwrap_or_default();
    let epoch = spec.lease_transitions.unwrap_or(0);
    let epoch = u64::try_from(epoch).map_err(|_| LeaseFormatError::NegativeEpoch(epoch))?;
    let handover = annotation(lease, HANDOVER_ANNOTATION)
        .filter(|h| !h.trim().is_empty())
        .map(|h| {
            serde_json::from_str::<Handover>(h)
                .map_err(|e| LeaseFormatError::Handover(e.to_string()))
        })
        .transpose()?;
    let preferred = annotation(lease, PREFERRED_HOLDER_ANNOTATION)
        .map(str::to_string)
        .or(spec.preferred_holder.clone())
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty());
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let held_for_node =
        annotation(lease, node_health::vm::HELD_FOR_NODE_ANNOTATION).map(|n| n.trim().to_string());
    Ok(VolumeLease {
        held_for_node,
        released: holder.is_none(),
        holder,
        epoch,
        resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
        preferred_holder: preferred,
        handover,
        duration: Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        ),
    })
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

fn epoch_i32(epoch: u64) -> Option<i32> {
    i32::try_from(epoch).ok()
}

fn spec_mut(lease: &mut Lease) -> &mut LeaseSpec {
    lease.spec.get_or_insert_with(LeaseSpec::default)
}

/// Drops the handover, and the controller's VM marker: a lease a guard takes is the guard's,
/// renewed and expiring like any guard's.
fn drop_handover(lease: &mut Lease) {
    if let Some(a) = lease.metadata.annotations.as_mut() {
        a.remove(HANDOVER_ANNOTATION);
        a.remove(node_health::vm::HELD_FOR_NODE_ANNOTATION);
    }
}

/// The acquire write: holder = `me`, epoch, acquire and renew time now, the duration, no
/// handover; the preferred holder is kept unless it names another consumer
/// ([`acquire_keeps_preferred`]). `None` when the epoch does not fit the field or the Lease
/// cannot be read.
pub fn acquired(read: &Lease, me: &str, epoch: u64, duration: Duration) -> Option<Lease> {
    let mut lease = read.clone();
    let transitions = epoch_i32(epoch)?;
    if !acquire_keeps_preferred(&to_volume_lease(read).ok()?, me) {
        if let Some(a) = lease.metadata.annotations.as_mut() {
            a.remove(PREFERRED_HOLDER_ANNOTATION);
        }
        spec_mut(&mut lease).preferred_holder = None;
    }
    let spec = spec_mut(&mut lease);
    spec.holder_identity = Some(me.to_string());
    spec.lease_transitions = Some(transitions);
    spec.acquire_time = Some(now_micro());
    spec.renew_time = Some(now_micro());
    spec.lease_duration_seconds =
        Some(i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX));
    drop_handover(&mut lease);
    Some(lease)
}

/// The renew write: renew time now, all else kept.
pub fn renewed(read: &Lease) -> Lease {
    let mut lease = read.clone();
    spec_mut(&mut lease).renew_time = Some(now_micro());
    lease
}

/// The release write: holder cleared (released), epoch and preferred holder kept.
pub fn released(read: &Lease) -> Lease {
    let mut lease = read.clone();
    let spec = spec_mut(&mut lease);
    spec.holder_identity = None;
    spec.renew_time = Some(now_micro());
    lease
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn lease(holder: Option<&str>, annotations: &[(&str, &str)]) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("db".into()),
                resource_version: Some("41".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_transitions: Some(3),
                lease_duration_seconds: Some(10),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_lease_reads_as_the_core_expects() {
        let l = to_volume_lease(&lease(
            Some("uid-a"),
            &[
                (PREFERRED_HOLDER_ANNOTATION, "uid-b"),
                (HANDOVER_ANNOTATION, r#"{"to":"uid-b","epoch":4}"#),
            ],
        ))
        .expect("reads");
        assert_eq!(l.holder(), Some("uid-a"));
        assert_eq!(l.epoch, 3);
        assert_eq!(l.resource_version, "41");
        assert_eq!(l.preferred_holder.as_deref(), Some("uid-b"));
        assert_eq!(
            l.handover,
            Some(Handover {
                to: "uid-b".into(),
                epoch: 4
            })
        );
        assert_eq!(l.duration, Duration::from_secs(10));
        let free = to_volume_lease(&lease(Some(""), &[])).expect("reads");
        assert!(free.released && free.holder().is_none());
    }

    #[test]
    fn a_malformed_handover_is_an_error_not_a_missing_one() {
        // Read as "no handover", a malformed one would let the old holder renew on.
        assert!(matches!(
            to_volume_lease(&lease(Some("a"), &[(HANDOVER_ANNOTATION, "uid-b")])),
            Err(LeaseFormatError::Handover(_))
        ));
    }

    #[test]
    fn the_writes_keep_what_they_must() {
        let read = lease(
            Some("uid-a"),
            &[
                (PREFERRED_HOLDER_ANNOTATION, "uid-b"),
                (HANDOVER_ANNOTATION, r#"{"to":"uid-b","epoch":4}"#),
            ],
        );
        let a = acquired(&read, "uid-b", 4, Duration::from_secs(10)).expect("fits");
        let av = to_volume_lease(&a).expect("reads");
        assert_eq!(av.holder(), Some("uid-b"));
        assert_eq!(av.epoch, 4);
        assert_eq!(av.handover, None);
        assert_eq!(av.preferred_holder.as_deref(), Some("uid-b"));
        assert_eq!(a.metadata.resource_version.as_deref(), Some("41"));
        let r = to_volume_lease(&released(&a)).expect("reads");
        assert!(r.released && r.epoch == 4);
        assert_eq!(r.preferred_holder.as_deref(), Some("uid-b"));
        assert!(renewed(&a).spec.and_then(|s| s.renew_time).is_some());
        assert!(acquired(&read, "x", u64::MAX, Duration::from_secs(10)).is_none());
        // Taken by another than the preferred one (by expiry): the preference goes.
        let c = acquired(&read, "uid-c", 4, Duration::from_secs(10)).expect("fits");
        assert_eq!(to_volume_lease(&c).expect("reads").preferred_holder, None);
    }
}
