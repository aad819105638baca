//! The witness in the third site: its arbiter, the record it persists, the claims agents and
//! replicas make at it, and the check that no two rooms hold its grant at once.

use super::cluster::{Cluster, SimClock, zone};
use node_health::witness::ClaimRequest;
use node_health::{Arbiter, Claim, ClaimOutcome, RunBasis, WitnessRecord};
use std::collections::BTreeSet;

/// The witness in the third site.
#[derive(Debug)]
pub(super) struct SimWitness {
    pub(super) arbiter: Arbiter,
    pub(super) clock: SimClock,
    pub(super) up: bool,
    /// The highest epoch it ever granted (for S4).
    pub(super) max_epoch: u64,
    /// The persisted record, which survives a restart.
    pub(super) record: WitnessRecord,
}

impl Cluster {
    /// One claim at the witness, if the claimant `reaches` it and the witness is up. Checks S4
    /// on every new grant and logs it.
    pub(super) fn claim_at_witness(
        &mut self,
        reaches: bool,
        claim: &Claim,
        actor: &str,
    ) -> Option<ClaimOutcome> {
        self.request_at_witness(reaches, &ClaimRequest::from(claim.clone()), actor)
    }

    /// One claim or join ([`ClaimRequest`]) at the witness, as [`Self::claim_at_witness`].
    pub(super) fn request_at_witness(
        &mut self,
        reaches: bool,
        request: &ClaimRequest,
        actor: &str,
    ) -> Option<ClaimOutcome> {
        if !reaches {
            return None;
        }
        let claim = &request.claim;
        let now = self.now;
        let w = self.witness.as_mut().filter(|w| w.up)?;
        let local = w.clock.read(now);
        let (outcome, record) = w.arbiter.request(request, local).ok()?;
        let mut new_grant = None;
        if let Some(rec) = record {
            // Persisted before the answer.
            w.record = rec;
            if let ClaimOutcome::Granted { epoch, .. } = &outcome {
                let stale = *epoch <= w.max_epoch;
                w.max_epoch = w.max_epoch.max(*epoch);
                new_grant = Some((*epoch, stale));
            }
        }
        if let Some((epoch, stale)) = new_grant {
            self.record
                .witness_grants
                .push((self.now, claim.room.clone(), epoch));
            if stale {
                self.violate(
                    "S4-monotonic-epochs",
                    format!("witness granted epoch {epoch} again"),
                );
            }
            self.log(
                "witness",
                format!(
                    "granted {} the right to run (epoch {epoch}, asked by {actor})",
                    claim.room
                ),
            );
        }
        Some(outcome)
    }

    /// At no instant do two rooms both believe the witness granted them the right to run.
    pub(super) fn check_single_grant(&mut self) {
        let mut rooms: BTreeSet<String> = BTreeSet::new();
        for n in &self.nodes {
            if n.powered
                && let Some(a) = &n.agent
                && let Some(RunBasis::Witness { .. }) = a.right_to_run(n.clock.read(self.now))
            {
                rooms.insert(zone(n.room));
            }
        }
        for r in &self.replicas {
            if r.up {
                let local = r.clock.read(self.now);
                for (room, until) in &r.grants {
                    if local < *until {
                        rooms.insert(room.clone());
                    }
                }
            }
        }
        if rooms.len() > 1 {
            let list: Vec<String> = rooms.into_iter().collect();
            self.violate(
                "single-witness-grant",
                format!("{} hold the witness's grant at once", list.join(" and ")),
            );
        }
    }
}
