//! The guard in each consumer pod: its shell around the real [`VolumeGuard`] core. It watches
//! its volume's Lease (late, and only while its node reaches the API server), writes with the
//! last-seen resourceVersion (answers late or lost), tells its node's agent the fence deadline
//! ([`NodeDeadlines`], on the node's clock), and starts and stops its app only as the core says.
//! A frozen guard (SIGSTOP) does nothing at all while its app writes on.

use super::api::{Key, Obj, Precondition, Stored, VolumeLeaseObj};
use super::cluster::{Cluster, REBOOT_MS};
use super::scenario::Site;
use super::volume::{APP_STOP_MS, Device, Mount, to_core};
use node_health::MonoTime;
use node_health::volume::{
    GuardAction, VolumeGuard, VolumeLease, WriteId, WriteOutcome, acquire_keeps_preferred,
};
use rand::Rng;
use std::collections::VecDeque;

/// The app under the guard.
#[derive(Debug)]
pub(super) enum App {
    Stopped,
    /// Mounted and writing.
    Running {
        mount: Mount,
    },
    /// Told to stop: still mounted (and possibly flushing) until `until` (real time).
    Stopping {
        until: u64,
    },
}

/// A running guard process and its app.
#[derive(Debug)]
pub(super) struct GuardProc {
    pub guard: VolumeGuard,
    /// The random token this process registered its deadline with.
    token: [u8; 32],
    /// Frozen (SIGSTOP) until this real time.
    pub frozen_until: u64,
    pub app: App,
    /// The app stopped while the guard could not hear it (frozen): told at the next step.
    stopped_unreported: bool,
    /// The agent acknowledged the last arm.
    armed: bool,
    watching: bool,
    watch: VecDeque<(u64, Option<VolumeLease>)>,
    last_delivery: u64,
    answers: VecDeque<(u64, WriteId, WriteOutcome)>,
    reads: VecDeque<(u64, Option<VolumeLease>)>,
}

impl GuardProc {
    /// Whether the app has the device mounted (and so may write).
    pub fn writing(&self) -> bool {
        !matches!(self.app, App::Stopped)
    }

    /// A consumer process without the twosite guard at work (the alternative policies'
    /// consumers, [`super::lock_loop`]): only its app and its freeze are used.
    pub(super) fn bare(uid: String, timing: node_health::VolumeTiming) -> Self {
        Self::started(VolumeGuard::new_unchecked(uid, timing), [0; 32])
    }

    /// A guard process just started, its app stopped.
    fn started(guard: VolumeGuard, token: [u8; 32]) -> Self {
        GuardProc {
            guard,
            token,
            frozen_until: 0,
            app: App::Stopped,
            stopped_unreported: false,
            armed: false,
            watching: false,
            watch: VecDeque::new(),
            last_delivery: 0,
            answers: VecDeque::new(),
            reads: VecDeque::new(),
        }
    }

    /// The app writes `record` for a client: only while running (a stopping app refuses).
    pub fn app_write(&mut self, device: &mut Device, record: u64) -> Option<()> {
        match &mut self.app {
            App::Running { mount } => {
                device.write(mount, record);
                Some(())
            }
            _ => None,
        }
    }
}

impl Cluster {
    /// A VolumeLease write reaches every guard watching it, one watch delay later, in order.
    pub(super) fn guard_watch(&mut self, key: &Key, value: Option<&Stored>) {
        let Key::VolumeLease(name) = key else {
            return;
        };
        let lease = value.and_then(to_core);
        let (lo, hi) = self.cfg.watch_delay_ms;
        let now = self.now;
        for v in self.volumes.iter_mut().filter(|v| &v.name == name) {
            for c in &mut v.consumers {
                if let Some(p) = c.proc.as_mut().filter(|p| p.watching) {
                    let at = (now + self.vol_rng.random_range(lo..=hi)).max(p.last_delivery);
                    p.last_delivery = at;
                    p.watch.push_back((at, lease.clone()));
                }
            }
        }
    }

    pub(super) fn step_guards(&mut self) {
        for v in 0..self.volumes.len() {
            for c in 0..self.volumes[v].consumers.len() {
                self.step_guard(v, c);
            }
            if self.volumes[v].client.is_some() {
                self.step_client(v);
            }
        }
    }

    fn start_guard(&mut self, v: usize, c: usize) {
        let uid = self.volumes[v].consumers[c].uid.clone();
        let timing = self.cfg.volume_timing;
        let guard = if self.cfg.unchecked_volume_timing {
            VolumeGuard::new_unchecked(uid.clone(), timing)
        } else {
            match VolumeGuard::new(uid.clone(), timing) {
                Ok(g) => g,
                Err(e) => {
                    self.violate("configuration", format!("guard {uid}: {e}"));
                    self.volumes[v].consumers[c].start_at = None;
                    return;
                }
            }
        };
        let mut token = [0u8; 32];
        self.vol_rng.fill(&mut token[..]);
        self.volumes[v].consumers[c].proc = Some(GuardProc::started(guard, token));
    }

