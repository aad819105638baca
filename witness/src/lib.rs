//! twosite's witness: a small HTTP(S) server at a third site that, for each cluster it serves,
//! grants one room at a time the right to run when the rooms lose each other.
//!
//! The decisions are the pure core's ([`node_health::witness::Arbiter`]); this crate adds
//! the shell around it: per-cluster bearer tokens ([`tokens`]), the state file written and
//! fsynced before any answer that depends on it ([`state`], [`grants`]), the HTTP API ([`http`])
//! and the listener with optional TLS ([`serve`]). The `twosite witness` subcommand and the
//! `twosite-witness` binary both call [`main`].

pub mod cli;
pub mod error;
pub mod grants;
pub mod http;
pub mod serve;
pub mod state;
pub mod tokens;

pub use cli::{WitnessArgs, main};
pub use error::{Error, Result};
