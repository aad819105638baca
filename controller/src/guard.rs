//! `twosite guard`: the consumer side of a protected RWX block volume, run in each consumer
//! pod around the app (the decisions are `node_health::volume`'s).
//!
//! - [`device`]: the shared block device: checks, probe, format-once, mount, unmount.
//! - [`lease_io`]: the volume Lease as the API server keeps it and as the core reads it.
//! - [`app`]: the wrapped app's process group.
//! - [`run`]: flags and the loop that carries out the core's actions.

pub mod app;
pub mod device;
pub mod lease_io;
pub mod run;
