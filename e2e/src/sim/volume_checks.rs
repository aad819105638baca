//! The volume invariants — S1 for volumes on every step, S4 for volume epochs on every write,
//! a handover only once the holder writes no more — and the volume scenarios' expectations and
//! figures.

use super::api::{Key, Obj, Stored};
use super::cluster::Cluster;
use std::collections::BTreeMap;

/// What a volume scenario promises beyond the invariants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeExpectation {
    /// Every switchover request is done — a consumer other than the holder then has the volume
    /// mounted and its app running — within `within_ms`.
    SwitchWithin { within_ms: u64 },
    /// After every holder fault, another consumer runs the app within `within_ms`.
    FailoverWithin { within_ms: u64 },
    /// The database client had every record acknowledged, and none is missing on the device.
    AllRecordsKept,
    /// `node` is reset because a guard's deadline held its watchdog feeds back, within
    /// `within_ms` of `after_ms`.
    DeadlineFencesWithin {
        node: String,
        after_ms: u64,
        within_ms: u64,
    },
    /// No node is ever reset over a guard's deadline.
    NoDeadlineFence,
}

impl Cluster {
    /// S1 for volumes: at this instant, at most one consumer of each volume has the device
    /// mounted with its app running or stopping (a frozen guard's app included).
    pub(super) fn check_single_writer(&mut self) {
        let mut bad = Vec::new();
        for v in &self.volumes {
            let writers: Vec<String> = v
                .consumers
                .iter()
                .filter(|c| {
                    c.proc.as_ref().is_some_and(|p| p.writing())
                        && self.nodes.iter().any(|n| n.name == c.node && n.powered)
                })
                .map(|c| format!("{} on {}", c.pod, c.node))
                .collect();
            if writers.len() > 1 {
                bad.push(format!(
                    "{}: {} write at once",
                    v.name,
                    writers.join(" and ")
                ));
            }
        }
        if !bad.is_empty() {
            self.record.volumes.two_writer_steps += 1;
        }
        for b in bad {
            self.violate("S1-single-writer", b);
        }
    }

    /// S4 for volume Leases, on every accepted write: the epoch never goes back; a new holder's
    /// epoch is above every epoch granted before (acquires and handovers alike).
    pub(super) fn check_volume_write(&mut self, key: &Key, prev: Option<&Stored>, new: &Stored) {
        let (Key::VolumeLease(name), Obj::VolumeLease(l)) = (key, &new.obj) else {
            return;
        };
        let old = match prev.map(|p| &p.obj) {
            Some(Obj::VolumeLease(o)) => Some(o.clone()),
            _ => None,
        };
        let Some(v) = self.volumes.iter().position(|v| &v.name == name) else {
            return;
        };
        let max = self.volumes[v].max_epoch;
        let mut problems = Vec::new();
        if let Some(o) = &old {
            if l.epoch < o.epoch {
                problems.push(format!(
                    "{name}: epoch went back from {} to {}",
                    o.epoch, l.epoch
                ));
            }
            let new_term = l.holder.is_some() && (l.holder != o.holder || o.released);
            // A taker using the controller's handover takes exactly the epoch granted to it.
            let handed = o.handover.as_ref().is_some_and(|h| {
                Some(&h.to) == l.holder.as_ref() && h.epoch == l.epoch && l.handover.is_none()
            });
            if new_term && !l.released && !handed && l.epoch <= max {
                problems.push(format!(
                    "{name}: {:?} took the lease with epoch {}, not above epoch {max} granted before",
                    l.holder, l.epoch
                ));
            }
            if let Some(h) = &l.handover
                && o.handover.as_ref() != Some(h)
                && h.epoch <= max
            {
                problems.push(format!(
                    "{name}: handover to {} with epoch {}, not above epoch {max}",
                    h.to, h.epoch
                ));
            }
        }
        let granted = l.epoch.max(l.handover.as_ref().map_or(0, |h| h.epoch));
        self.volumes[v].max_epoch = max.max(granted);
        for p in problems {
            self.violate("S4-monotonic-epochs", p);
        }
    }

    /// The controller hands a volume over: the holder's app must not be writing any more.
    pub(super) fn check_handover(&mut self, volume: &str, holder: Option<&str>) {
        let writing = self.volumes.iter().filter(|v| v.name == volume).any(|v| {
            v.consumers.iter().any(|c| {
                Some(c.uid.as_str()) == holder
                    && c.proc.as_ref().is_some_and(|p| p.writing())
                    && self.nodes.iter().any(|n| n.name == c.node && n.powered)
            })
        });
        if writing {
            self.violate(
                "S2-no-unsafe-handover",
                format!("{volume} handed over while its holder {holder:?} still writes"),
            );
        }
    }

    /// The first app start of `volume` after `after` by a consumer other than `not`.
    fn taken_over(&self, volume: &str, after: u64, not: Option<&str>) -> Option<u64> {
        self.record
            .volumes
            .app_started
            .iter()
            .find(|(t, v, uid)| *t >= after && v == volume && Some(uid.as_str()) != not)
            .map(|(t, _, _)| *t)
    }

