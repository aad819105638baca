//! The volume scenarios (`switchover`, `failback`, `holder-partitioned`, `holder-frozen`,
//! `db-failover`) and the volume faults mixed into the random schedules.
//!
//! Every volume scenario runs one protected volume, `vol-1`, with a consumer pinned to `a-2`
//! (started first, so the first holder) and one to `b-2` (the standby), two workers per room.

use super::scenario::{
    Expectation, Fault, Scenario, ScheduledFault, Site, VolumeExpectation, VolumeSpec, node_name,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The brief's promise for a planned switchover of a volume.
pub const SWITCHOVER_TARGET_MS: u64 = 5_000;
/// A takeover after the holder is lost: the lease's expiry (10 s + 2 s margin, stretched by the
/// drift bound) plus the watch and answer delays, or the fence and the handover.
pub const VOLUME_FAILOVER_TARGET_MS: u64 = 30_000;
/// Records the `db-failover` client writes.
pub const DB_RECORDS: u64 = 10_000;

const VOLUME: &str = "vol-1";

fn at(ms: u64, fault: Fault) -> ScheduledFault {
    ScheduledFault { at_ms: ms, fault }
}

fn one_volume() -> Vec<VolumeSpec> {
    vec![VolumeSpec {
        name: VOLUME.into(),
        consumers: vec!["a-2".into(), "b-2".into()],
    }]
}

/// The volume scenario `name`, built on the defaults in `base`; `None` if `name` is not one.
pub fn named(name: &str, base: &Scenario) -> Option<Scenario> {
    let mut s = base.clone();
    s.nodes_per_room = (2, 2);
    s.volumes = one_volume();
    let v = || VOLUME.to_string();
    match name {
        "switchover" => {
            s.duration_ms = 60_000;
            s.faults = vec![at(
                20_000,
                Fault::Switchover {
                    volume: v(),
                    to: None,
                },
            )];
            s.volume_expectations = vec![
                VolumeExpectation::SwitchWithin {
                    within_ms: SWITCHOVER_TARGET_MS,
                },
                VolumeExpectation::NoDeadlineFence,
            ];
            s.expectations = vec![Expectation::NoReboot];
        }
        "failback" => {
            s.duration_ms = 80_000;
            s.faults = vec![
                at(
                    20_000,
                    Fault::Switchover {
                        volume: v(),
                        to: Some(1),
                    },
                ),
                at(
                    40_000,
                    Fault::Switchover {
                        volume: v(),
                        to: Some(0),
                    },
                ),
            ];
            s.volume_expectations = vec![
                VolumeExpectation::SwitchWithin {
                    within_ms: SWITCHOVER_TARGET_MS,
                },
                VolumeExpectation::NoDeadlineFence,
            ];
            s.expectations = vec![Expectation::NoReboot];
        }
        "holder-partitioned" => {
            // The holder's room loses the API server while the other room keeps it: the
            // guard cannot renew, demotes at its deadline and stops its app on its own (no
            // deadline fence); room A then loses its right to run and resets, and the standby
            // takes the lease once it has expired.
            s.duration_ms = 120_000;
            s.faults = vec![
                at(30_000, Fault::Cut(Site::RoomA, Site::Api)),
                at(90_000, Fault::Heal(Site::RoomA, Site::Api)),
            ];
            s.volume_expectations = vec![
                VolumeExpectation::NoDeadlineFence,
                VolumeExpectation::FailoverWithin {
                    within_ms: VOLUME_FAILOVER_TARGET_MS,
                },
            ];
        }
        "holder-frozen" => {
            s.duration_ms = 120_000;
            s.faults = vec![at(
                30_000,
                Fault::FreezeHolder {
                    volume: v(),
                    for_ms: 60_000,
                },
            )];
            s.volume_expectations = vec![
                VolumeExpectation::FailoverWithin {
                    within_ms: VOLUME_FAILOVER_TARGET_MS,
                },
                VolumeExpectation::DeadlineFencesWithin {
                    node: "a-2".into(),
                    after_ms: 30_000,
                    within_ms: 10_000,
                },
            ];
        }
        "db-failover" => {
            s.duration_ms = 90_000;
            s.client_records = DB_RECORDS;
            s.faults = vec![at(20_000, Fault::KillHolder(v()))];
            s.volume_expectations = vec![
                VolumeExpectation::FailoverWithin {
                    within_ms: VOLUME_FAILOVER_TARGET_MS,
                },
                VolumeExpectation::AllRecordsKept,
            ];
        }
        _ => return None,
    }
    Some(s)
}

/// The volume of a random schedule (consumers on the last worker of each room) and its faults,
/// drawn from a stream of their own so the other faults of a seed stay what they were.
pub fn random_volume(
    seed: u64,
    na: usize,
    nb: usize,
    faults: &mut Vec<ScheduledFault>,
) -> Vec<VolumeSpec> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x766f_6c66_6175_6c74);
    let v = || VOLUME.to_string();
    for _ in 0..rng.random_range(0..=3) {
        let t = rng.random_range(10_000..240_000u64);
        match rng.random_range(0..4) {
            0 => faults.push(at(
                t,
                Fault::Switchover {
                    volume: v(),
                    to: None,
                },
            )),
            1 => faults.push(at(
                t,
                Fault::FreezeHolder {
                    volume: v(),
                    for_ms: rng.random_range(2_000..70_000),
                },
            )),
            2 => faults.push(at(t, Fault::KillHolder(v()))),
            _ => {
                faults.push(at(t, Fault::IsolateHolder(v())));
                if rng.random_bool(0.8) {
                    let back = t + rng.random_range(5_000..100_000u64);
                    faults.push(at(back, Fault::ReconnectHolder(v())));
                }
            }
        }
    }
    vec![VolumeSpec {
        name: VOLUME.into(),
        consumers: vec![node_name(Site::RoomA, na), node_name(Site::RoomB, nb)],
    }]
}