    fn step_guard(&mut self, v: usize, c: usize) {
        let node = self.volumes[v].consumers[c].node.clone();
        let Some(i) = self.node_idx(&node).filter(|i| self.nodes[*i].powered) else {
            return;
        };
        if self.volumes[v].consumers[c].proc.is_none() {
            match self.volumes[v].consumers[c].start_at {
                Some(t) if t <= self.now => {
                    self.volumes[v].consumers[c].start_at = None;
                    self.start_guard(v, c);
                }
                _ => return,
            }
        }
        let now = self.now;
        let reach = self.node_reaches(i, Site::Api);
        let local = self.nodes[i].clock.read(now);
        let name = self.volumes[v].name.clone();
        let key = Key::VolumeLease(name.clone());
        let relist = self.api.get(&key).and_then(to_core);
        let (lo, hi) = self.cfg.watch_delay_ms;
        let delay = self.vol_rng.random_range(lo..=hi);
        let Some(p) = self.volumes[v].consumers[c].proc.as_mut() else {
            return;
        };
        // The app finishes stopping on its own time, frozen guard or not.
        if let App::Stopping { until, .. } = p.app
            && until <= now
        {
            p.app = App::Stopped;
            p.stopped_unreported = true;
        }
        // The watch: dropped with the link, re-listed when it comes back.
        if p.watching && !reach {
            p.watching = false;
            p.watch.clear();
        } else if !p.watching && reach {
            p.watching = true;
            let at = (now + delay).max(p.last_delivery);
            p.last_delivery = at;
            p.watch.push_back((at, relist));
        }
        if !reach {
            // The connection is gone: answers and reads in flight with it.
            p.answers.clear();
            p.reads.clear();
        }
        if p.frozen_until > now {
            return;
        }
        if std::mem::take(&mut p.stopped_unreported) {
            p.guard.app_stopped();
        }
        while p.watch.front().is_some_and(|(at, _)| *at <= now)
            && let Some((_, lease)) = p.watch.pop_front()
        {
            p.guard.observe(lease, local);
        }
        while p.reads.front().is_some_and(|(at, _)| *at <= now)
            && let Some((_, lease)) = p.reads.pop_front()
        {
            p.guard.observe(lease, local);
        }
        while p.answers.front().is_some_and(|(at, _, _)| *at <= now)
            && let Some((_, id, outcome)) = p.answers.pop_front()
        {
            p.guard.write_result(id, outcome, local);
        }
        let actions = p.guard.step(local);
        for a in actions {
            self.guard_action(v, c, i, a, local, reach);
        }
    }

