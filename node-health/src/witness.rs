//! The witness's arbitration: which room may keep running when the rooms lose each other.
//!
//! A witness in a third place grants the right to run to one room at a time, for a bounded time,
//! with an epoch strictly greater than every earlier one. It never starts a new grant before the
//! previous one has expired plus a margin (which covers the watchdog and clock drift), so the
//! losing room has stopped before the winner may take over. Its state is persisted before any
//! answer that depends on it; after a restart, an unexpired grant is assumed to run for its full
//! duration from the restart, since the witness cannot know how long it was down.
//!
//! Pure: the `twosite witness` server feeds it requests and its clock, and the simulation does
//! the same.

use crate::time::{MonoTime, stretch};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessConfig {
    /// How long one grant lasts (renewed by the holder's claims).
    pub grant_duration: Duration,
    /// How long after a grant expired the other room may be granted: the holder's watchdog plus
    /// a safety margin.
    pub handover_margin: Duration,
    /// The room that wins a tie.
    pub preferred_room: Option<String>,
    /// Claims of both rooms within this window are a tie: a room that does not reach the API
    /// server (or is not the preferred room) must have been claiming for this long before it is
    /// granted, so the better-ranked room, which may notice the partition later, gets in first.
    pub tie_window: Duration,
    pub drift_ppm: u64,
}

impl Default for WitnessConfig {
    fn default() -> Self {
        WitnessConfig {
            grant_duration: Duration::from_secs(10),
            handover_margin: Duration::from_secs(7),
            preferred_room: None,
            tie_window: Duration::from_secs(3),
            drift_ppm: crate::time::DEFAULT_DRIFT_PPM,
        }
    }
}

/// What the witness persists (per cluster), fsynced before an answer that depends on it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WitnessRecord {
    /// The highest epoch ever issued.
    pub epoch: u64,
    /// The room holding the current (or last) grant, and its epoch.
    pub holder: Option<(String, u64)>,
    /// How long that grant was issued for: a witness restarted with a shorter duration must
    /// still wait out the longer one it promised.
    #[serde(default)]
    pub grant_duration_ms: u64,
}

/// A room's request for the right to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub room: String,
    /// The epoch the claimant holds (a renewal), or `None` for a fresh claim.
    #[serde(default)]
    pub epoch: Option<u64>,
    /// The claimant reaches the Kubernetes API server: on a tie it wins over a room that does
    /// not, since only a room with the API server can restart the other's workloads.
    #[serde(default)]
    pub api_reachable: bool,
}

/// What a node agent sends the witness: a [`Claim`], or, with `join`, a request to share the
/// grant its room already holds. A join never creates a grant, never extends one and never
/// counts in a tie: a node that has not heard from the other room since boot cannot tell a
/// partition from the other room still booting, so it may only run on what its room already
/// won (the room's controller claims for it).
///
/// On the wire it is the claim's JSON plus `"join": true`; `join` is left out when false, so an
/// ordinary claim reads exactly as before (a witness that predates joins refuses a join as an
/// unknown field: the agent then stops at its contact timeout, as it did before).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRequest {
    #[serde(flatten)]
    pub claim: Claim,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
}