    /// The volume figures: `switchover_ms` (the slowest planned switch), `failover_ms` (the
    /// slowest takeover after a holder fault), `acked_records`, `lost_records`,
    /// `client_retries`, `two_writer_steps`.
    pub(super) fn volume_figures(&self, figures: &mut BTreeMap<String, u64>) {
        if self.volumes.is_empty() {
            return;
        }
        let r = &self.record.volumes;
        let slowest = |list: &[(u64, String, Option<String>)]| {
            list.iter()
                .filter_map(|(t, v, h)| self.taken_over(v, *t, h.as_deref()).map(|x| x - t))
                .max()
        };
        if let Some(ms) = slowest(&r.requests) {
            figures.insert("switchover_ms".into(), ms);
        }
        if let Some(ms) = slowest(&r.holder_faults) {
            figures.insert("failover_ms".into(), ms);
        }
        for v in &self.volumes {
            if let Some(c) = &v.client {
                figures.insert("acked_records".into(), c.acked);
                figures.insert("lost_records".into(), self.lost_records(v));
                figures.insert("client_retries".into(), c.retries);
            }
        }
        figures.insert("two_writer_steps".into(), r.two_writer_steps);
        figures.insert("volume_handovers".into(), r.handovers);
        figures.insert(
            "volume_faults".into(),
            (r.requests.len() + r.holder_faults.len()) as u64,
        );
        figures.insert("volume_app_starts".into(), r.app_started.len() as u64);
    }

    /// Acknowledged records missing on the device.
    fn lost_records(&self, v: &super::volume::SimVolume) -> u64 {
        let Some(c) = &v.client else {
            return 0;
        };
        let mut present = vec![false; usize::try_from(c.acked).unwrap_or(0) + 1];
        for r in &v.device.records {
            if let Some(x) = usize::try_from(*r).ok().and_then(|r| present.get_mut(r)) {
                *x = true;
            }
        }
        present.iter().skip(1).filter(|p| !**p).count() as u64
    }

    pub(super) fn check_volume_expectations(&mut self, expectations: &[VolumeExpectation]) {
        let mut unmet = Vec::new();
        let r = &self.record.volumes;
        for e in expectations {
            match e {
                VolumeExpectation::SwitchWithin { within_ms } => {
                    for (t, v, h) in &r.requests {
                        match self.taken_over(v, *t, h.as_deref()) {
                            Some(x) if x - t <= *within_ms => {}
                            got => unmet.push(format!(
                                "{v}: switchover requested at {t} ms not done within {within_ms} ms ({:?})",
                                got.map(|x| x - t)
                            )),
                        }
                    }
                }
                VolumeExpectation::FailoverWithin { within_ms } => {
                    for (t, v, h) in &r.holder_faults {
                        match self.taken_over(v, *t, h.as_deref()) {
                            Some(x) if x - t <= *within_ms => {}
                            got => unmet.push(format!(
                                "{v}: no other consumer ran the app within {within_ms} ms of the fault at {t} ms ({:?})",
                                got.map(|x| x - t)
                            )),
                        }
                    }
                }
                VolumeExpectation::AllRecordsKept => {
                    for v in &self.volumes {
                        if let Some(c) = &v.client {
                            let lost = self.lost_records(v);
                            if c.acked != c.total || lost > 0 {
                                unmet.push(format!(
                                    "{}: {} of {} records acknowledged, {lost} of them lost",
                                    v.name, c.acked, c.total
                                ));
                            }
                        }
                    }
                }
                VolumeExpectation::DeadlineFencesWithin {
                    node,
                    after_ms,
                    within_ms,
                } => {
                    let reset = r
                        .fenced_by_deadline
                        .iter()
                        .any(|(t, n)| n == node && *t >= *after_ms && *t - after_ms <= *within_ms);
                    if !reset {
                        unmet.push(format!(
                            "{node} not fenced over a guard's deadline within {within_ms} ms of {after_ms} ms"
                        ));
                    }
                }
                VolumeExpectation::NoDeadlineFence => {
                    if let Some((t, n)) = r.fenced_by_deadline.first() {
                        unmet.push(format!("{n} fenced over a guard's deadline at {t} ms"));
                    }
                }
            }
        }
        for u in unmet {
            self.violate("expectation", u);
        }
    }

    /// Liveness for volumes (random schedules): when the last fault lies [`VOLUME_QUIET_MS`]
    /// back, no link is cut, and some consumer's node is powered, connected, runs an agent with a
    /// sound, armed watchdog and was not reset or stopped meanwhile, some consumer of each
    /// volume writes (a holder that cannot start its app must not keep the volume).
    pub(super) fn check_volume_liveness(&mut self, scenario: &super::scenario::Scenario) {
        let last_fault = scenario.faults.iter().map(|f| f.at_ms).max().unwrap_or(0);
        let end = self.now;
        if last_fault + VOLUME_QUIET_MS > end || !self.cut.is_empty() {
            return;
        }
        let mut missed = Vec::new();
        for v in &self.volumes {
            let since = end - VOLUME_QUIET_MS;
            let r = &self.record;
            let calm = |node: &str| {
                let recent =
                    |list: &[(u64, String)]| list.iter().any(|(t, n)| n == node && *t >= since);
                !recent(&r.watchdog_fired)
                    && !recent(&r.right_lost)
                    && !recent(&r.volumes.fenced_by_deadline)
                    && r.agent_rebooted
                        .get(node)
                        .is_none_or(|ts| ts.iter().all(|t| *t < since))
            };
            let sound = v.consumers.iter().any(|c| {
                self.nodes.iter().any(|n| {
                    n.name == c.node
                        && n.powered
                        && !n.isolated
                        && n.last_feed.is_some()
                        && !n.watchdog_broken
                        && n.agent.as_ref().is_some_and(|a| !a.is_watchdog_failed())
                        && calm(&n.name)
                })
            });
            let writing = v
                .consumers
                .iter()
                .any(|c| c.proc.as_ref().is_some_and(|p| p.writing()));
            if sound && !writing {
                missed.push(format!(
                    "{}: no consumer writes {} ms after the last fault, all of them healthy",
                    v.name,
                    end - last_fault
                ));
            }
        }
        for m in missed {
            self.violate("liveness-volume", m);
        }
    }
}

/// How long after the last fault of a random schedule some consumer of each volume must write.
pub const VOLUME_QUIET_MS: u64 = 60_000;
