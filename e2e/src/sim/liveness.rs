//! Liveness in the random schedules: safety alone passes a twosite that never fails over.
//!
//! Whenever a node loses power while everything else is healthy (every other node powered,
//! connected, running its agent and not fenced — a node back without a reboot stays fenced until
//! an operator looks, and its witness cover can hold the other room's failover —, no link cut,
//! the witness up if there is one, the node's own agent and watchdog sound) and nothing else goes wrong for the failover target, the HA workloads it ran must run
//! again on a live node within [`FAILOVER_TARGET_MS`]. Whenever a fenced node is powered back
//! on into such a calm cluster, the out-of-service taint must come off within
//! [`UNTAINT_TARGET_MS`]. A miss is a violation like any other. The times measured are samples
//! for the distribution `--schedules` prints.

use super::api::{Key, Obj, Stored};
use super::cluster::Cluster;
use super::report::Violation;
use super::scenario::{FAILOVER_TARGET_MS, Fault, Scenario, Site};
use std::collections::BTreeMap;

/// A clean node back from a power loss loses the taint within this.
pub const UNTAINT_TARGET_MS: u64 = 10_000;
/// Nothing else may have happened this long before the loss (a storm settling, a watch catching
/// up, a leader's lease).
const QUIET_BEFORE_MS: u64 = 60_000;

/// What the world was like when a node lost power or came back.
#[derive(Debug, Clone)]
pub(super) struct Probe {
    pub at: u64,
    pub node: String,
    /// The HA apps running on the node at that instant (for a loss).
    pub apps: Vec<String>,
    /// Everything but this node was healthy, and this node's agent and watchdog sound.
    pub calm: bool,
    /// The node carried the out-of-service taint (for a return).
    pub tainted: bool,
}

impl Cluster {
    /// Everything but node `i` is healthy right now, and `i`'s own agent and watchdog are.
    pub(super) fn calm_but(&self, i: usize) -> bool {
        let others = self.nodes.iter().enumerate().all(|(j, n)| {
            j == i
                || (n.powered
                    && !n.isolated
                    && n.agent.is_some()
                    && !matches!(
                        self.api.get(&Key::Node(n.name.clone())),
                        Some(Stored { obj: Obj::Node(o), .. }) if o.out_of_service
                    ))
        });
        let me = &self.nodes[i];
        others
            && self.cut.is_empty()
            && self.witness.as_ref().is_none_or(|w| w.up)
            && !me.watchdog_broken
            && !me.isolated
            && self.replicas.iter().all(|r| r.up || r.host == me.name)
    }

    /// The liveness promises of a random schedule: violations for the misses, and the samples.
    pub(super) fn check_liveness(&mut self, scenario: &Scenario) -> BTreeMap<String, Vec<u64>> {
        let mut samples: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        // Faults other than the probe's own node coming back.
        let quiet = |node: &str, from: u64, to: u64| {
            !scenario.faults.iter().any(|f| {
                (from..=to).contains(&f.at_ms)
                    && !matches!(&f.fault, Fault::PowerOn(n) | Fault::PowerOff(n) if n == node)
            })
        };
        let mut missed = Vec::new();
        for p in self.record.lost.clone() {
            let end = p.at + FAILOVER_TARGET_MS + 5_000;
            if !p.calm
                || p.apps.is_empty()
                || end > scenario.duration_ms
                || !quiet(&p.node, p.at.saturating_sub(QUIET_BEFORE_MS), end)
            {
                continue;
            }
            for app in &p.apps {
                let again = self
                    .record
                    .app_started_at
                    .get(app)
                    .and_then(|ts| ts.iter().find(|t| **t > p.at))
                    .map(|t| t - p.at);
                match again {
                    Some(d) if d <= FAILOVER_TARGET_MS => {
                        samples.entry("failover".into()).or_default().push(d);
                    }
                    _ => missed.push(Violation {
                        invariant: "liveness-failover".into(),
                        t_ms: p.at,
                        detail: format!(
                            "{app} of {} not running again within {FAILOVER_TARGET_MS} ms \
                             of the power loss at {} ms",
                            p.node, p.at
                        ),
                    }),
                }
            }
        }
        for p in self.record.returned.clone() {
            let end = p.at + UNTAINT_TARGET_MS + 2_000;
            if !p.calm
                || !p.tainted
                || end > scenario.duration_ms
                || !quiet(&p.node, p.at.saturating_sub(QUIET_BEFORE_MS), end)
            {
                continue;
            }
            let off = self
                .record
                .untaint_at
                .get(&p.node)
                .and_then(|ts| ts.iter().find(|t| **t >= p.at))
                .map(|t| t - p.at);
            match off {
                Some(d) if d <= UNTAINT_TARGET_MS => {
                    samples.entry("untaint".into()).or_default().push(d);
                }
                _ => missed.push(Violation {
                    invariant: "liveness-untaint".into(),
                    t_ms: p.at,
                    detail: format!(
                        "{} back at {} ms, clean, still tainted {UNTAINT_TARGET_MS} ms later",
                        p.node, p.at
                    ),
                }),
            }
        }
        // With a witness: how long after the rooms were cut apart one was granted, while the
        // cut lasted.
        let rooms_cut = |f: &Fault| {
            matches!(
                f,
                Fault::Cut(Site::RoomA, Site::RoomB) | Fault::Cut(Site::RoomB, Site::RoomA)
            )
        };
        let rooms_healed = |f: &Fault| {
            matches!(
                f,
                Fault::Heal(Site::RoomA, Site::RoomB) | Fault::Heal(Site::RoomB, Site::RoomA)
            )
        };
        for f in scenario.faults.iter().filter(|f| rooms_cut(&f.fault)) {
            let healed = scenario
                .faults
                .iter()
                .filter(|h| h.at_ms > f.at_ms && rooms_healed(&h.fault))
                .map(|h| h.at_ms)
                .min()
                .unwrap_or(u64::MAX);
            if let Some((t, _, _)) = self
                .record
                .witness_grants
                .iter()
                .find(|(t, _, _)| *t >= f.at_ms && *t < healed)
            {
                samples.entry("grant".into()).or_default().push(t - f.at_ms);
            }
        }
        self.violations.extend(missed);
        samples
    }
}

/// p50, p99 and max of `v` (nearest rank), or `None` when empty.
pub fn percentiles(v: &mut [u64]) -> Option<(u64, u64, u64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let rank = |p: usize| v[(v.len() * p).div_ceil(100).clamp(1, v.len()) - 1];
    Some((rank(50), rank(99), v[v.len() - 1]))
}

#[cfg(test)]
mod tests {
    use super::percentiles;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentiles(&mut []), None);
        assert_eq!(percentiles(&mut [7]), Some((7, 7, 7)));
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentiles(&mut v), Some((50, 99, 100)));
    }
}
