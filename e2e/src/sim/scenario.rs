//! Fault schedules: the named scenarios, and random ones drawn from a seed.

pub use super::random_schedule::random;
pub use super::volume::VolumeSpec;
pub use super::volume_checks::VolumeExpectation;

/// Where an actor stands. Rooms A and B hold the workers; the API server and the witness are
/// reached over links that can be cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    RoomA,
    RoomB,
    Api,
    Witness,
}

impl Site {
    pub fn name(self) -> &'static str {
        match self {
            Site::RoomA => "room-a",
            Site::RoomB => "room-b",
            Site::Api => "apiserver",
            Site::Witness => "witness",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    PowerOff(String),
    /// Power back on: a new boot ID, a fresh clock.
    PowerOn(String),
    Cut(Site, Site),
    Heal(Site, Site),
    /// A new worker joins a room.
    AddNode {
        name: String,
        room: Site,
    },
    /// An operator deletes a Node object.
    DeleteNode(String),
    /// The node's agent process dies; the node keeps running until its watchdog fires.
    AgentCrash(String),
    /// The node's watchdog hardware stops working: it never fires again (not after a reboot
    /// either), and the agent's next arm or feed fails.
    WatchdogBreaks(String),
    /// One node loses every link: the API server, the witness and the other room.
    Isolate(String),
    /// The isolated node's links come back.
    Reconnect(String),
    WitnessDown,
    WitnessUp,
    /// Someone in the node's room (a host-network pod, a machine given the partner's old
    /// address) starts answering the node's partner probes in the partner's name, vouching,
    /// without the cluster's key.
    ForgePeer(String),
    /// The forger is gone.
    StopForging(String),
    /// `twosite switchover` on a volume: to its consumer `to` (an index into the scenario's
    /// consumers; a killed consumer's replacement keeps its index), or any standby.
    Switchover {
        volume: String,
        to: Option<usize>,
    },
    /// The guard of the volume's holder freezes (SIGSTOP) for `for_ms`; its app writes on.
    FreezeHolder {
        volume: String,
        for_ms: u64,
    },
    /// The holder's guard and app are killed (SIGKILL) and its pod deleted; a new pod (a new
    /// UID) starts on the same node.
    KillHolder(String),
    /// The node of the volume's holder loses every link (as `Isolate`).
    IsolateHolder(String),
    /// The node `IsolateHolder` cut off gets its links back.
    ReconnectHolder(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::PowerOff(n) => write!(f, "power off {n}"),
            Fault::PowerOn(n) => write!(f, "power on {n}"),
            Fault::Cut(a, b) => write!(f, "cut link {} <-> {}", a.name(), b.name()),
            Fault::Heal(a, b) => write!(f, "heal link {} <-> {}", a.name(), b.name()),
            Fault::AddNode { name, room } => write!(f, "add node {name} in {}", room.name()),
            Fault::DeleteNode(n) => write!(f, "delete Node object {n}"),
            Fault::AgentCrash(n) => write!(f, "agent on {n} crashes"),
            Fault::WatchdogBreaks(n) => write!(f, "the watchdog of {n} breaks"),
            Fault::Isolate(n) => write!(
                f,
                "isolate {n} (cut from the API server, the witness and the other room)"
            ),
            Fault::Reconnect(n) => write!(f, "reconnect {n}"),
            Fault::WitnessDown => f.write_str("witness goes down"),
            Fault::WitnessUp => f.write_str("witness comes back"),
            Fault::ForgePeer(n) => write!(
                f,
                "a forger in {n}'s room answers its partner probes in the partner's name"
            ),
            Fault::StopForging(n) => write!(f, "the forger answering {n}'s probes is gone"),
            Fault::Switchover { volume, to } => match to {
                Some(k) => write!(f, "twosite switchover {volume} --to consumer {k}"),
                None => write!(f, "twosite switchover {volume}"),
            },
            Fault::FreezeHolder { volume, for_ms } => write!(
                f,
                "the guard of {volume}'s holder freezes for {} s (its app writes on)",
                for_ms / 1000
            ),
            Fault::KillHolder(v) => write!(f, "{v}'s holder is killed (guard and app)"),
            Fault::IsolateHolder(v) => write!(f, "the node of {v}'s holder loses every link"),
            Fault::ReconnectHolder(v) => write!(f, "the node of {v}'s holder is reconnected"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledFault {
    pub at_ms: u64,
    pub fault: Fault,
}

/// What a scripted scenario promises beyond the invariants; unmet, it is reported as a violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expectation {
    /// `node` gets a Dead verdict within `within_ms` of `after_ms`.
    DeadVerdictWithin {
        node: String,
        after_ms: u64,
        within_ms: u64,
    },
    /// `node`'s verdict is Healthy again within `within_ms` of `after_ms`.
    HealthyWithin {
        node: String,
        after_ms: u64,
        within_ms: u64,
    },
    /// No node ever gets a Dead verdict.
    NoDeadVerdict,
    /// The leader's remediation puts `node` in `phase` (a `Phase::name`) within `within_ms` of
    /// `after_ms`.
    PhaseWithin {
        node: String,
        phase: &'static str,
        after_ms: u64,
        within_ms: u64,
    },
    /// `node`'s agent reboots the node itself (its watchdog broken) within `within_ms` of
    /// `after_ms`.
    AgentRebootWithin {
        node: String,
        after_ms: u64,
        within_ms: u64,
    },
    /// The out-of-service taint is applied on `node` within `within_ms` of `after_ms`.
    TaintWithin {
        node: String,
        after_ms: u64,
        within_ms: u64,
    },
    /// Every pod of `node` is released (deleted) within `within_ms` of `after_ms`.
    PodsReleasedWithin {
        node: String,
        after_ms: u64,
        within_ms: u64,
    },
    /// A copy of `app` starts running on a live node within `within_ms` of `after_ms`.
    RunsAgainWithin {
        app: String,
        after_ms: u64,
        within_ms: u64,
    },
    /// The taint is removed from `node` within `within_ms` of `after_ms`.
    UntaintWithin {
        node: String,
        after_ms: u64,
        within_ms: u64,
    },
    /// No node is ever tainted.
    NoTaint,
    /// No watchdog ever fires and no agent ever loses its right to run.
    NoReboot,
    /// Every powered node of the room stops its HA workloads within `within_ms` of `after_ms`.
    RoomStops {
        room: Site,
        after_ms: u64,
        within_ms: u64,
    },
    /// No node of the room ever loses its right to run.
    RoomRuns(Site),
    /// The final status holds this many pairs.
    PairsAtEnd(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub nodes_per_room: (usize, usize),
    pub duration_ms: u64,
    pub faults: Vec<ScheduledFault>,
    pub expectations: Vec<Expectation>,
    /// The node whose failure the figures measure.
    pub target: Option<String>,
    /// Every clock at an edge of the drift bound (+1% or -1%) instead of within it.
    pub extreme_drift: bool,
    /// A witness runs in the third site and agents and controllers use it.
    pub witness: bool,
    /// The agents' stop command does nothing (none configured, or it fails): a node that lost
    /// its right to run keeps its HA workloads running until it resets.
    pub stop_command_fails: bool,
    /// Protected RWX block volumes and where their consumers run.
    pub volumes: Vec<VolumeSpec>,
    /// Records the database client writes through the first volume's active consumer (0: no
    /// client).
    pub client_records: u64,
    pub volume_expectations: Vec<VolumeExpectation>,
    /// KubeVirt VirtualMachines and where each first runs.
    pub vms: Vec<super::kubevirt::VmSpec>,
    pub vm_expectations: Vec<super::vm_checks::VmExpectation>,
}

fn at(s: u64, fault: Fault) -> ScheduledFault {
    ScheduledFault {
        at_ms: s * 1000,
        fault,
    }
}

/// Node names: `a-1`, `a-2`, … in room A; `b-1`, … in room B. The controller replicas run on
/// `a-1` and `b-1`.
pub fn node_name(room: Site, i: usize) -> String {
    match room {
        Site::RoomA => format!("a-{i}"),
        _ => format!("b-{i}"),
    }
}

/// The named scenarios, in the order `--list` shows them. The first is the default.
pub const NAMES: &[(&str, &str)] = &[
    (
        "node-loss",
        "2 rooms x 3 workers; worker a-2 loses power at 60 s and comes back at 150 s",
    ),
    (
        "node-flap",
        "a-2 loses power four times for 2-5 s: suspect, never dead, never tainted",
    ),
    (
        "api-outage",
        "both rooms lose the API server for 60 s: partners vouch, nothing stops, nothing is tainted",
    ),
    (
        "agent-crash",
        "the agent on a-2 dies while the node runs: the watchdog resets it before the taint",
    ),
    (
        "watchdog-broken",
        "a-2's watchdog breaks at 30 s and is reported; a-2 is isolated at 60 s: never tainted (NoAgent), its agent reboots it",
    ),
    (
        "watchdog-broken-unreported",
        "a-2's watchdog breaks as it is isolated and its stop command fails: fenced at the deadline, after its agent rebooted it",
    ),
    (
        "clock-drift",
        "node-loss with every clock at the edge of the 1% drift bound",
    ),
    (
        "partition-witness",
        "the rooms lose each other and room B the API server; both reach the witness: A runs on, B stops first",
    ),
    (
        "partition-no-witness",
        "the same partition without a witness: the room with the API server runs on, B stops",
    ),
    (
        "witness-down",
        "the witness is down for two minutes while the rooms are healthy: nothing stops",
    ),
    (
        "witness-down-then-room-loss",
        "the witness goes down, then room A loses power: a double failure, B stops rather than guess",
    ),
    (
        "asymmetric",
        "rooms cut apart; A keeps the API server but loses the witness, B the reverse: exactly one room runs",
    ),
    (
        "room-loss-witness",
        "room A loses power with a witness configured: B gets the grant, A's workloads move within 30 s",
    ),
    (
        "smallest",
        "1 worker per room; b-1 (with its controller replica) loses power at 40 s",
    ),
    (
        "leader-loss",
        "the node running the leading controller replica (a-1) loses power at 60 s",
    ),
    (
        "room-loss",
        "every worker of room A loses power at 60 s; room B's replica takes over",
    ),
    (
        "partition",
        "the link between the rooms is cut for 60 s; both still reach the API server: nothing dies",
    ),
    (
        "scale",
        "a worker joins each room, then a Node is deleted: old pairs stay, new ones form",
    ),
    (
        "forged-peer",
        "a forger in room A answers a-2's partner probes in its partner's name without the key; room A loses the API server at 60 s: a-2 stops anyway, is fenced and fails over",
    ),
    (
        "switchover",
        "a volume's consumers on a-2 and b-2; a planned switchover at 20 s moves it to b-2 (promise: under 5 s, never two writers)",
    ),
    (
        "failback",
        "the same volume switched to b-2 at 20 s and back to a-2 at 40 s (promise: each under 5 s)",
    ),
    (
        "holder-partitioned",
        "room A (with the volume's holder on a-2) loses the API server at 30 s: a-2's guard stops its app itself (no deadline fence) before b-2 mounts, within 30 s",
    ),
    (
        "holder-frozen",
        "the holder's guard on a-2 freezes for 60 s while its app writes on: a-2's agent withholds its watchdog and the node resets before b-2 mounts",
    ),
    (
        "db-failover",
        "a client writes 10,000 records with retry through the active consumer; the active is killed at 20 s: every acknowledged record is on the device",
    ),
    (
        "vm-node-loss",
        "a-2, running two opted-in VMs and one that did not opt in, loses power at 60 s: the opted-in ones run elsewhere within 30 s, the other is left to Kubernetes",
    ),
    (
        "room-a-power-loss",
        "room A runs 12 opted-in VMs and 4 that did not opt in, room B 6; every node of room A loses power at 60 s: all 12 run in room B within 30 s, room B's VMs undisturbed",
    ),
    (
        "vm-partition-witness",
        "VMs in both rooms; the rooms lose each other and room B the API server, both reach the witness: B's opted-in VMs run in A after B stopped, A's undisturbed",
    ),
    (
        "random",
        "a random fault schedule drawn from --seed (what --schedules runs)",
    ),
];

/// Looks a scenario up by name; `None` for an unknown name.
/// The brief's failover target: a dead node's HA workloads run elsewhere within 30 s.
pub const FAILOVER_TARGET_MS: u64 = 30_000;

pub fn named(name: &str, seed: u64) -> Option<Scenario> {
    let description = NAMES.iter().find(|(n, _)| *n == name)?.1.to_string();
    let mut s = Scenario {
        name: name.to_string(),
        description,
        nodes_per_room: (3, 3),
        duration_ms: 200_000,
        faults: Vec::new(),
        expectations: Vec::new(),
        target: None,
        extreme_drift: false,
        witness: false,
        stop_command_fails: false,
        volumes: Vec::new(),
        client_records: 0,
        volume_expectations: Vec::new(),
        vms: Vec::new(),
        vm_expectations: Vec::new(),
    };
    if let Some(v) = super::volume_scenarios::named(name, &s) {
        return Some(v);
    }
    if let Some(v) = super::vm_scenarios::named(name, &s) {
        return Some(v);
    }
    match name {
        "node-loss" => {
            s.faults = vec![
                at(60, Fault::PowerOff("a-2".into())),
                at(150, Fault::PowerOn("a-2".into())),
            ];
            s.target = Some("a-2".into());
            s.expectations = vec![
                Expectation::DeadVerdictWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 15_000,
                },
                Expectation::TaintWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 30_000,
                },
                Expectation::PodsReleasedWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 30_000,
                },
                Expectation::HealthyWithin {
                    node: "a-2".into(),
                    after_ms: 150_000,
                    within_ms: 10_000,
                },
                Expectation::UntaintWithin {
                    node: "a-2".into(),
                    after_ms: 150_000,
                    within_ms: 10_000,
                },
                Expectation::PairsAtEnd(3),
            ];
        }
        "clock-drift" => {
            s.extreme_drift = true;
            s.faults = vec![
                at(60, Fault::PowerOff("a-2".into())),
                at(150, Fault::PowerOn("a-2".into())),
            ];
            s.target = Some("a-2".into());
            s.expectations = vec![
                Expectation::TaintWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 30_000,
                },
                Expectation::UntaintWithin {
                    node: "a-2".into(),
                    after_ms: 150_000,
                    within_ms: 10_000,
                },
                Expectation::PairsAtEnd(3),
            ];
        }
        "node-flap" => {
            s.faults = [(60, 3), (75, 5), (90, 2), (105, 4)]
                .iter()
                .flat_map(|(t, d)| {
                    [
                        at(*t, Fault::PowerOff("a-2".into())),
                        at(t + d, Fault::PowerOn("a-2".into())),
                    ]
                })
                .collect();
            s.expectations = vec![
                Expectation::NoDeadVerdict,
                Expectation::NoTaint,
                Expectation::PairsAtEnd(3),
            ];
        }
        "api-outage" => {
            s.faults = vec![
                at(60, Fault::Cut(Site::RoomA, Site::Api)),
                at(60, Fault::Cut(Site::RoomB, Site::Api)),
                at(120, Fault::Heal(Site::RoomA, Site::Api)),
                at(120, Fault::Heal(Site::RoomB, Site::Api)),
            ];
            s.expectations = vec![
                Expectation::NoTaint,
                Expectation::NoReboot,
                Expectation::PairsAtEnd(3),
            ];
        }
        "forged-peer" => {
            s.faults = vec![
                at(30, Fault::ForgePeer("a-2".into())),
                at(60, Fault::Cut(Site::RoomA, Site::Api)),
                at(150, Fault::Heal(Site::RoomA, Site::Api)),
                at(170, Fault::StopForging("a-2".into())),
            ];
            s.expectations = vec![
                Expectation::TaintWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 30_000,
                },
                Expectation::PodsReleasedWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 30_000,
                },
            ];
        }
        "agent-crash" => {
            s.faults = vec![at(60, Fault::AgentCrash("a-2".into()))];
            s.target = Some("a-2".into());
            s.expectations = vec![
                Expectation::TaintWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 30_000,
                },
                // The watchdog fires within 5 s, the node boots 30 s later.
                Expectation::UntaintWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 50_000,
                },
                Expectation::PairsAtEnd(3),
            ];
        }
        "watchdog-broken" => {
            // The agent learns of the failure at its next feed (1 s) and reports it at its next
            // renewal (2 s): the controller has long seen `failed` when a-2 is cut off, judges
            // it by its kubelet alone and never fences it by time.
            s.faults = vec![
                at(30, Fault::WatchdogBreaks("a-2".into())),
                at(60, Fault::Isolate("a-2".into())),
                at(150, Fault::Reconnect("a-2".into())),
            ];
            s.target = Some("a-2".into());
            s.expectations = vec![
                // Its lease runs out 8 s after its last renewal: no vouch, its partner is out
                // of reach too.
                Expectation::AgentRebootWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 10_000,
                },
                // Dead by its kubelet Lease (40 s), without a fence deadline.
                Expectation::PhaseWithin {
                    node: "a-2".into(),
                    phase: "NoAgent",
                    after_ms: 60_000,
                    within_ms: 50_000,
                },
                Expectation::NoTaint,
                Expectation::HealthyWithin {
                    node: "a-2".into(),
                    after_ms: 150_000,
                    within_ms: 10_000,
                },
                Expectation::PairsAtEnd(3),
            ];
        }
        "watchdog-broken-unreported" => {
            // The failure and the isolation come together: the report never reaches the API
            // server, the controller fences a-2 by time. With the stop command failing, only
            // the agent's own reboot ends a-2's workloads before the fence deadline (S2).
            s.stop_command_fails = true;
            s.faults = vec![
                at(60, Fault::WatchdogBreaks("a-2".into())),
                at(60, Fault::Isolate("a-2".into())),
                at(150, Fault::Reconnect("a-2".into())),
            ];
            s.target = Some("a-2".into());
            s.expectations = vec![
                Expectation::AgentRebootWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 10_000,
                },
                Expectation::TaintWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 30_000,
                },
                Expectation::PodsReleasedWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 30_000,
                },
                // Back with a new boot ID once reconnected.
                Expectation::UntaintWithin {
                    node: "a-2".into(),
                    after_ms: 150_000,
                    within_ms: 10_000,
                },
                Expectation::PairsAtEnd(3),
            ];
        }
        "smallest" => {
            s.nodes_per_room = (1, 1);
            s.duration_ms = 120_000;
            s.faults = vec![at(40, Fault::PowerOff("b-1".into()))];
            s.target = Some("b-1".into());
            s.expectations = vec![
                Expectation::DeadVerdictWithin {
                    node: "b-1".into(),
                    after_ms: 40_000,
                    within_ms: 30_000,
                },
                Expectation::TaintWithin {
                    node: "b-1".into(),
                    after_ms: 40_000,
                    within_ms: 30_000,
                },
                Expectation::PairsAtEnd(1),
            ];
        }
        "leader-loss" => {
            s.faults = vec![at(60, Fault::PowerOff("a-1".into()))];
            s.target = Some("a-1".into());
            // The survivor first waits out the old leader's lease (15 s), then judges the node
            // from scratch on its own clock.
            s.expectations = vec![
                Expectation::DeadVerdictWithin {
                    node: "a-1".into(),
                    after_ms: 60_000,
                    within_ms: 40_000,
                },
                Expectation::TaintWithin {
                    node: "a-1".into(),
                    after_ms: 60_000,
                    within_ms: 30_000,
                },
                Expectation::PairsAtEnd(3),
            ];
        }
        "room-loss" => {
            s.faults = (1..=3)
                .map(|i| at(60, Fault::PowerOff(node_name(Site::RoomA, i))))
                .collect();
            s.target = Some("a-2".into());
            s.expectations = (1..=3)
                .map(|i| Expectation::TaintWithin {
                    node: node_name(Site::RoomA, i),
                    after_ms: 60_000,
                    within_ms: 30_000,
                })
                .collect();
            s.expectations.push(Expectation::PairsAtEnd(3));
        }
        "partition" => {
            s.faults = vec![
                at(60, Fault::Cut(Site::RoomA, Site::RoomB)),
                at(120, Fault::Heal(Site::RoomA, Site::RoomB)),
            ];
            s.expectations = vec![Expectation::NoDeadVerdict, Expectation::PairsAtEnd(3)];
        }
        "scale" => {
            s.nodes_per_room = (2, 2);
            s.faults = vec![
                at(
                    40,
                    Fault::AddNode {
                        name: "a-9".into(),
                        room: Site::RoomA,
                    },
                ),
                at(
                    60,
                    Fault::AddNode {
                        name: "b-9".into(),
                        room: Site::RoomB,
                    },
                ),
                at(80, Fault::PowerOff("b-2".into())),
                at(100, Fault::DeleteNode("b-2".into())),
            ];
            // a-2 loses its partner b-2 and stays unpaired: 2 pairs (a-1/b-1, a-9/b-9).
            s.expectations = vec![Expectation::PairsAtEnd(2)];
        }
        "partition-witness" | "partition-no-witness" => {
            s.witness = name == "partition-witness";
            s.faults = vec![
                at(60, Fault::Cut(Site::RoomA, Site::RoomB)),
                at(60, Fault::Cut(Site::RoomB, Site::Api)),
                at(150, Fault::Heal(Site::RoomA, Site::RoomB)),
                at(150, Fault::Heal(Site::RoomB, Site::Api)),
            ];
            s.target = Some("b-2".into());
            s.expectations = vec![
                Expectation::RoomStops {
                    room: Site::RoomB,
                    after_ms: 60_000,
                    within_ms: 15_000,
                },
                Expectation::RoomRuns(Site::RoomA),
                Expectation::TaintWithin {
                    node: "b-2".into(),
                    after_ms: 60_000,
                    within_ms: 30_000,
                },
            ];
        }
        "witness-down" => {
            s.witness = true;
            s.faults = vec![at(60, Fault::WitnessDown), at(180, Fault::WitnessUp)];
            s.expectations = vec![
                Expectation::NoReboot,
                Expectation::NoTaint,
                Expectation::PairsAtEnd(3),
            ];
        }
        "witness-down-then-room-loss" => {
            s.witness = true;
            s.faults = vec![at(60, Fault::WitnessDown)];
            s.faults
                .extend((1..=3).map(|i| at(90, Fault::PowerOff(node_name(Site::RoomA, i)))));
            s.expectations = vec![
                Expectation::RoomStops {
                    room: Site::RoomB,
                    after_ms: 90_000,
                    within_ms: 15_000,
                },
                Expectation::NoTaint,
            ];
        }
        "asymmetric" => {
            s.witness = true;
            s.faults = vec![
                at(60, Fault::Cut(Site::RoomA, Site::RoomB)),
                at(60, Fault::Cut(Site::RoomA, Site::Witness)),
                at(60, Fault::Cut(Site::RoomB, Site::Api)),
            ];
            s.expectations = vec![
                Expectation::RoomStops {
                    room: Site::RoomA,
                    after_ms: 60_000,
                    within_ms: 15_000,
                },
                Expectation::RoomRuns(Site::RoomB),
                Expectation::NoTaint,
            ];
        }
        "room-loss-witness" => {
            s.witness = true;
            s.faults = (1..=3)
                .map(|i| at(60, Fault::PowerOff(node_name(Site::RoomA, i))))
                .collect();
            s.target = Some("a-2".into());
            s.expectations = vec![
                Expectation::RoomRuns(Site::RoomB),
                Expectation::TaintWithin {
                    node: "a-2".into(),
                    after_ms: 60_000,
                    within_ms: 30_000,
                },
            ];
        }
        "random" => return Some(random(seed)),
        _ => return None,
    }
    // The promise behind every release: the target's workload runs again, on a live node (a
    // copy counts as running only there), within the failover target.
    let released: Vec<(String, u64)> = s
        .expectations
        .iter()
        .filter_map(|e| match e {
            Expectation::PodsReleasedWithin { node, after_ms, .. } => {
                Some((node.clone(), *after_ms))
            }
            _ => None,
        })
        .collect();
    for (node, after_ms) in released {
        s.expectations.push(Expectation::RunsAgainWithin {
            app: format!("app-{node}"),
            after_ms,
            within_ms: FAILOVER_TARGET_MS,
        });
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_resolves() {
        for (name, _) in NAMES {
            assert!(named(name, 1).is_some(), "{name}");
        }
        assert!(named("no-such", 1).is_none());
    }

    #[test]
    fn random_schedules_are_deterministic_and_varied() {
        assert_eq!(random(7), random(7));
        let distinct: std::collections::BTreeSet<String> =
            (0..20).map(|s| format!("{:?}", random(s).faults)).collect();
        assert!(distinct.len() > 15);
    }
}