    fn guard_action(
        &mut self,
        v: usize,
        c: usize,
        i: usize,
        action: GuardAction,
        local: MonoTime,
        reach: bool,
    ) {
        let now = self.now;
        let uid = self.volumes[v].consumers[c].uid.clone();
        let actor = format!("guard/{}", self.volumes[v].consumers[c].pod);
        let (lo, hi) = self.cfg.response_delay_ms;
        let delay = self.vol_rng.random_range(lo..=hi);
        let key = Key::VolumeLease(self.volumes[v].name.clone());
        match action {
            GuardAction::Refresh => {
                if reach {
                    let lease = self.api.get(&key).and_then(to_core);
                    if let Some(p) = self.volumes[v].consumers[c].proc.as_mut() {
                        p.reads.push_back((now + delay, lease));
                    }
                }
            }
            GuardAction::Acquire {
                id,
                ref expected_rv,
                epoch,
            }
            | GuardAction::Renew {
                id,
                ref expected_rv,
                epoch,
            }
            | GuardAction::Release {
                id,
                ref expected_rv,
                epoch,
            } => {
                if !reach {
                    // Never reached the server: the guard times the write out.
                    return;
                }
                let outcome = self.guard_write(&key, &uid, &action, expected_rv, epoch);
                if let Some(p) = self.volumes[v].consumers[c].proc.as_mut() {
                    p.answers.push_back((now + delay, id, outcome));
                }
            }
            GuardAction::ArmFence { at } => {
                let fence_delay = self.cfg.volume_timing.fence_delay;
                let watchdog = self.cfg.timing.watchdog;
                let n = &mut self.nodes[i];
                let enforceable = n.last_feed.is_some()
                    && !n.watchdog_broken
                    && n.agent.as_ref().is_some_and(|a| !a.is_watchdog_failed());
                let Some(p) = self.volumes[v].consumers[c].proc.as_mut() else {
                    return;
                };
                let result = if n.agent.is_some() {
                    n.deadlines
                        .arm(
                            &uid,
                            &p.token,
                            at,
                            fence_delay,
                            local,
                            watchdog,
                            enforceable,
                        )
                        .map_err(|e| e.to_string())
                } else {
                    Err("no agent answers on the node".to_string())
                };
                p.armed = result.is_ok();
                if let Err(e) = result
                    && p.writing()
                {
                    self.log(
                        &actor,
                        format!("the agent refused to move the deadline: {e}"),
                    );
                }
            }
            GuardAction::DisarmFence => {
                let n = &mut self.nodes[i];
                if let Some(p) = self.volumes[v].consumers[c].proc.as_mut() {
                    p.armed = false;
                    if n.agent.is_some() {
                        let _ = n.deadlines.disarm(&uid, &p.token);
                    }
                }
            }
            GuardAction::StartApp { epoch } => {
                let vol = &mut self.volumes[v];
                let Some(p) = vol.consumers[c].proc.as_mut() else {
                    return;
                };
                if !p.armed {
                    // The app never starts before the agent acknowledged the deadline.
                    p.guard.start_refused(local);
                    return;
                }
                p.app = App::Running {
                    mount: vol.device.mount(),
                };
                let name = vol.name.clone();
                self.record
                    .volumes
                    .app_started
                    .push((now, name.clone(), uid.clone()));
                self.log(
                    &actor,
                    format!("{name} mounted, app started (epoch {epoch})"),
                );
            }
            GuardAction::StopApp => {
                if let Some(p) = self.volumes[v].consumers[c].proc.as_mut() {
                    let app = std::mem::replace(&mut p.app, App::Stopped);
                    p.app = match app {
                        App::Running { .. } => App::Stopping {
                            until: now + APP_STOP_MS,
                        },
                        other => other,
                    };
                    self.log(
                        &actor,
                        "demoting: app stopping, then sync and unmount".into(),
                    );
                }
            }
            GuardAction::RequestFence => {
                // The agent resets the node at once (sysrq), as it would at the deadline.
                if self.nodes[i].agent.is_some() {
                    let node = self.nodes[i].name.clone();
                    self.log(
                        &format!("node/{node}"),
                        format!("agent fenced the node: {uid}'s app overran its deadline"),
                    );
                    self.record.volumes.fenced_by_deadline.push((now, node));
                    self.reset_node(i, "its agent fenced it (a guard's deadline)");
                }
            }
        }
    }

    /// One guard write as the API server applies it: compare-and-swap on the resourceVersion.
    fn guard_write(
        &mut self,
        key: &Key,
        uid: &str,
        action: &GuardAction,
        expected_rv: &str,
        epoch: u64,
    ) -> WriteOutcome {
        let Some(stored) = self.api.get(key).cloned() else {
            return WriteOutcome::Conflict;
        };
        let read = to_core(&stored);
        let Stored {
            rv,
            obj: Obj::VolumeLease(mut l),
        } = stored
        else {
            return WriteOutcome::Conflict;
        };
        let Ok(want) = expected_rv.parse::<u64>() else {
            return WriteOutcome::Conflict;
        };
        if want != rv {
            return WriteOutcome::Conflict;
        }
        // The shipped rule for the preferred holder on an acquire.
        let keeps_preferred = read.is_some_and(|r| acquire_keeps_preferred(&r, uid));
        match action {
            GuardAction::Acquire { .. } => {
                if !keeps_preferred {
                    l.preferred = None;
                }
                l = VolumeLeaseObj {
                    holder: Some(uid.to_string()),
                    epoch,
                    duration_ms: super::cluster::ms(self.cfg.volume_timing.duration),
                    released: false,
                    handover: None,
                    ..l
                };
            }
            GuardAction::Release { .. } => {
                l.holder = None;
                l.released = true;
            }
            _ => {}
        }
        l.renew_seq = self.next_seq();
        match self.write(
            key.clone(),
            Precondition::ResourceVersion(rv),
            Obj::VolumeLease(l),
        ) {
            Ok(stored) => to_core(&stored).map_or(WriteOutcome::Failed, WriteOutcome::Ok),
            Err(()) => WriteOutcome::Conflict,
        }
    }

    /// A reset of node `i` (watchdog, or the agent's own): everything on it stops now.
    pub(super) fn reset_node(&mut self, i: usize, by: &'static str) {
        self.power_off(i);
        self.nodes[i].reboot_at = Some(self.now + REBOOT_MS);
        self.nodes[i].reset_by = by;
    }
}
