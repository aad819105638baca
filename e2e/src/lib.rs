//! Whole-system tests of twosite.
//!
//! [`sim`] is a deterministic, seeded, virtual-time model of a two-room cluster that drives the
//! same core functions (`node_health`) the controller calls, checks the safety invariants after
//! every step and records a timeline. `twosite simulate` is its command-line face.

pub mod apiserver;
pub mod sim;
