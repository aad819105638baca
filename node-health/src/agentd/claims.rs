//! Claiming this room's right to run at the witness while the rooms are out of contact.
//!
//! Every [`CLAIM_EVERY`], while [`AgentCore::needs_witness`] says so, the agent sends what
//! [`AgentCore::witness_claim`] makes: a fresh claim for its room (`epoch: None`,
//! `api_reachable` as its last renewal says), or, before it has heard from the other room since
//! boot, a join of its room's live grant. A grant counts from when the claim was *sent*
//! ([`AgentCore::witness_granted`]); `held` and errors change nothing: the core stops the node
//! once the rooms have been out of contact for its timeout without a valid grant.
//!
//! [`AgentCore::needs_witness`]: crate::AgentCore::needs_witness
//! [`AgentCore::witness_claim`]: crate::AgentCore::witness_claim
//! [`AgentCore::witness_granted`]: crate::AgentCore::witness_granted

use super::SharedCore;
use super::error::report;
use super::witness_client::{WitnessClient, WitnessError};
use crate::time::Clock;
use crate::witness::{ClaimOutcome, ClaimRequest};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use crate::agent::CLAIM_EVERY;
/// At most one warning per this long about failing claims (the rest are debug).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Where claims go: the witness over HTTP, or a stand-in.
pub trait WitnessPort: Send + Sync {
    fn claim(
        &self,
        claim: &ClaimRequest,
    ) -> impl Future<Output = Result<ClaimOutcome, WitnessError>> + Send;
}

impl WitnessPort for WitnessClient {
    async fn claim(&self, claim: &ClaimRequest) -> Result<ClaimOutcome, WitnessError> {
        WitnessClient::request(self, claim).await
    }
}

/// Claims once if the core needs the witness now, and reports a grant to the core. `None`: no
/// claim was needed.
pub async fn claim_if_needed<W: WitnessPort>(
    witness: &W,
    core: &SharedCore,
    clock: &(dyn Clock + Send + Sync),
) -> Option<Result<ClaimOutcome, WitnessError>> {
    let claim = core.lock().witness_claim(clock.now())?;
    // The grant counts from here: the witness cannot have granted it earlier.
    let sent_at = clock.now();
    let answer = witness.claim(&claim).await;
    if let Ok(ClaimOutcome::Granted {
        epoch,
        valid_for_ms,
    }) = &answer
    {
        core.lock()
            .witness_granted(sent_at, *epoch, Duration::from_millis(*valid_for_ms));
    }
    Some(answer)
}

/// Claims every `every` while needed, until the process ends.
pub async fn run_claims<W: WitnessPort>(
    witness: W,
    core: SharedCore,
    clock: Arc<dyn Clock + Send + Sync>,
    every: Duration,
) -> super::error::Result<()> {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_warn: Option<tokio::time::Instant> = None;
    let mut granted: Option<u64> = None;
    loop {
        ticks.tick().await;
        match claim_if_needed(&witness, &core, clock.as_ref()).await {
            None => {
                if granted.take().is_some() {
                    tracing::info!("the rooms are in contact again: no longer claiming");
                }
            }
            Some(Ok(ClaimOutcome::Granted {
                epoch,
                valid_for_ms,
            })) => {
                if granted != Some(epoch) {
                    tracing::warn!(
                        epoch,
                        valid_for_ms,
                        "out of contact with the other room: the witness granted this room the \
                         right to run"
                    );
                }
                granted = Some(epoch);
                last_warn = None;
            }
            Some(Ok(ClaimOutcome::Held {
                holder,
                epoch,
                retry_after_ms,
            })) => {
                granted = None;
                tracing::debug!(
                    ?holder,
                    epoch,
                    retry_after_ms,
                    "the witness holds the claim"
                );
            }
            Some(Err(err)) => {
                granted = None;
                let now = tokio::time::Instant::now();
                if last_warn.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
                    last_warn = Some(now);
                    tracing::warn!(
                        error = %report(&err),
                        refused = err.is_refusal(),
                        "claim at the witness failed; this room stops if it stays out of \
                         contact with the other room"
                    );
                } else {
                    tracing::debug!(error = %report(&err), "claim at the witness failed");
                }
            }
        }
    }
}
