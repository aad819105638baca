//! twosite's taints on a Node — the out-of-service taint, and the early
//! `twosite.dev/unresponsive:NoSchedule` — the JSON Patch that adds or removes one (pure), and
//! the conflict-safe write.
//!
//! Every patch starts with a `test` of the Node's `metadata.resourceVersion`, so it applies only
//! to the Node we read: a Node changed meanwhile (another taint added, a label edited) fails the
//! test, and the write is retried on a fresh read. The new `spec.taints` keeps every other taint
//! exactly as it was; the `twosite.dev/fenced-boot-id` annotation goes on with the taint and
//! comes off with it.

use crate::error::{Error, Result, with_timeout};
use crate::leader_lease::Leadership;
use crate::nodes::{is_out_of_service, is_unresponsive};
use backon::{BackoffBuilder, ExponentialBuilder};
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::Api;
use kube::api::{Patch, PatchParams};
use node_health::remediation::{
    FENCED_BOOT_ANNOTATION, OUT_OF_SERVICE_TAINT_EFFECT, OUT_OF_SERVICE_TAINT_KEY,
    OUT_OF_SERVICE_TAINT_VALUE, UNRESPONSIVE_TAINT_EFFECT, UNRESPONSIVE_TAINT_KEY,
};
use serde_json::{Value, json};
use std::time::Duration;

/// What to do with twosite's taints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaintChange {
    /// Add the out-of-service taint (unless present) and record the boot ID the node had when
    /// fenced (`""` when it was unknown).
    Apply { fenced_boot_id: Option<String> },
    /// Remove the out-of-service taint and the annotation; keep every other taint.
    Remove,
    /// Add `twosite.dev/unresponsive:NoSchedule` (unless present).
    MarkUnschedulable,
    /// Remove `twosite.dev/unresponsive:NoSchedule`; keep every other taint.
    ClearUnschedulable,
}

impl TaintChange {
    pub fn what(&self) -> &'static str {
        match self {
            TaintChange::Apply { .. } => "apply out-of-service taint",
            TaintChange::Remove => "remove out-of-service taint",
            TaintChange::MarkUnschedulable => "apply unresponsive taint",
            TaintChange::ClearUnschedulable => "remove unresponsive taint",
        }
    }
}

/// The out-of-service taint twosite applies.
pub fn out_of_service_taint() -> Taint {
    Taint {
        key: OUT_OF_SERVICE_TAINT_KEY.to_string(),
        value: Some(OUT_OF_SERVICE_TAINT_VALUE.to_string()),
        effect: OUT_OF_SERVICE_TAINT_EFFECT.to_string(),
        time_added: None,
    }
}

/// The early `NoSchedule` taint twosite puts on a node judged dead.
pub fn unresponsive_taint() -> Taint {
    Taint {
        key: UNRESPONSIVE_TAINT_KEY.to_string(),
        value: None,
        effect: UNRESPONSIVE_TAINT_EFFECT.to_string(),
        time_added: None,
    }
}

/// Whether a taint is the one a change is about.
type TaintTest = fn(&Taint) -> bool;

/// Escapes a key for a JSON Pointer (RFC 6901).
fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The JSON Patch that makes `node` carry (or not carry) the taint `change` is about, or `None`
/// when it already does what `change` asks. The first operation tests the Node's
/// resourceVersion; every other taint is kept exactly.
pub fn taint_patch(node: &Node, change: &TaintChange) -> Option<Value> {
    let rv = node.metadata.resource_version.clone().unwrap_or_default();
    let taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let annotations = node.metadata.annotations.as_ref();
    let annotation = annotations.and_then(|a| a.get(FENCED_BOOT_ANNOTATION));
    let annotation_path = format!(
        "/metadata/annotations/{}",
        pointer_token(FENCED_BOOT_ANNOTATION)
    );
    let mut ops = vec![json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv})];

    // Which of our taints the change is about, and whether it must be on.
    let (ours, make, on): (TaintTest, fn() -> Taint, bool) = match change {
        TaintChange::Apply { .. } => (is_out_of_service, out_of_service_taint, true),
        TaintChange::Remove => (is_out_of_service, out_of_service_taint, false),
        TaintChange::MarkUnschedulable => (is_unresponsive, unresponsive_taint, true),
        TaintChange::ClearUnschedulable => (is_unresponsive, unresponsive_taint, false),
    };
    let mut new_taints: Vec<Taint> = taints.iter().filter(|t| on || !ours(t)).cloned().collect();
    if on && !taints.iter().any(ours) {
        new_taints.push(make());
    }
    if new_taints != taints {
        let value = serde_json::to_value(&new_taints).unwrap_or(Value::Null);
        if node.spec.is_none() {
            ops.push(json!({"op": "add", "path": "/spec", "value": {"taints": value}}));
        } else {
            // `add` on an existing member replaces it; on a missing one it creates it.
            ops.push(json!({"op": "add", "path": "/spec/taints", "value": value}));
        }
    }

    match change {
        TaintChange::Apply { fenced_boot_id } => {
            let wanted = fenced_boot_id.clone().unwrap_or_default();
            if annotation != Some(&wanted) {
                if annotations.is_none() {
                    ops.push(json!({
                        "op": "add",
                        "path": "/metadata/annotations",
                        "value": {FENCED_BOOT_ANNOTATION: wanted},
                    }));
                } else {
                    ops.push(json!({"op": "add", "path": annotation_path, "value": wanted}));
                }
            }
        }
        TaintChange::Remove => {
            if annotation.is_some() {
                ops.push(json!({"op": "remove", "path": annotation_path}));
            }
        }
        TaintChange::MarkUnschedulable | TaintChange::ClearUnschedulable => {}
    }
    (ops.len() > 1).then_some(Value::Array(ops))
}