impl From<Claim> for ClaimRequest {
    fn from(claim: Claim) -> Self {
        ClaimRequest { claim, join: false }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ClaimOutcome {
    /// The room may run for `valid_for_ms`, counted by the claimant from when it sent the claim
    /// (shrunk by its drift bound).
    Granted { epoch: u64, valid_for_ms: u64 },
    /// Another room holds the right (or a tie is being settled); ask again later.
    Held {
        holder: Option<String>,
        epoch: u64,
        retry_after_ms: u64,
    },
}

/// A claim the witness refuses.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum ClaimError {
    #[error("epoch {claimed} is stale: the current epoch is {current}")]
    StaleEpoch { claimed: u64, current: u64 },
    #[error("epoch {claimed} was never issued (the current epoch is {current})")]
    UnknownEpoch { claimed: u64, current: u64 },
    #[error("room name must be 1 to 63 characters of [a-z0-9.-]")]
    BadRoom,
    #[error("this cluster already has two rooms ({0}, {1}); {2:?} is neither")]
    ThirdRoom(String, String, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Live {
    room: String,
    epoch: u64,
    expires_at: MonoTime,
}

/// One cluster's arbitration at the witness.
#[derive(Debug, Clone)]
pub struct Arbiter {
    cfg: WitnessConfig,
    record: WitnessRecord,
    live: Option<Live>,
    /// The last claim of each room (witness clock), its rank, and when its current streak of
    /// claims began, for ties and presence.
    last_claim: BTreeMap<String, (MonoTime, u8, MonoTime)>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A cluster's name at the witness, as it appears in the claim URL's path: 1 to 128 characters
/// of `[A-Za-z0-9._-]`, not `.` or `..` (a path segment those would rewrite). The witness's
/// tokens file, the agent and the controller all hold names to this one rule.
pub fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Validates a room name the way Kubernetes label values are (a zone label value).
pub fn valid_room(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= 63
        && room
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'))
}

impl Arbiter {
    /// Starts (or restarts) from the persisted record. A grant that may still be running is
    /// assumed to last a full duration from `now`.
    pub fn new(cfg: WitnessConfig, record: WitnessRecord, now: MonoTime) -> Self {
        let promised = cfg
            .grant_duration
            .max(Duration::from_millis(record.grant_duration_ms));
        let live = record.holder.as_ref().map(|(room, epoch)| Live {
            room: room.clone(),
            epoch: *epoch,
            expires_at: now + promised,
        });
        Arbiter {
            cfg,
            record,
            live,
            last_claim: BTreeMap::new(),
        }
    }

    pub fn record(&self) -> &WitnessRecord {
        &self.record
    }

    /// The current holder and epoch while its grant (plus the hand-over margin) lasts.
    pub fn holder(&self, now: MonoTime) -> Option<(&str, u64)> {
        self.live
            .as_ref()
            .filter(|l| now < l.expires_at + self.handover())
            .map(|l| (l.room.as_str(), l.epoch))
    }

    fn handover(&self) -> Duration {
        // The witness's own clock may run fast: stretch what it waits.
        stretch(self.cfg.handover_margin, self.cfg.drift_ppm)
    }

    /// Rooms that claimed recently (presence), with how long ago.
    pub fn presence(&self, now: MonoTime) -> BTreeMap<String, Duration> {
        self.last_claim
            .iter()
            .map(|(r, (t, _, _))| (r.clone(), now.since(*t)))
            .collect()
    }

    /// Handles one request: a claim ([`Self::claim`]) or a join ([`Self::join`]). When the
    /// returned record is `Some`, the caller must persist it (and fsync) *before* sending the
    /// answer.
    pub fn request(
        &mut self,
        r: &ClaimRequest,
        now: MonoTime,
    ) -> Result<(ClaimOutcome, Option<WitnessRecord>), ClaimError> {
        if r.join {
            // A join changes nothing the witness persists.
            self.join(&r.claim, now).map(|outcome| (outcome, None))
        } else {
            self.claim(&r.claim, now)
        }
    }

    /// Checks what every claim and join must satisfy: a valid room, one of at most two, and an
    /// epoch that is the current one (when it names one).
    fn check(&self, c: &Claim) -> Result<(), ClaimError> {
        if !valid_room(&c.room) {
            return Err(ClaimError::BadRoom);
        }
        let known: Vec<&String> = self.last_claim.keys().collect();
        if known.len() >= 2 && !self.last_claim.contains_key(&c.room) {
            return Err(ClaimError::ThirdRoom(
                known[0].clone(),
                known[1].clone(),
                c.room.clone(),
            ));
        }
        if let Some(e) = c.epoch {
            if e > self.record.epoch {
                return Err(ClaimError::UnknownEpoch {
                    claimed: e,
                    current: self.record.epoch,
                });
            }
            if e < self.record.epoch {
                return Err(ClaimError::StaleEpoch {
                    claimed: e,
                    current: self.record.epoch,
                });
            }
        }
        Ok(())
    }

    /// Handles a join: `c.room` asks to share the grant it already holds. Granted, with the
    /// holder's epoch, only while that grant is live; the answer is the time it has left, not a
    /// renewal. Not extending it keeps a room's grant in the hands of the claims that won it
    /// (its controller's and its agents' own claims): a room whose claimants are gone loses it
    /// on schedule, and the other room may take over after the margin, even while a booting node
    /// keeps joining. Otherwise `Held`, and nothing changes: no grant, no new epoch, and the
    /// join is not recorded as a claim, so it neither starts a streak nor outranks the other
    /// room in a tie (nor shows as presence).
    pub fn join(&self, c: &Claim, now: MonoTime) -> Result<ClaimOutcome, ClaimError> {
        self.check(c)?;
        let handover = self.handover();
        match &self.live {
            Some(l) if l.room == c.room && now < l.expires_at => Ok(ClaimOutcome::Granted {
                epoch: l.epoch,
                valid_for_ms: ms(l.expires_at.since(now)),
            }),
            Some(l) if l.room != c.room && now < l.expires_at + handover => {
                Ok(ClaimOutcome::Held {
                    holder: Some(l.room.clone()),
                    epoch: l.epoch,
                    retry_after_ms: ms((l.expires_at + handover).since(now)).max(1),
                })
            }
            _ => Ok(ClaimOutcome::Held {
                holder: None,
                epoch: self.record.epoch,
                retry_after_ms: ms(self.cfg.tie_window).max(1),
            }),
        }
    }

    /// Handles one claim. When the returned record is `Some`, the caller must persist it (and
    /// fsync) *before* sending the answer.
    pub fn claim(
        &mut self,
        c: &Claim,
        now: MonoTime,
    ) -> Result<(ClaimOutcome, Option<WitnessRecord>), ClaimError> {
        self.check(c)?;
        // Rank on a tie: reaching the API server first, then being the preferred room.
        let preferred = self.cfg.preferred_room.as_deref();
        let rank = u8::from(c.api_reachable) * 2 + u8::from(preferred.is_none_or(|p| p == c.room));
        let best = 2 + 1;
        // A claim more than two tie windows after the room's previous one starts a new streak.
        let streak = match self.last_claim.get(&c.room) {
            Some((t, _, start)) if now.since(*t) <= self.cfg.tie_window * 2 => *start,
            _ => now,
        };
        self.last_claim.insert(c.room.clone(), (now, rank, streak));
        let duration = self.cfg.grant_duration;
        let handover = self.handover();

        if let Some(l) = &mut self.live {
            if l.room == c.room && now < l.expires_at {
                // The holder renews its grant: same epoch, a new expiry.
                l.expires_at = now + duration;
                return Ok((
                    ClaimOutcome::Granted {
                        epoch: l.epoch,
                        valid_for_ms: ms(duration),
                    },
                    None,
                ));
            }
            if l.room != c.room && now < l.expires_at + handover {
                let retry = (l.expires_at + handover).since(now);
                return Ok((
                    ClaimOutcome::Held {
                        holder: Some(l.room.clone()),
                        epoch: l.epoch,
                        retry_after_ms: ms(retry).max(1),
                    },
                    None,
                ));
            }
        }

        // The right is free. On a tie the better-ranked room wins: a lower-ranked room's first
        // claim after a quiet spell waits one tie window, and it yields to a better-ranked claim
        // of the other room made within that window.
        let waited = now.since(streak) >= self.cfg.tie_window;
        let outranked = self.last_claim.iter().any(|(room, (t, r, _))| {
            *room != c.room && *r > rank && now.since(*t) <= self.cfg.tie_window
        });
        if (rank < best && !waited) || outranked {
            return Ok((
                ClaimOutcome::Held {
                    holder: None,
                    epoch: self.record.epoch,
                    retry_after_ms: ms(self.cfg.tie_window).max(1),
                },
                None,
            ));
        }
        let epoch = self.record.epoch.saturating_add(1);
        self.record = WitnessRecord {
            epoch,
            holder: Some((c.room.clone(), epoch)),
            grant_duration_ms: ms(duration),
        };
        self.live = Some(Live {
            room: c.room.clone(),
            epoch,
            expires_at: now + duration,
        });
        Ok((
            ClaimOutcome::Granted {
                epoch,
                valid_for_ms: ms(duration),
            },
            Some(self.record.clone()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(room: &str, epoch: Option<u64>) -> Claim {
        Claim {
            room: room.into(),
            epoch,
            api_reachable: true,
        }
    }

    fn arbiter(preferred: Option<&str>) -> Arbiter {
        let cfg = WitnessConfig {
            preferred_room: preferred.map(str::to_string),
            ..WitnessConfig::default()
        };
        Arbiter::new(cfg, WitnessRecord::default(), MonoTime(0))
    }

    fn granted(r: &Result<(ClaimOutcome, Option<WitnessRecord>), ClaimError>) -> Option<u64> {
        match r {
            Ok((ClaimOutcome::Granted { epoch, .. }, _)) => Some(*epoch),
            _ => None,
        }
    }

    #[test]
    fn one_room_at_a_time_with_rising_epochs_and_a_handover_gap() {
        let mut w = arbiter(None);
        let first = w.claim(&claim("east", None), MonoTime(1_000));
        assert_eq!(granted(&first), Some(1));
        assert!(
            first
                .as_ref()
                .map(|(_, rec)| rec.is_some())
                .unwrap_or(false),
            "persist first"
        );
        // West is refused while east holds it, and for the hand-over margin after it expires.
        assert_eq!(
            granted(&w.claim(&claim("west", None), MonoTime(2_000))),
            None
        );
        // East renews with its epoch; nothing new to persist.
        let renew = w.claim(&claim("east", Some(1)), MonoTime(5_000));
        assert_eq!(granted(&renew), Some(1));
        assert!(matches!(renew, Ok((_, None))));
        // East goes silent: its grant ends at 15 s; 7 s margin stretched by 1% is 7.07 s.
        assert_eq!(
            granted(&w.claim(&claim("west", None), MonoTime(22_069))),
            None
        );
        let west = w.claim(&claim("west", None), MonoTime(22_071));
        assert_eq!(granted(&west), Some(2));
        // East comes back with its old epoch: refused as stale.
        assert_eq!(
            w.claim(&claim("east", Some(1)), MonoTime(23_000))
                .map(|_| ()),
            Err(ClaimError::StaleEpoch {
                claimed: 1,
                current: 2
            })
        );
        assert_eq!(
            w.claim(&claim("east", Some(9)), MonoTime(23_000))
                .map(|_| ()),
            Err(ClaimError::UnknownEpoch {
                claimed: 9,
                current: 2
            })
        );
    }

    #[test]
    fn a_restarted_witness_never_reissues_an_epoch_or_forgets_a_grant() {
        let mut w = arbiter(None);
        let (_, rec) = w.claim(&claim("east", None), MonoTime(0)).expect("ok");
        let rec = rec.expect("persisted");
        // Restart at an unrelated clock reading: the grant is assumed live for a full duration.
        let mut w2 = Arbiter::new(WitnessConfig::default(), rec, MonoTime(500));
        assert_eq!(
            granted(&w2.claim(&claim("west", None), MonoTime(600))),
            None
        );
        assert_eq!(
            granted(&w2.claim(&claim("west", None), MonoTime(18_000))),
            Some(2)
        );
    }

    #[test]
    fn a_restart_with_a_shorter_duration_still_waits_out_the_promised_one() {
        let mut w = arbiter(None);
        let (_, rec) = w.claim(&claim("east", None), MonoTime(0)).expect("ok");
        let short = WitnessConfig {
            grant_duration: Duration::from_secs(2),
            ..WitnessConfig::default()
        };
        let mut w2 = Arbiter::new(short, rec.expect("persisted"), MonoTime(0));
        // Promised 10 s plus the 7.07 s margin, not 2 s.
        assert_eq!(
            granted(&w2.claim(&claim("west", None), MonoTime(16_000))),
            None
        );
        assert_eq!(
            granted(&w2.claim(&claim("west", None), MonoTime(17_100))),
            Some(2)
        );
    }

    #[test]
    fn preferred_room_wins_a_tie() {
        let mut w = arbiter(Some("east"));
        // West first: it is told to retry until it has claimed for a whole tie window.
        assert_eq!(
            granted(&w.claim(&claim("west", None), MonoTime(1_000))),
            None
        );
        assert_eq!(
            granted(&w.claim(&claim("west", None), MonoTime(3_000))),
            None
        );
        assert_eq!(
            granted(&w.claim(&claim("east", None), MonoTime(3_500))),
            Some(1)
        );
        // Without a competing preferred claim, west gets it once it has waited.
        let mut w = arbiter(Some("east"));
        for t in [1_000, 2_000, 3_000] {
            assert_eq!(granted(&w.claim(&claim("west", None), MonoTime(t))), None);
        }
        assert_eq!(
            granted(&w.claim(&claim("west", None), MonoTime(4_000))),
            Some(1)
        );
    }

    #[test]
    fn a_room_with_the_api_server_wins_a_tie() {
        let mut w = arbiter(Some("west"));
        let blind = Claim {
            api_reachable: false,
            ..claim("west", None)
        };
        assert_eq!(granted(&w.claim(&blind, MonoTime(1_000))), None);
        assert_eq!(
            granted(&w.claim(&claim("east", None), MonoTime(1_100))),
            None,
            "not preferred: waits"
        );
        assert_eq!(
            granted(&w.claim(&blind, MonoTime(4_000))),
            None,
            "waited, but outranked by east"
        );
        assert_eq!(
            granted(&w.claim(&claim("east", None), MonoTime(4_100))),
            Some(1)
        );
    }

    fn join(room: &str) -> ClaimRequest {
        ClaimRequest {
            claim: Claim {
                api_reachable: false,
                ..claim(room, None)
            },
            join: true,
        }
    }

    #[test]
    fn a_join_by_the_holder_room_shares_its_grant_without_extending_it() {
        let mut w = arbiter(None);
        assert_eq!(
            granted(&w.claim(&claim("east", None), MonoTime(1_000))),
            Some(1)
        );
        let (outcome, record) = w.request(&join("east"), MonoTime(4_000)).expect("ok");
        assert_eq!(
            outcome,
            ClaimOutcome::Granted {
                epoch: 1,
                valid_for_ms: 7_000
            },
            "the holder's epoch, for what is left of its grant"
        );
        assert_eq!(record, None, "nothing to persist");
        // Joins alone never keep the grant alive: it ends at 11 s, and west gets it after the
        // margin as if nobody had joined.
        assert_eq!(
            w.request(&join("east"), MonoTime(10_999))
                .map(|(o, _)| granted(&Ok((o, None)))),
            Ok(Some(1))
        );
        assert!(matches!(
            w.request(&join("east"), MonoTime(11_000)),
            Ok((ClaimOutcome::Held { .. }, None))
        ));
        assert_eq!(
            granted(&w.claim(&claim("west", None), MonoTime(18_071))),
            Some(2)
        );
    }

    #[test]
    fn a_join_without_a_live_grant_of_its_room_is_refused_and_changes_nothing() {
        let mut w = arbiter(None);
        // Nobody holds the right: refused, no grant, no epoch.
        assert_eq!(
            w.request(&join("east"), MonoTime(1_000)).expect("ok"),
            (
                ClaimOutcome::Held {
                    holder: None,
                    epoch: 0,
                    retry_after_ms: 3_000
                },
                None
            )
        );
        assert_eq!(w.holder(MonoTime(1_000)), None);
        assert_eq!(w.record(), &WitnessRecord::default());
        assert!(w.presence(MonoTime(1_000)).is_empty(), "not a claim");
        // West is not preferred (east is) and does not reach the API server: its first claim
        // waits one tie window. East's joins, better ranked as a claim would be, do not make it
        // wait longer or outrank it.
        let mut w = arbiter(Some("east"));
        let blind_west = Claim {
            api_reachable: false,
            ..claim("west", None)
        };
        let mut east_join = join("east");
        east_join.claim.api_reachable = true;
        assert_eq!(granted(&w.claim(&blind_west, MonoTime(1_000))), None);
        for t in [1_500, 2_500, 3_500, 4_000] {
            assert!(matches!(
                w.request(&east_join, MonoTime(t)),
                Ok((
                    ClaimOutcome::Held {
                        holder: None,
                        epoch: 0,
                        ..
                    },
                    None
                ))
            ));
        }
        assert_eq!(
            granted(&w.claim(&blind_west, MonoTime(4_000))),
            Some(1),
            "west waited its tie window; east only joined"
        );
        // The other room holds the right: a join is held like a claim, and changes nothing.
        assert!(matches!(
            w.request(&east_join, MonoTime(5_000)),
            Ok((ClaimOutcome::Held { holder: Some(h), epoch: 1, .. }, None)) if h == "west"
        ));
        assert_eq!(w.record().epoch, 1);
        assert_eq!(w.holder(MonoTime(5_000)), Some(("west", 1)));
    }

    #[test]
    fn a_join_is_checked_like_a_claim() {
        let mut w = arbiter(None);
        let mut bad = join("East Wing");
        assert_eq!(
            w.request(&bad, MonoTime(0)).map(|_| ()),
            Err(ClaimError::BadRoom)
        );
        bad.claim.room = "east".into();
        bad.claim.epoch = Some(3);
        assert_eq!(
            w.request(&bad, MonoTime(0)).map(|_| ()),
            Err(ClaimError::UnknownEpoch {
                claimed: 3,
                current: 0
            })
        );
    }

    #[test]
    fn a_join_is_a_claim_with_join_true_on_the_wire() {
        let plain = ClaimRequest::from(claim("east", Some(2)));
        let wire = serde_json::to_string(&plain).expect("encode");
        assert_eq!(
            wire,
            serde_json::to_string(&plain.claim).expect("encode"),
            "an ordinary claim reads as before"
        );
        let wire = serde_json::to_string(&join("east")).expect("encode");
        assert_eq!(
            wire,
            r#"{"room":"east","epoch":null,"api_reachable":false,"join":true}"#
        );
        assert_eq!(
            serde_json::from_str::<ClaimRequest>(&wire).expect("decode"),
            join("east")
        );
    }

    #[test]
    fn bad_rooms_are_refused() {
        let mut w = arbiter(None);
        assert_eq!(
            w.claim(&claim("", None), MonoTime(0)).map(|_| ()),
            Err(ClaimError::BadRoom)
        );
        assert_eq!(
            w.claim(&claim("East Wing", None), MonoTime(0)).map(|_| ()),
            Err(ClaimError::BadRoom)
        );
        w.claim(&claim("east", None), MonoTime(0)).expect("ok");
        w.claim(&claim("west", None), MonoTime(0)).expect("ok");
        assert!(matches!(
            w.claim(&claim("north", None), MonoTime(0)),
            Err(ClaimError::ThirdRoom(..))
        ));
    }
}
