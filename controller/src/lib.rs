//! The twosite controller: the kube-rs shell around the pure core in `node_health`.
//!
//! - [`crd`]: the `TwoSite` custom resource.
//! - [`status`]: the desired status, its conditions and events (pure).
//! - [`nodes`]: the Node watch and its in-memory index of node facts.
//! - [`pairing`]: the pairing reconciler, which writes the status.
//! - [`leader_lease`]: who leads, over a `coordination.k8s.io` Lease.
//! - [`admin`], [`metrics`]: `/livez`, `/readyz`, `/metrics`.
//! - [`run`]: `twosite controller` and `twosite crd`.

pub mod admin;
pub mod crd;
pub mod error;
pub mod leader_lease;
pub mod metrics;
pub mod nodes;
pub mod pairing;
pub mod run;
pub mod simulate;
pub mod status;

pub use error::{Error, Result};
