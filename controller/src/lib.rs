//! The twosite controller: the kube-rs shell around the pure core in `node_health`.

pub mod run;
pub mod simulate;
