//! Random fault schedules (what `--schedules` runs): node, link, witness, agent and watchdog
//! faults, forged peers, and volume faults, each family drawn from a stream of its own so that
//! adding one leaves the others of a seed as they were.

use super::scenario::{Fault, Scenario, ScheduledFault, Site, node_name};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;

/// A random fault schedule: 1–3 workers per room, 1–5 faults in the first four minutes of a
/// five-minute run, each healed or not. Deterministic in `seed`.
pub fn random(seed: u64) -> Scenario {
    // A different stream from the simulation's own jitter, so the same seed can be replayed.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7477_6f73_6974_6521);
    let na = rng.random_range(1..=3usize);
    let nb = rng.random_range(1..=3usize);
    let witness = rng.random_bool(0.5);
    let mut faults = Vec::new();
    let mut added = 0;
    for _ in 0..rng.random_range(1..=5) {
        let t = rng.random_range(10_000..240_000u64);
        let room = if rng.random_bool(0.5) {
            Site::RoomA
        } else {
            Site::RoomB
        };
        let n = if room == Site::RoomA { na } else { nb };
        let node = node_name(room, rng.random_range(1..=n));
        let back = t + rng.random_range(5_000..120_000u64);
        match rng.random_range(0..16) {
            14 => faults.push(ScheduledFault {
                at_ms: t,
                fault: Fault::WatchdogBreaks(node),
            }),
            15 => {
                faults.push(ScheduledFault {
                    at_ms: t,
                    fault: Fault::Isolate(node.clone()),
                });
                if rng.random_bool(0.8) {
                    faults.push(ScheduledFault {
                        at_ms: back,
                        fault: Fault::Reconnect(node),
                    });
                }
            }
            12 => {
                faults.push(ScheduledFault {
                    at_ms: t,
                    fault: Fault::WitnessDown,
                });
                faults.push(ScheduledFault {
                    at_ms: back,
                    fault: Fault::WitnessUp,
                });
            }
            13 => {
                faults.push(ScheduledFault {
                    at_ms: t,
                    fault: Fault::Cut(room, Site::Witness),
                });
                faults.push(ScheduledFault {
                    at_ms: back,
                    fault: Fault::Heal(room, Site::Witness),
                });
            }
            10 => faults.push(ScheduledFault {
                at_ms: t,
                fault: Fault::AgentCrash(node),
            }),
            11 => {
                // The API server is lost from both rooms for a while.
                for room in [Site::RoomA, Site::RoomB] {
                    faults.push(ScheduledFault {
                        at_ms: t,
                        fault: Fault::Cut(room, Site::Api),
                    });
                    faults.push(ScheduledFault {
                        at_ms: back,
                        fault: Fault::Heal(room, Site::Api),
                    });
                }
            }
            0..=3 => {
                faults.push(ScheduledFault {
                    at_ms: t,
                    fault: Fault::PowerOff(node.clone()),
                });
                if rng.random_bool(0.7) {
                    faults.push(ScheduledFault {
                        at_ms: back,
                        fault: Fault::PowerOn(node),
                    });
                } else if rng.random_bool(0.5) {
                    faults.push(ScheduledFault {
                        at_ms: back,
                        fault: Fault::DeleteNode(node),
                    });
                }
            }
            4..=6 => {
                let pairs = [
                    (Site::RoomA, Site::RoomB),
                    (Site::RoomA, Site::Api),
                    (Site::RoomB, Site::Api),
                ];
                let (x, y) = pairs[rng.random_range(0..pairs.len())];
                faults.push(ScheduledFault {
                    at_ms: t,
                    fault: Fault::Cut(x, y),
                });
                if rng.random_bool(0.8) {
                    faults.push(ScheduledFault {
                        at_ms: back,
                        fault: Fault::Heal(x, y),
                    });
                }
            }
            7 => {
                // A whole room loses power, and maybe comes back.
                for i in 1..=n {
                    faults.push(ScheduledFault {
                        at_ms: t,
                        fault: Fault::PowerOff(node_name(room, i)),
                    });
                    if rng.random_bool(0.5) {
                        faults.push(ScheduledFault {
                            at_ms: back,
                            fault: Fault::PowerOn(node_name(room, i)),
                        });
                    }
                }
            }
            _ => {
                added += 1;
                faults.push(ScheduledFault {
                    at_ms: t,
                    fault: Fault::AddNode {
                        name: format!("{}-new{added}", &node[..1]),
                        room,
                    },
                });
            }
        }
    }
    // A node whose agent dies and whose watchdog breaks runs on with nothing left that could
    // stop it: a double failure no design of this kind survives, left out of the schedules.
    let broken: BTreeSet<String> = faults
        .iter()
        .filter_map(|f| match &f.fault {
            Fault::WatchdogBreaks(n) => Some(n.clone()),
            _ => None,
        })
        .collect();
    faults.retain(|f| !matches!(&f.fault, Fault::AgentCrash(n) if broken.contains(n)));
    // A forged peer in a third of the schedules, drawn from a stream of its own so the other
    // faults of a seed stay what they were before forgers existed.
    let mut forge = ChaCha8Rng::seed_from_u64(seed ^ 0x666f_7267_6564_2121);
    if forge.random_bool(0.33) {
        let room = if forge.random_bool(0.5) {
            Site::RoomA
        } else {
            Site::RoomB
        };
        let n = if room == Site::RoomA { na } else { nb };
        let node = node_name(room, forge.random_range(1..=n));
        let t = forge.random_range(0..200_000u64);
        faults.push(ScheduledFault {
            at_ms: t,
            fault: Fault::ForgePeer(node.clone()),
        });
        if forge.random_bool(0.5) {
            faults.push(ScheduledFault {
                at_ms: t + forge.random_range(10_000..100_000u64),
                fault: Fault::StopForging(node),
            });
        }
    }
    let volumes = super::volume_scenarios::random_volume(seed, na, nb, &mut faults);
    faults.sort_by_key(|f| f.at_ms);
    Scenario {
        name: "random".into(),
        description: format!(
            "random fault schedule from seed {seed}{}",
            if witness { ", with a witness" } else { "" }
        ),
        nodes_per_room: (na, nb),
        duration_ms: 300_000,
        faults,
        expectations: Vec::new(),
        target: None,
        extreme_drift: false,
        witness,
        stop_command_fails: false,
        volumes,
        client_records: 0,
        volume_expectations: Vec::new(),
        vms: super::vm_scenarios::random_vms(seed, na, nb),
        vm_expectations: Vec::new(),
    }
}
