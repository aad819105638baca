//! The invariant checks run on every write and after every step (S1 to S4, pairs, leaders,
//! verdicts), a scripted scenario's expectations, and the figures read off the record.

use super::api::{ApiServer, Key, Obj, StatusObj, Stored};
use super::cluster::{Cluster, TICK_MS, ms, ordered};
use super::scenario::{Expectation, Site};
use node_health::{NodeObservation, NodeVerdict, Pair};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

impl Cluster {
    /// Invariants judged on every write the API server accepts.
    pub(super) fn check_write(
        &mut self,
        key: &Key,
        prev: Option<&Stored>,
        prev_at: u64,
        new: &Stored,
    ) {
        self.check_volume_write(key, prev, new);
        self.check_disk_lease_write(key, prev, new);
        match (key, prev.map(|p| &p.obj), &new.obj) {
            (Key::LeaderLease, Some(Obj::Lease(old)), Obj::Lease(l)) => {
                // S4 for the leader Lease: a new holder's term has a higher epoch; epochs never
                // go back.
                let new_term = old.holder != l.holder && l.holder.is_some();
                if l.transitions < old.transitions || (new_term && l.transitions <= old.transitions)
                {
                    self.violate(
                        "S4-monotonic-epochs",
                        format!(
                            "leader lease went from {:?}@{} to {:?}@{}",
                            old.holder, old.transitions, l.holder, l.transitions
                        ),
                    );
                }
            }
            (Key::Status, old, Obj::Status(s)) => {
                let old = match old {
                    Some(Obj::Status(o)) => Some(o.clone()),
                    _ => None,
                };
                self.check_pairs(old.as_ref(), prev_at, s);
            }
            _ => {}
        }
    }

    /// Pairs span the two rooms, no node is in two pairs, and a pair is never broken while both
    /// its nodes have existed, in their rooms, since the previous status was written. (A node
    /// deleted meanwhile may still show in a pair until the leader's watch delivers the delete.)
    fn check_pairs(&mut self, old: Option<&StatusObj>, old_at: u64, new: &StatusObj) {
        let zone_of = |api: &ApiServer, n: &str| match api.get(&Key::Node(n.to_string())) {
            Some(Stored {
                obj: Obj::Node(node),
                ..
            }) => node.zone.clone(),
            _ => None,
        };
        let mut used = BTreeSet::new();
        let mut problems = Vec::new();
        for p in &new.pairs {
            if !used.insert(p.a.clone()) || !used.insert(p.b.clone()) {
                problems.push(format!("node paired twice in {}/{}", p.a, p.b));
            }
            let (za, zb) = (zone_of(&self.api, &p.a), zone_of(&self.api, &p.b));
            let wrong = |z: Option<String>, room: &str| z.is_some_and(|z| z != room);
            if wrong(za, "room-a") || wrong(zb, "room-b") {
                problems.push(format!("pair {}/{} does not span the rooms", p.a, p.b));
            }
        }
        if let Some(old) = old {
            for p in &old.pairs {
                let kept = |n: &str| self.deleted_at.get(n).is_none_or(|t| *t < old_at);
                let alive = zone_of(&self.api, &p.a).as_deref() == Some("room-a")
                    && zone_of(&self.api, &p.b).as_deref() == Some("room-b")
                    && kept(&p.a)
                    && kept(&p.b);
                if alive && !new.pairs.contains(p) {
                    problems.push(format!("stable pair {}/{} was broken", p.a, p.b));
                }
            }
        }
        for p in problems {
            self.violate("pairs-valid-and-stable", p);
        }
    }

    /// S2: the taint and the forced pod deletion only touch a node that runs no HA workload.
    pub(super) fn check_fenced(&mut self, node: &str, what: &str) {
        if let Some(i) = self.node_idx(node)
            && self.nodes[i].powered
            && self.nodes[i].workloads_running
        {
            self.violate(
                "S2-no-unsafe-taint",
                format!("{what} {node} while it still runs its HA workloads"),
            );
        }
    }

