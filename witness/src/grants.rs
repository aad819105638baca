//! Every served cluster's [`Arbiter`], and the rule that a new grant is persisted before it is
//! answered.

use crate::error::{Error, Result};
use crate::state::{Records, StateFile};
use node_health::MonoTime;
use node_health::witness::{Arbiter, Claim, ClaimOutcome, ClaimRequest, WitnessConfig};
use serde::Serialize;
use std::collections::BTreeMap;

/// The arbitration of every cluster this witness serves, and the state file behind it.
#[derive(Debug)]
pub struct RoomGrants {
    store: StateFile,
    arbiters: BTreeMap<String, Arbiter>,
    /// Records of clusters in the state file that are no longer in the tokens file: not served,
    /// but written back unchanged so their epochs are never issued again if they return.
    carried: Records,
}

/// One cluster as `GET /v1/state` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    /// The highest epoch ever issued.
    pub epoch: u64,
    /// The room of the current or last grant.
    pub holder: Option<HolderView>,
    /// How long ago each room last claimed, in milliseconds (since this witness started).
    pub presence_ms: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HolderView {
    pub room: String,
    pub epoch: u64,
    /// Whether the grant (plus the hand-over margin) still runs: no other room may be granted.
    pub live: bool,
}

impl RoomGrants {
    /// Loads the state file and starts one arbiter per served cluster; a grant found in the file
    /// is assumed to run for a full duration from `now`.
    pub fn load<'a>(
        store: StateFile,
        cfg: &WitnessConfig,
        clusters: impl IntoIterator<Item = &'a str>,
        now: MonoTime,
    ) -> Result<Self> {
        let mut carried = store.load()?;
        let mut arbiters = BTreeMap::new();
        for cluster in clusters {
            let record = carried.remove(cluster).unwrap_or_default();
            if let Some((room, epoch)) = &record.holder {
                tracing::info!(
                    cluster,
                    room,
                    epoch,
                    "restored grant, assumed live for a full grant duration"
                );
            }
            arbiters.insert(cluster.to_string(), Arbiter::new(cfg.clone(), record, now));
        }
        for cluster in carried.keys() {
            tracing::warn!(
                cluster,
                "the state file has a cluster the tokens file does not: kept, not served"
            );
        }
        Ok(RoomGrants {
            store,
            arbiters,
            carried,
        })
    }

    pub fn serves(&self, cluster: &str) -> bool {
        self.arbiters.contains_key(cluster)
    }

    /// Handles one claim. A new grant is written to the state file (and synced) before this
    /// returns; if that fails, the arbiter is put back as it was before the claim, which matches
    /// the last persisted record, and the claim fails: nothing was granted.
    pub fn claim(&mut self, cluster: &str, claim: &Claim, now: MonoTime) -> Result<ClaimOutcome> {
        self.request(cluster, &ClaimRequest::from(claim.clone()), now)
    }

    /// Handles one claim or join as [`Self::claim`] does; the core decides (a join never has a
    /// record to persist).
    pub fn request(
        &mut self,
        cluster: &str,
        request: &ClaimRequest,
        now: MonoTime,
    ) -> Result<ClaimOutcome> {
        let claim = &request.claim;
        let arbiter = self.arbiters.get_mut(cluster).ok_or(Error::BadToken)?;
        let before = arbiter.clone();
        let (outcome, record) = arbiter.request(request, now)?;
        if record.is_none() {
            return Ok(outcome);
        }
        if let Err(err) = self.store.save(&self.records()) {
            if let Some(a) = self.arbiters.get_mut(cluster) {
                *a = before;
            }
            return Err(err);
        }
        if let ClaimOutcome::Granted { epoch, .. } = &outcome {
            tracing::info!(cluster, room = %claim.room, epoch, "granted the right to run");
        }
        Ok(outcome)
    }

    /// Every cluster's record, as the state file holds it.
    pub fn records(&self) -> Records {
        let mut all = self.carried.clone();
        for (cluster, arbiter) in &self.arbiters {
            all.insert(cluster.clone(), arbiter.record().clone());
        }
        all
    }

    /// What operators see: every served cluster, without tokens.
    pub fn view(&self, now: MonoTime) -> BTreeMap<String, ClusterView> {
        self.arbiters
            .iter()
            .map(|(cluster, a)| {
                let live = a.holder(now).map(|(room, epoch)| (room.to_string(), epoch));
                let holder = a.record().holder.as_ref().map(|(room, epoch)| HolderView {
                    room: room.clone(),
                    epoch: *epoch,
                    live: live.as_ref() == Some(&(room.clone(), *epoch)),
                });
                let presence_ms = a
                    .presence(now)
                    .into_iter()
                    .map(|(room, age)| (room, u64::try_from(age.as_millis()).unwrap_or(u64::MAX)))
                    .collect();
                (
                    cluster.clone(),
                    ClusterView {
                        epoch: a.record().epoch,
                        holder,
                        presence_ms,
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use node_health::witness::WitnessRecord;

    fn claim(room: &str) -> Claim {
        Claim {
            room: room.into(),
            epoch: None,
            api_reachable: true,
        }
    }

    fn granted(o: &ClaimOutcome) -> Option<u64> {
        match o {
            ClaimOutcome::Granted { epoch, .. } => Some(*epoch),
            ClaimOutcome::Held { .. } => None,
        }
    }

    #[test]
    fn a_grant_is_on_disk_before_it_is_answered_and_carried_clusters_survive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let mut old = Records::new();
        old.insert(
            "retired".into(),
            WitnessRecord {
                epoch: 7,
                holder: None,
                ..WitnessRecord::default()
            },
        );
        StateFile::open(&path)
            .expect("open")
            .save(&old)
            .expect("seed");
        let store = StateFile::open(&path).expect("open");
        let mut g = RoomGrants::load(store, &WitnessConfig::default(), ["factory"], MonoTime(0))
            .expect("load");
        let out = g
            .claim("factory", &claim("east"), MonoTime(10))
            .expect("ok");
        assert_eq!(granted(&out), Some(1));
        let on_disk = crate::state::decode(&std::fs::read(&path).expect("read")).expect("decode");
        assert_eq!(on_disk["factory"].epoch, 1);
        assert_eq!(on_disk["factory"].holder, Some(("east".into(), 1)));
        assert_eq!(on_disk["retired"].epoch, 7);
        assert!(!g.serves("retired"));
        assert!(matches!(
            g.claim("retired", &claim("east"), MonoTime(10)),
            Err(Error::BadToken)
        ));
    }

    #[test]
    fn a_join_shares_a_live_grant_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let store = StateFile::open(&path).expect("open");
        let mut g = RoomGrants::load(store, &WitnessConfig::default(), ["factory"], MonoTime(0))
            .expect("load");
        let join = ClaimRequest {
            claim: claim("east"),
            join: true,
        };
        let out = g.request("factory", &join, MonoTime(10)).expect("ok");
        assert_eq!(granted(&out), None, "no grant to join");
        assert!(!path.exists(), "nothing persisted");
        assert_eq!(g.records()["factory"].epoch, 0);
        g.claim("factory", &claim("east"), MonoTime(20))
            .expect("ok");
        let out = g.request("factory", &join, MonoTime(1_020)).expect("ok");
        assert_eq!(
            out,
            ClaimOutcome::Granted {
                epoch: 1,
                valid_for_ms: 9_000
            }
        );
    }

    #[test]
    fn a_grant_that_cannot_be_persisted_is_not_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let store = StateFile::open(&path).expect("open");
        let mut g = RoomGrants::load(store, &WitnessConfig::default(), ["factory"], MonoTime(0))
            .expect("load");
        // A directory where the temporary file goes: creating it fails, even for root.
        let tmp = dir.path().join(".state.json.tmp");
        std::fs::create_dir(&tmp).expect("mkdir");
        let err = g
            .claim("factory", &claim("east"), MonoTime(10))
            .expect_err("cannot persist");
        assert_eq!(err.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(g.records()["factory"].epoch, 0, "restored");
        assert!(!path.exists());
        // West may have it at once: east was never granted anything.
        std::fs::remove_dir(&tmp).expect("rmdir");
        let out = g
            .claim("factory", &claim("west"), MonoTime(20))
            .expect("ok");
        assert_eq!(granted(&out), Some(1));
        assert_eq!(
            g.view(MonoTime(20))["factory"].holder,
            Some(HolderView {
                room: "west".into(),
                epoch: 1,
                live: true
            })
        );
    }
}
