//! twosite-agent: the node agent's IO shell around [`crate::AgentCore`].
//!
//! Four tasks share one core: the heartbeat Lease renewal ([`heartbeat`]), the partner lookup
//! ([`partner`]), the peer probes and the peer port ([`peer`]), and the decision loop
//! ([`node_agent`]) that stops workloads and feeds the watchdog ([`watchdog`], [`stopper`]).
//! With a witness configured two more run: the other room's heartbeats read through the API
//! server ([`contact`]) and the claims at the witness ([`claims`], [`witness_client`], set up
//! from [`witness_flags`]).
//! The tasks only report what they saw to the core; what the node may do is the core's call.
//! The decision loop also keeps the [`state`] file, from which the next agent process of this
//! boot resumes: an agent restart hands the right to run over instead of rebooting the node.

pub mod claims;
pub mod cli;
pub mod contact;
pub mod error;
pub mod fake;
pub mod guard_socket;
pub mod heartbeat;
pub mod node_agent;
pub mod partner;
pub mod peer;
pub mod peer_keys;
pub mod state;
pub mod stopper;
pub mod watchdog;
pub mod witness_client;
pub mod witness_flags;

pub use error::{Error, Result};

use crate::agent::AgentCore;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The agent's core, shared by its tasks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SharedCore(Arc<Mutex<AgentCore>>);

impl SharedCore {
    pub fn new(core: AgentCore) -> Self {
        SharedCore(Arc::new(Mutex::new(core)))
    }

    /// The core; a panic elsewhere while it was held does not make it unusable.
    pub fn lock(&self) -> MutexGuard<'_, AgentCore> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