    /// S3: a node cut from the API server whose partner would vouch for it right now (the
    /// partner too has lost the API server, still runs, and sees it as its partner) must not
    /// stop. A whole-cluster API outage is also checked end to end by the `api-outage` scenario.
    pub(super) fn check_no_storm(&mut self, i: usize) {
        let room = self.nodes[i].room;
        if self.node_reaches(i, Site::Api) {
            return;
        }
        let me = self.nodes[i].name.clone();
        let partner = self.nodes[i]
            .agent
            .as_ref()
            .and_then(|a| a.partner().map(str::to_string));
        let Some(p) = partner.and_then(|p| self.node_idx(&p)) else {
            return;
        };
        let pn = &self.nodes[p];
        let timing = self.cfg.timing;
        // The partner must have been reachable for a whole probe interval (and a tick).
        let since = [
            self.healed_at.get(&ordered(room, pn.room)).copied(),
            self.nodes[i].reconnected_at,
            pn.reconnected_at,
        ]
        .into_iter()
        .flatten()
        .max();
        let reachable_long = self.nodes_connected(i, p)
            && since.is_none_or(|t| self.now >= t + ms(timing.probe_interval) + TICK_MS);
        if !pn.powered || !reachable_long {
            return;
        }
        let Some(agent) = pn.agent.as_ref() else {
            return;
        };
        let local = pn.clock.read(self.now);
        let report = agent.report(local);
        // The partner must have been willing to vouch for a whole probe interval (and a tick):
        // a partner that became willing since the last probe could not have been asked yet.
        let willing_long = agent.last_renewal().is_none_or(|r| {
            local.since(r)
                > timing.vouch_after_silence
                    + timing.probe_interval
                    + Duration::from_millis(TICK_MS)
        });
        if willing_long
            && !report.api_reachable
            && report.has_right
            && report.partner.as_deref() == Some(&me)
        {
            self.violate(
                "S3-no-storm",
                format!(
                    "{me} stopped although its partner {} would vouch for it",
                    report.node
                ),
            );
        }
    }

    /// An agent that saw the other room alive through the API server must have seen a real
    /// renewal: some agent of the other room renewed its heartbeat Lease since this agent's
    /// previous listing. A write by anyone else (the controller's fence marker on the Lease of
    /// a node that is gone) is no sign of life.
    pub(super) fn check_contact_sound(&mut self, i: usize, since: u64) {
        let room = self.nodes[i].room;
        let renewed = self.nodes.iter().filter(|n| n.room != room).any(|n| {
            self.api
                .renewed_between(&Key::AgentLease(n.name.clone()), since, self.now)
        });
        if !renewed {
            let me = self.nodes[i].name.clone();
            self.violate(
                "contact-is-a-renewal",
                format!(
                    "{me} took a change of the other room's heartbeat Leases for contact, \
                     though none of them was renewed"
                ),
            );
        }
    }

    /// kube-scheduler just bound `pod` to `node`. A node that is down, and that a leader judged
    /// Dead (remediation not paused) longer ago than a watch delay and a pass, must have been
    /// unschedulable in the scheduler's cache by then: a replacement bound there never runs.
    pub(super) fn check_bind(&mut self, pod: &str, node: &str) {
        let down = self
            .nodes
            .iter()
            .find(|n| n.name == node)
            .is_none_or(|n| !n.powered);
        let Some(since) = self.record.must_be_unschedulable_since.get(node).copied() else {
            return;
        };
        let grace = self.cfg.watch_delay_ms.1 + 2 * TICK_MS;
        if down && self.now >= since + grace {
            self.violate(
                "replacement-on-dead-node",
                format!(
                    "{pod} bound to {node}, which is down and was judged dead {} ms ago",
                    self.now - since
                ),
            );
        }
    }