/// What a taint write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintOutcome {
    /// The Node was patched.
    Written,
    /// The Node already was as asked.
    AlreadyDone,
    /// The Node does not exist (any more).
    NodeGone,
    /// Leadership was lost before the write: nothing written.
    NotLeader,
}

/// How often a write whose resourceVersion test failed is retried on a fresh read.
pub const MAX_TAINT_ATTEMPTS: usize = 5;

fn conflict_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(MAX_TAINT_ATTEMPTS - 1)
        .build()
}

/// Whether a write failed because the Node changed after we read it: the `test` operation
/// failed (422 Invalid) or the server saw a stale resourceVersion (409 Conflict).
fn stale_read(err: &Error) -> bool {
    matches!(err, Error::Kube { source: kube::Error::Api(s), .. } if s.code == 409 || s.code == 422)
}

/// Reads `name`, computes the patch for `change` and writes it, re-reading and retrying (with
/// backoff, at most [`MAX_TAINT_ATTEMPTS`] times) when the Node changed in between. Leadership
/// is checked right before every write.
pub async fn change_taint(
    nodes: &Api<Node>,
    leadership: &Leadership,
    name: &str,
    change: &TaintChange,
    api_timeout: Duration,
) -> Result<TaintOutcome> {
    let mut backoff = conflict_backoff();
    loop {
        let Some(node) = with_timeout("get node", api_timeout, nodes.get_opt(name)).await? else {
            return Ok(TaintOutcome::NodeGone);
        };
        let Some(patch) = taint_patch(&node, change) else {
            return Ok(TaintOutcome::AlreadyDone);
        };
        let patch: json_patch::Patch = serde_json::from_value(patch).map_err(Error::Json)?;
        if !leadership.is_leader() {
            return Ok(TaintOutcome::NotLeader);
        }
        let action = change.what();
        let result = with_timeout(
            action,
            api_timeout,
            nodes.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch)),
        )
        .await;
        match result {
            Ok(_) => return Ok(TaintOutcome::Written),
            Err(err) if stale_read(&err) => match backoff.next() {
                Some(delay) => {
                    tracing::debug!(node = name, retry_in = ?delay, "node changed under the taint write; re-reading");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(err),
            },
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some("x".into()),
            effect: effect.into(),
            time_added: None,
        }
    }

    fn node(taints: Option<Vec<Taint>>, annotation: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("a-1".into()),
                resource_version: Some("42".into()),
                annotations: annotation
                    .map(|b| [(FENCED_BOOT_ANNOTATION.to_string(), b.to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints,
                ..NodeSpec::default()
            }),
            status: None,
        }
    }

    fn apply(boot: &str) -> TaintChange {
        TaintChange::Apply {
            fenced_boot_id: Some(boot.into()),
        }
    }

    #[test]
    fn apply_keeps_other_taints_and_records_the_boot_id() {
        let other = taint("dedicated", "NoSchedule");
        let n = node(Some(vec![other.clone()]), None);
        let patch = taint_patch(&n, &apply("boot-1")).expect("a patch");
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
                {"op": "add", "path": "/spec/taints", "value": [
                    {"key": "dedicated", "value": "x", "effect": "NoSchedule"},
                    {"key": OUT_OF_SERVICE_TAINT_KEY, "value": "nodeshutdown", "effect": "NoExecute"},
                ]},
                {"op": "add", "path": "/metadata/annotations", "value": {FENCED_BOOT_ANNOTATION: "boot-1"}},
            ])
        );
        // The patch is a valid JSON Patch and does what it says.
        let mut doc = serde_json::to_value(&n).expect("json");
        let p: json_patch::Patch = serde_json::from_value(patch).expect("json patch");
        json_patch::patch(&mut doc, &p).expect("applies");
        let patched: Node = serde_json::from_value(doc).expect("node");
        let taints = patched.spec.and_then(|s| s.taints).expect("taints");
        assert_eq!(taints[0], other);
        assert!(is_out_of_service(&taints[1]));
    }

    #[test]
    fn apply_is_idempotent_and_fills_a_missing_annotation() {
        let n = node(Some(vec![out_of_service_taint()]), Some("boot-1"));
        assert_eq!(taint_patch(&n, &apply("boot-1")), None);
        let n = node(Some(vec![out_of_service_taint()]), Some("boot-0"));
        assert_eq!(
            taint_patch(&n, &apply("boot-1")),
            Some(json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
                {"op": "add", "path": "/metadata/annotations/twosite.dev~1fenced-boot-id", "value": "boot-1"},
            ]))
        );
        // No taints and no spec at all.
        let mut bare = node(None, None);
        bare.spec = None;
        let patch = taint_patch(&bare, &apply("b")).expect("a patch");
        assert_eq!(patch[1]["path"], "/spec");
        assert_eq!(
            patch[1]["value"]["taints"][0]["key"],
            OUT_OF_SERVICE_TAINT_KEY
        );
    }

    #[test]
    fn the_unresponsive_taint_comes_and_goes_alone() {
        let other = taint("dedicated", "NoSchedule");
        let n = node(Some(vec![other.clone(), out_of_service_taint()]), Some("b"));
        let patch = taint_patch(&n, &TaintChange::MarkUnschedulable).expect("a patch");
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
                {"op": "add", "path": "/spec/taints", "value": [
                    {"key": "dedicated", "value": "x", "effect": "NoSchedule"},
                    {"key": OUT_OF_SERVICE_TAINT_KEY, "value": "nodeshutdown", "effect": "NoExecute"},
                    {"key": "twosite.dev/unresponsive", "effect": "NoSchedule"},
                ]},
            ])
        );
        let marked = node(
            Some(vec![
                other.clone(),
                unresponsive_taint(),
                out_of_service_taint(),
            ]),
            Some("b"),
        );
        assert_eq!(taint_patch(&marked, &TaintChange::MarkUnschedulable), None);
        // Cleared: the out-of-service taint and its annotation stay.
        let patch = taint_patch(&marked, &TaintChange::ClearUnschedulable).expect("a patch");
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
                {"op": "add", "path": "/spec/taints", "value": [
                    {"key": "dedicated", "value": "x", "effect": "NoSchedule"},
                    {"key": OUT_OF_SERVICE_TAINT_KEY, "value": "nodeshutdown", "effect": "NoExecute"},
                ]},
            ])
        );
        // Our key with another effect is not ours.
        let foreign = node(Some(vec![taint(UNRESPONSIVE_TAINT_KEY, "NoExecute")]), None);
        assert_eq!(
            taint_patch(&foreign, &TaintChange::ClearUnschedulable),
            None
        );
    }

    #[test]
    fn remove_takes_only_ours() {
        let other = taint("dedicated", "NoSchedule");
        // An out-of-service taint with another effect is not ours.
        let foreign = taint(OUT_OF_SERVICE_TAINT_KEY, "NoSchedule");
        let n = node(
            Some(vec![other.clone(), out_of_service_taint(), foreign.clone()]),
            Some("boot-1"),
        );
        let patch = taint_patch(&n, &TaintChange::Remove).expect("a patch");
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
                {"op": "add", "path": "/spec/taints", "value": [
                    {"key": "dedicated", "value": "x", "effect": "NoSchedule"},
                    {"key": OUT_OF_SERVICE_TAINT_KEY, "value": "x", "effect": "NoSchedule"},
                ]},
                {"op": "remove", "path": "/metadata/annotations/twosite.dev~1fenced-boot-id"},
            ])
        );
        assert_eq!(
            taint_patch(&node(Some(vec![other]), None), &TaintChange::Remove),
            None
        );
    }
}
