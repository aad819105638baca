//! The agent's decision loop: ask [`AgentCore`] what to do now, then do it — stop the HA
//! workloads first when the right to run is lost, arm the watchdog when the core first arms,
//! and feed it only when the core says so. Renewals and probes report into the same core from
//! their own tasks; every decision stays in the core. With a [`StateRecorder`] the loop also
//! saves what the next agent process of this boot inherits, whenever it changes.
//!
//! [`AgentCore`]: crate::AgentCore

use super::SharedCore;
use super::error::report;
use super::guard_socket::{DeadlineStore, log_overdue};
use super::state::StateRecorder;
use super::stopper::WorkloadStopper;
use super::watchdog::Watchdog;
use crate::agent::AgentStep;
use crate::time::Clock;
use crate::volume::node_deadline::DeadlineEnforcer;
use std::sync::Arc;
use std::time::Duration;

/// How often the loop asks the core (well under the feed interval).
pub const TICK: Duration = Duration::from_millis(200);

/// The node agent's loop over its core, watchdog and workload stopper.
pub struct NodeAgent<W, S> {
    core: SharedCore,
    clock: Arc<dyn Clock + Send + Sync>,
    watchdog: W,
    stopper: S,
    state: Option<StateRecorder>,
    /// The volume guards' deadlines on this node: while one could be overrun, no feed.
    deadlines: Option<DeadlineStore>,
    /// The core's rule for applying them to each step.
    enforcer: DeadlineEnforcer,
}

impl<W: Watchdog, S: WorkloadStopper> NodeAgent<W, S> {
    pub fn new(
        core: SharedCore,
        clock: Arc<dyn Clock + Send + Sync>,
        watchdog: W,
        stopper: S,
    ) -> Self {
        NodeAgent {
            core,
            clock,
            watchdog,
            stopper,
            state: None,
            deadlines: None,
            enforcer: DeadlineEnforcer::default(),
        }
    }

    /// Enforces the volume guards' deadlines of this node (see
    /// [`crate::volume::node_deadline`]).
    pub fn with_deadlines(mut self, deadlines: DeadlineStore) -> Self {
        self.deadlines = Some(deadlines);
        self
    }

    /// Saves the core's state for the next agent process of this boot whenever it changes.
    pub fn with_state(mut self, recorder: StateRecorder) -> Self {
        self.state = Some(recorder);
        self
    }

    pub fn core(&self) -> &SharedCore {
        &self.core
    }

    pub fn watchdog(&self) -> &W {
        &self.watchdog
    }

    pub fn stopper(&self) -> &S {
        &self.stopper
    }

    /// One step: the core decides at the current time; the loop stops, arms and feeds as told.
    pub async fn tick(&mut self) -> AgentStep {
        let now = self.clock.now();
        let (mut step, watchdog_timeout) = {
            let mut core = self.core.lock();
            (core.tick(now), core.timing().watchdog)
        };
        if let Some(deadlines) = &self.deadlines {
            let check = deadlines.check(now, watchdog_timeout);
            // The core's right to run is necessary, not sufficient: a guard's app that may
            // outlive its deadline keeps the feeds back, so the watchdog fences in time.
            if self.enforcer.apply(&check, &mut step) {
                log_overdue(&check);
            }
        }
        // Before acting: a loss is on file before the stop begins (which may outlive us).
        self.save_state();
        if step.stop_workloads {
            if step.lost.is_some() {
                tracing::error!(
                    reason = ?step.lost,
                    "lost the right to run: stopping HA workloads; the watchdog is no longer fed \
                     and will reboot the node"
                );
            }
            self.stopper.stop().await;
        }
        if step.reboot {
            tracing::error!("rebooting the node directly");
            if let Err(err) = self.watchdog.reboot() {
                tracing::error!(error = %report(&err), "could not reboot the node");
            }
        }
        if step.armed {
            tracing::info!("right to run gained (or resumed): arming the watchdog");
            if let Err(err) = self.watchdog.arm() {
                self.watchdog_failed("could not arm the watchdog", &err);
            }
        }
        if step.feed
            && let Err(err) = self.watchdog.feed()
        {
            self.watchdog_failed("could not feed the watchdog", &err);
        }
        // After acting: a watchdog that just failed.
        self.save_state();
        step
    }

    fn save_state(&mut self) {
        if let Some(recorder) = self.state.as_mut() {
            let handover = self.core.lock().handover();
            recorder.record(handover);
        }
    }

    /// Tells the core, which reports it in the heartbeat and reboots directly on loss.
    fn watchdog_failed(&self, what: &str, err: &super::error::Error) {
        let mut core = self.core.lock();
        if !core.is_watchdog_failed() {
            tracing::error!(
                error = %report(err),
                "{what}: reporting the watchdog as failed; the node reboots itself directly if \
                 it loses the right to run"
            );
        }
        core.watchdog_failed();
    }

    /// Ticks every `every` until the process ends.
    pub async fn run(mut self, every: Duration) -> super::error::Result<()> {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.tick().await;
        }
    }
}