    /// A Dead verdict must mean that, after the heartbeat the observer last saw, the node wrote
    /// no heartbeat for a full lease duration. The observer may judge on a view a watch delay
    /// old, so a renewal that came back after the gap does not make the verdict wrong.
    pub(super) fn check_dead_verdict(
        &mut self,
        node: &str,
        verdict: &NodeVerdict,
        obs: &NodeObservation,
    ) {
        let (key, seen, lease_ms) = match verdict {
            NodeVerdict::Dead {
                fence_deadline: Some(_),
            } => (
                Key::AgentLease(node.to_string()),
                &obs.agent,
                ms(self.cfg.timing.agent_lease),
            ),
            _ => (
                Key::KubeletLease(node.to_string()),
                &obs.kubelet,
                ms(self.cfg.timing.kubelet_lease),
            ),
        };
        let Some(rv) = seen
            .as_ref()
            .and_then(|h| h.fingerprint.parse::<u64>().ok())
        else {
            return;
        };
        let Some((written, next)) = self.api.write_and_next(&key, rv) else {
            return;
        };
        let gap = next.unwrap_or(self.now).saturating_sub(written);
        if gap < lease_ms {
            self.violate(
                "dead-verdict-sound",
                format!(
                    "{node} judged dead, but after the heartbeat seen (written at {written} ms) the next came {gap} ms later"
                ),
            );
        }
    }

    /// At no instant do two replicas both believe they lead.
    pub(super) fn check_single_leader(&mut self) {
        let leaders: Vec<String> = self
            .replicas
            .iter()
            .filter(|r| r.up && r.elector.is_leader(r.clock.read(self.now)))
            .map(|r| r.name.clone())
            .collect();
        if leaders.len() > 1 {
            self.violate(
                "single-leader",
                format!("{} lead at once", leaders.join(" and ")),
            );
        }
    }

