//! The twosite controller: the kube-rs shell around the pure core in `node_health`.
//!
//! - [`crd`]: the `TwoSite` custom resource.
//! - [`status`]: the desired status, its conditions and events (pure).
//! - [`nodes`]: the in-memory index of what the controller reads of each Node.
//! - [`heartbeats`]: the Node and heartbeat Lease watches, judged on this process's clock.
//! - [`remediation`]: the leader's loop that fences dead nodes, deletes their pods and applies
//!   the out-of-service taint ([`taint`]), after committing the fence ([`fence_marker`]).
//! - [`pairing`]: the pairing reconciler, which writes the status.
//! - [`leader_lease`]: who leads, over a `coordination.k8s.io` Lease.
//! - [`admin`], [`metrics`]: `/livez`, `/readyz`, `/metrics`.
//! - [`witness_link`], [`witness_port`]: the witness's grants and reachability, for the
//!   remediation loop and the status.
//! - [`run`]: `twosite controller` and `twosite crd`.
//! - [`cli`]: `twosite switchover` and `twosite status`, the operator's commands.

pub mod admin;
pub mod cli;
pub mod crd;
pub mod error;
pub mod events;
pub mod fence_marker;
pub mod guard;
pub mod heartbeats;
pub mod leader_lease;
pub mod metrics;
pub mod nodes;
pub mod pairing;
pub mod pod_index;
pub mod remediation;
pub mod run;
pub mod simulate;
pub mod status;
pub mod taint;
pub mod vm;
pub mod volumes;
pub mod witness_link;
pub mod witness_port;

pub use error::{Error, Result};
