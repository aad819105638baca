//! The volume consumers of the alternative policies ([`super::policy`]).
//!
//! [`Policy::ConfigMapLock`]: the hand-made active/standby loop of the vendor white papers
//! (`/work/shared/design/prior-art.md`, "The hand-made active/standby pods", version 2): every
//! 5 s each consumer GETs a ConfigMap holding `holder` and `renewTime` (epoch seconds, `date
//! +%s`); it creates it when absent (a POST, no resourceVersion), renews it when it holds it,
//! and takes it over with a plain write (no resourceVersion check) when `now - renewTime > 25`;
//! it mounts and starts its app while it believes it holds the lock, and stops it when it reads
//! another holder. It never fences: a loop that is frozen, or cut from the API server (its
//! `curl` fails and it keeps its state), leaves its app writing. The API calls answer at once
//! (their delays are small beside the 5 s period) and wall clocks are taken as synchronised.
//!
//! [`Policy::K8sAlone`] and [`Policy::NhcSnr`]: no standby mechanism; consumer 0 is the one
//! writer, on its node, and comes back only when that node does.

use super::cluster::Cluster;
use super::guard::{App, GuardProc};
use super::policy::Policy;
use super::scenario::Site;
use super::volume::APP_STOP_MS;

/// The loop's period and its takeover threshold (prior-art.md, version 2 of the lock).
const POLL_MS: u64 = 5_000;
const TAKEOVER_AFTER_S: u64 = 25;

/// The lock ConfigMap of one volume.
#[derive(Debug, Default, Clone)]
pub(super) struct CmLock {
    /// The holding consumer's UID (the loop writes `$HOSTNAME`: one pod per consumer).
    pub holder: Option<String>,
    /// `renewTime`, in whole seconds of the writer's wall clock.
    pub renew_s: u64,
    /// Each consumer process's next poll (real time), by UID.
    pub next_poll: std::collections::BTreeMap<String, u64>,
}

impl Cluster {
    /// The consumer an alternative policy takes for the holder (what a holder fault hits).
    pub(super) fn alt_holder_of(&self, volume: &str) -> Option<(usize, usize)> {
        let v = self.volumes.iter().position(|v| v.name == volume)?;
        if self.cfg.policy != Policy::ConfigMapLock {
            return (!self.volumes[v].consumers.is_empty()).then_some((v, 0));
        }
        let holder = self.alt.locks.get(volume)?.holder.clone()?;
        let c = self.volumes[v]
            .consumers
            .iter()
            .position(|c| c.uid == holder)?;
        Some((v, c))
    }

    /// Every consumer of every volume, for one step.
    pub(super) fn step_lock_consumers(&mut self) {
        for v in 0..self.volumes.len() {
            for c in 0..self.volumes[v].consumers.len() {
                self.step_lock_consumer(v, c);
            }
        }
    }

    fn step_lock_consumer(&mut self, v: usize, c: usize) {
        let now = self.now;
        let node = self.volumes[v].consumers[c].node.clone();
        let Some(i) = self.node_idx(&node).filter(|i| self.nodes[*i].powered) else {
            return;
        };
        let uid = self.volumes[v].consumers[c].uid.clone();
        if self.volumes[v].consumers[c].proc.is_none() {
            match self.volumes[v].consumers[c].start_at {
                Some(t) if t <= now => {
                    self.volumes[v].consumers[c].start_at = None;
                    self.volumes[v].consumers[c].proc =
                        Some(GuardProc::bare(uid.clone(), self.cfg.volume_timing));
                }
                _ => return,
            }
        }
        let name = self.volumes[v].name.clone();
        let Some(p) = self.volumes[v].consumers[c].proc.as_mut() else {
            return;
        };
        if let App::Stopping { until } = p.app
            && until <= now
        {
            p.app = App::Stopped;
        }
        if p.frozen_until > now {
            return;
        }
        let reach = self.node_reaches(i, Site::Api);
        let active = if self.cfg.policy == Policy::ConfigMapLock {
            let lock = self.alt.locks.entry(name.clone()).or_default();
            let next = lock.next_poll.entry(uid.clone()).or_insert(now);
            if now < *next {
                return;
            }
            *next = now + POLL_MS;
            if !reach {
                // curl fails: the loop keeps its state, its app writes on.
                return;
            }
            let now_s = now / 1000;
            let mine = lock.holder.as_deref() == Some(uid.as_str());
            let stale = now_s.saturating_sub(lock.renew_s) > TAKEOVER_AFTER_S;
            if lock.holder.is_none() || mine || stale {
                let took = !mine;
                lock.holder = Some(uid.clone());
                lock.renew_s = now_s;
                if took {
                    self.log(
                        &format!("lock/{uid}"),
                        format!("{name}'s ConfigMap lock taken (no resourceVersion check)"),
                    );
                }
                true
            } else {
                false
            }
        } else {
            c == 0
        };
        let vol = &mut self.volumes[v];
        let Some(p) = vol.consumers[c].proc.as_mut() else {
            return;
        };
        match (&p.app, active) {
            (App::Stopped, true) => {
                p.app = App::Running {
                    mount: vol.device.mount(),
                };
                self.record
                    .volumes
                    .app_started
                    .push((now, name.clone(), uid.clone()));
                self.log(
                    &format!("lock/{uid}"),
                    format!("{name} mounted on {node}, app started"),
                );
            }
            (App::Running { .. }, false) => {
                p.app = App::Stopping {
                    until: now + APP_STOP_MS,
                };
                self.log(
                    &format!("lock/{uid}"),
                    format!("another holder in {name}'s lock: app stopping, unmount"),
                );
            }
            _ => {}
        }
    }
}