    /// S1 for applications: at no instant do two copies of one HA app run. (A copy left
    /// running after its pod was force-deleted is what S2 refuses.)
    pub(super) fn check_single_copy(&mut self) {
        let mut copies: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, s) in self.api.objects() {
            if let (Key::Pod(_), Obj::Pod(p)) = (k, &s.obj)
                && !p.terminating
                && let Some(n) = self.nodes.iter().find(|n| n.name == p.node)
                && n.powered
                && n.workloads_running
            {
                copies
                    .entry(p.app.clone())
                    .or_default()
                    .push(p.node.clone());
            }
        }
        let mut started = Vec::new();
        let mut bad = Vec::new();
        for (app, nodes) in &copies {
            if nodes.len() > 1 {
                bad.push(format!("{app} runs on {}", nodes.join(" and ")));
            }
            if let Some(n) = nodes.first()
                && self.running.get(app) != Some(n)
            {
                started.push((app.clone(), n.clone()));
            }
        }
        self.running.retain(|app, _| copies.contains_key(app));
        for (app, node) in started {
            self.running.insert(app.clone(), node.clone());
            self.record
                .app_started_at
                .entry(app.clone())
                .or_default()
                .push(self.now);
            self.log(&format!("node/{node}"), format!("{app} running"));
        }
        for b in bad {
            self.violate("S1-single-copy", b);
        }
    }

    /// Checks a scripted scenario's expectations at the end of the run.
    pub fn check_expectations(&mut self, expectations: &[Expectation]) {
        let within = |times: &BTreeMap<String, Vec<u64>>, node: &str, after: u64, limit: u64| {
            first_after(times, node, after).is_some_and(|t| t - after <= limit)
        };
        for e in expectations {
            let unmet = match e {
                Expectation::DeadVerdictWithin {
                    node,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.dead_at, node, *after_ms, *within_ms)).then(|| {
                    format!("{node} not judged dead within {within_ms} ms of {after_ms} ms")
                }),
                Expectation::HealthyWithin {
                    node,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.healthy_at, node, *after_ms, *within_ms)).then(|| {
                    format!("{node} not judged healthy within {within_ms} ms of {after_ms} ms")
                }),
                Expectation::TaintWithin {
                    node,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.taint_at, node, *after_ms, *within_ms))
                    .then(|| format!("{node} not tainted within {within_ms} ms of {after_ms} ms")),
                Expectation::PodsReleasedWithin {
                    node,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.released_at, node, *after_ms, *within_ms)).then(|| {
                    format!("pods of {node} not released within {within_ms} ms of {after_ms} ms")
                }),
                Expectation::RunsAgainWithin {
                    app,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.app_started_at, app, *after_ms + 1, *within_ms))
                    .then(|| {
                        format!("{app} not running again within {within_ms} ms of {after_ms} ms")
                    }),
                Expectation::UntaintWithin {
                    node,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.untaint_at, node, *after_ms, *within_ms)).then(|| {
                    format!("{node} not untainted within {within_ms} ms of {after_ms} ms")
                }),
                Expectation::PhaseWithin {
                    node,
                    phase,
                    after_ms,
                    within_ms,
                } => (!within(
                    &self.record.phase_at,
                    &format!("{node}/{phase}"),
                    *after_ms,
                    *within_ms,
                ))
                .then(|| format!("{node} not {phase} within {within_ms} ms of {after_ms} ms")),
                Expectation::AgentRebootWithin {
                    node,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.agent_rebooted, node, *after_ms, *within_ms)).then(
                    || {
                        format!(
                            "{node} not rebooted by its agent within {within_ms} ms of {after_ms} ms"
                        )
                    },
                ),
                Expectation::NoDeadVerdict => (!self.record.dead_at.is_empty()).then(|| {
                    format!(
                        "nodes judged dead: {}",
                        self.record
                            .dead_at
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }),
                Expectation::NoTaint => (!self.record.taint_at.is_empty()).then(|| {
                    format!(
                        "nodes tainted: {}",
                        self.record
                            .taint_at
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }),
                Expectation::NoReboot => (!self.record.watchdog_fired.is_empty()
                    || !self.record.right_lost.is_empty())
                .then(|| {
                    format!(
                        "{} watchdog reset(s), {} agent(s) stopped",
                        self.record.watchdog_fired.len(),
                        self.record.right_lost.len()
                    )
                }),
                Expectation::RoomStops {
                    room,
                    after_ms,
                    within_ms,
                } => {
                    let names: Vec<String> = self
                        .nodes
                        .iter()
                        .filter(|n| n.room == *room)
                        .map(|n| n.name.clone())
                        .collect();
                    let late: Vec<String> = names
                        .into_iter()
                        .filter(|n| {
                            !self.record.right_lost.iter().any(|(t, m)| {
                                m == n && *t >= *after_ms && *t - after_ms <= *within_ms
                            }) && !self.record.powered_off_before(n, after_ms + within_ms)
                        })
                        .collect();
                    (!late.is_empty()).then(|| {
                        format!(
                            "{} did not stop within {within_ms} ms of {after_ms} ms",
                            late.join(", ")
                        )
                    })
                }
                Expectation::RoomRuns(room) => {
                    let stopped: Vec<String> = self
                        .record
                        .right_lost
                        .iter()
                        .filter(|(_, n)| self.nodes.iter().any(|x| &x.name == n && x.room == *room))
                        .map(|(t, n)| format!("{n} at {t} ms"))
                        .collect();
                    (!stopped.is_empty())
                        .then(|| format!("{} stopped: {}", room.name(), stopped.join(", ")))
                }
                Expectation::PairsAtEnd(n) => {
                    let got = self.final_pairs().len();
                    (got != *n).then(|| format!("{got} pairs at the end, expected {n}"))
                }
            };
            if let Some(detail) = unmet {
                self.violate("expectation", detail);
            }
        }
    }

    /// The real time by which every node of `room` had lost its right to run after `after`, if
    /// all of them did.
    pub fn room_stopped_at(&self, room: Site, after: u64) -> Option<u64> {
        let mut last = None;
        for n in self.nodes.iter().filter(|n| n.room == room) {
            let t = self
                .record
                .right_lost
                .iter()
                .find(|(t, m)| *m == n.name && *t >= after)
                .map(|(t, _)| *t)?;
            last = Some(last.map_or(t, |l: u64| l.max(t)));
        }
        last
    }

    /// The pairs in the status as the API server holds it.
    pub fn final_pairs(&self) -> Vec<Pair> {
        match self.api.get(&Key::Status) {
            Some(Stored {
                obj: Obj::Status(s),
                ..
            }) => s.pairs.clone(),
            _ => Vec::new(),
        }
    }
}

/// The first recorded time for `node` at or after `after`.
pub fn first_after(times: &BTreeMap<String, Vec<u64>>, node: &str, after: u64) -> Option<u64> {
    times.get(node)?.iter().copied().find(|t| *t >= after)
}
