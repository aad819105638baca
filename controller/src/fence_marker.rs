//! The fence marker on a node's agent heartbeat Lease: the commit that makes a fence final.
//!
//! The core commits a fence by writing a marker onto the heartbeat Lease *on the condition that
//! the Lease is still the version the Dead verdict was judged on*: if the agent renewed
//! meanwhile (the node came back), the write fails and nothing is fenced. Once the marker is on,
//! the agent refuses to regain the right to run until it is cleared. Both writes are JSON
//! Patches that start with a `test` of `metadata.resourceVersion`.

use crate::error::{Error, Result, with_timeout};
use crate::leader_lease::Leadership;
use backon::{BackoffBuilder, ExponentialBuilder};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use std::time::Duration;

/// The fence marker: on a heartbeat Lease, the boot ID the node had when it was fenced.
pub const FENCE_MARKER_ANNOTATION: &str = "twosite.dev/fenced-boot-id";

fn marker_path() -> String {
    format!(
        "/metadata/annotations/{}",
        FENCE_MARKER_ANNOTATION
            .replace('~', "~0")
            .replace('/', "~1")
    )
}

/// The patch that puts the marker on a Lease whose resourceVersion is `heartbeat`.
pub fn commit_patch(heartbeat: &str, fenced_boot_id: Option<&str>, lease: &Lease) -> Value {
    let value = fenced_boot_id.unwrap_or("unknown");
    let add = if lease.metadata.annotations.is_some() {
        json!({"op": "add", "path": marker_path(), "value": value})
    } else {
        json!({"op": "add", "path": "/metadata/annotations", "value": {FENCE_MARKER_ANNOTATION: value}})
    };
    json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": heartbeat},
        add,
    ])
}

/// The patch that takes the marker off `lease`, or `None` when it carries none.
pub fn clear_patch(lease: &Lease) -> Option<Value> {
    let rv = lease.metadata.resource_version.clone().unwrap_or_default();
    lease
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(FENCE_MARKER_ANNOTATION))
        .then(|| {
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                {"op": "remove", "path": marker_path()},
            ])
        })
}

fn json_patch(v: Value) -> Result<Patch<()>> {
    Ok(Patch::Json(serde_json::from_value(v).map_err(Error::Json)?))
}

/// Whether the write failed because the Lease is not the version we expected (or is gone).
fn changed_under_us(err: &Error) -> bool {
    matches!(err, Error::Kube { source: kube::Error::Api(s), .. } if matches!(s.code, 404 | 409 | 422))
}

/// Commits the fence of the node whose heartbeat Lease is `lease_name`. `Ok(true)`: the marker
/// is on. `Ok(false)`: the Lease changed since `heartbeat` (the node renewed), is gone, or this
/// replica no longer leads: nothing written.
pub async fn commit_fence(
    leases: &Api<Lease>,
    leadership: &Leadership,
    lease_name: &str,
    heartbeat: &str,
    fenced_boot_id: Option<&str>,
    api_timeout: Duration,
) -> Result<bool> {
    // Only the annotations' presence matters for the patch's shape; the test op pins the
    // version, so a Lease read later than `heartbeat` makes the write fail, as it must.
    let Some(lease) = with_timeout("get lease", api_timeout, leases.get_opt(lease_name)).await?
    else {
        return Ok(false);
    };
    if lease.metadata.resource_version.as_deref() != Some(heartbeat) {
        return Ok(false);
    }
    let patch = json_patch(commit_patch(heartbeat, fenced_boot_id, &lease))?;
    if !leadership.is_leader() {
        return Ok(false);
    }
    match with_timeout(
        "commit fence marker",
        api_timeout,
        leases.patch(lease_name, &PatchParams::default(), &patch),
    )
    .await
    {
        Ok(_) => Ok(true),
        Err(err) if changed_under_us(&err) => Ok(false),
        Err(err) => Err(err),
    }
}

/// Takes the marker off the Lease, re-reading and retrying (bounded) when the agent renewed in
/// between. `Ok(true)` when the Lease carries no marker any more.
pub async fn clear_fence(
    leases: &Api<Lease>,
    leadership: &Leadership,
    lease_name: &str,
    api_timeout: Duration,
) -> Result<bool> {
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_jitter()
        .with_max_times(4)
        .build();
    loop {
        let Some(lease) =
            with_timeout("get lease", api_timeout, leases.get_opt(lease_name)).await?
        else {
            return Ok(true);
        };
        let Some(patch) = clear_patch(&lease) else {
            return Ok(true);
        };
        if !leadership.is_leader() {
            return Ok(false);
        }
        match with_timeout(
            "clear fence marker",
            api_timeout,
            leases.patch(lease_name, &PatchParams::default(), &json_patch(patch)?),
        )
        .await
        {
            Ok(_) => return Ok(true),
            Err(err) if changed_under_us(&err) => match backoff.next() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err(err),
            },
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn commit_is_conditional_on_the_judged_heartbeat_and_clear_removes_only_the_marker() {
        let mut lease = Lease {
            metadata: ObjectMeta {
                resource_version: Some("7".into()),
                annotations: Some([("twosite.dev/boot-id".to_string(), "b".to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: None,
        };
        assert_eq!(
            commit_patch("7", Some("boot-1"), &lease),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
                {"op": "add", "path": "/metadata/annotations/twosite.dev~1fenced-boot-id", "value": "boot-1"},
            ])
        );
        assert_eq!(clear_patch(&lease), None);
        if let Some(a) = lease.metadata.annotations.as_mut() {
            a.insert(FENCE_MARKER_ANNOTATION.into(), "boot-1".into());
        }
        assert_eq!(
            clear_patch(&lease),
            Some(json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
                {"op": "remove", "path": "/metadata/annotations/twosite.dev~1fenced-boot-id"},
            ]))
        );
    }
}
