//! The VM scenarios (`vm-node-loss`, `room-a-power-loss`, `vm-partition-witness`) and the VMs
//! mixed into the random schedules.

use super::kubevirt::VmSpec;
use super::scenario::{Expectation, Fault, Scenario, ScheduledFault, Site, node_name};
use super::vm_checks::VmExpectation;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The brief's target: every opted-in VM of a lost room runs in the other room within 30 s.
pub const VM_FAILOVER_TARGET_MS: u64 = 30_000;

fn at(ms: u64, fault: Fault) -> ScheduledFault {
    ScheduledFault { at_ms: ms, fault }
}

fn room_nodes(room: Site, n: usize) -> Vec<String> {
    (1..=n).map(|i| node_name(room, i)).collect()
}

/// `count` VMs named `<prefix>-<k>`, spread over `nodes` in turn.
fn vms(prefix: &str, count: usize, nodes: &[String], annotated: bool) -> Vec<VmSpec> {
    (0..count)
        .map(|k| {
            VmSpec::new(
                &format!("{prefix}-{}", k + 1),
                &nodes[k % nodes.len()],
                annotated,
            )
        })
        .collect()
}

/// The VM scenario `name`, built on the defaults in `base`; `None` if `name` is not one.
pub fn named(name: &str, base: &Scenario) -> Option<Scenario> {
    let mut s = base.clone();
    let room_a = room_nodes(Site::RoomA, 3);
    let room_b = room_nodes(Site::RoomB, 3);
    match name {
        "vm-node-loss" => {
            s.duration_ms = 150_000;
            s.vms = vec![
                VmSpec::new("web", "a-2", true),
                VmSpec::new("db", "a-2", true),
                VmSpec::new("legacy", "a-2", false),
                VmSpec::new("queue", "a-3", true),
                VmSpec::new("cache", "b-2", true),
            ];
            s.faults = vec![at(60_000, Fault::PowerOff("a-2".into()))];
            s.target = Some("a-2".into());
            let lost = vec!["a-2".to_string()];
            s.vm_expectations = vec![
                VmExpectation::Undisturbed { lost: lost.clone() },
                VmExpectation::AllRunningElsewhere {
                    lost,
                    after_ms: 60_000,
                    within_ms: VM_FAILOVER_TARGET_MS,
                },
            ];
        }
        "room-a-power-loss" => {
            s.duration_ms = 150_000;
            s.vms = vms("a-vm", 12, &room_a, true);
            s.vms.extend(vms("a-plain", 4, &room_a, false));
            s.vms.extend(vms("b-vm", 6, &room_b, true));
            s.faults = room_a
                .iter()
                .map(|n| at(60_000, Fault::PowerOff(n.clone())))
                .collect();
            s.target = Some("a-2".into());
            s.vm_expectations = vec![
                VmExpectation::Undisturbed {
                    lost: room_a.clone(),
                },
                VmExpectation::AllRunningElsewhere {
                    lost: room_a,
                    after_ms: 60_000,
                    within_ms: VM_FAILOVER_TARGET_MS,
                },
            ];
        }
        "vm-partition-witness" => {
            s.witness = true;
            s.duration_ms = 240_000;
            s.vms = vms("a-vm", 3, &room_a, true);
            s.vms.push(VmSpec::new("a-plain", "a-3", false));
            s.vms.extend(vms("b-vm", 3, &room_b, true));
            s.vms.push(VmSpec::new("b-plain", "b-3", false));
            s.faults = vec![
                at(60_000, Fault::Cut(Site::RoomA, Site::RoomB)),
                at(60_000, Fault::Cut(Site::RoomB, Site::Api)),
                at(150_000, Fault::Heal(Site::RoomA, Site::RoomB)),
                at(150_000, Fault::Heal(Site::RoomB, Site::Api)),
            ];
            s.target = Some("b-2".into());
            s.expectations = vec![
                Expectation::RoomStops {
                    room: Site::RoomB,
                    after_ms: 60_000,
                    within_ms: 30_000,
                },
                Expectation::RoomRuns(Site::RoomA),
            ];
            s.vm_expectations = vec![
                VmExpectation::Undisturbed {
                    lost: room_b.clone(),
                },
                VmExpectation::AllRunningElsewhere {
                    lost: room_b,
                    after_ms: 60_000,
                    within_ms: 2 * VM_FAILOVER_TARGET_MS,
                },
            ];
        }
        _ => return None,
    }
    Some(s)
}

/// VMs for a random schedule, from a stream of their own (so the other faults of a seed stay
/// what they were): in a third of the schedules, 1–3 opted-in VMs and 0–2 that did not opt in,
/// on random nodes; now and then one with a runStrategy that does not restart, or a disk the
/// leases do not protect.
pub fn random_vms(seed: u64, na: usize, nb: usize) -> Vec<VmSpec> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7669_7274_6d61_6368);
    if !rng.random_bool(0.33) {
        return Vec::new();
    }
    let node = |rng: &mut ChaCha8Rng| {
        if rng.random_bool(0.5) {
            node_name(Site::RoomA, rng.random_range(1..=na))
        } else {
            node_name(Site::RoomB, rng.random_range(1..=nb))
        }
    };
    let mut out = Vec::new();
    for k in 0..rng.random_range(1..=3usize) {
        let mut v = VmSpec::new(&format!("vm-{k}"), &node(&mut rng), true);
        if rng.random_bool(0.1) {
            v.run_strategy = "Manual".into();
        }
        if rng.random_bool(0.1) {
            v.rwx_block = false;
        }
        out.push(v);
    }
    for k in 0..rng.random_range(0..=2usize) {
        out.push(VmSpec::new(&format!("plain-{k}"), &node(&mut rng), false));
    }
    out
}
