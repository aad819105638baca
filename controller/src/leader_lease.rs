//! Who leads: the shell that drives [`node_health::LeaderElector`] over a
//! `coordination.k8s.io/v1` Lease.
//!
//! Every retry period: GET the Lease, `observe` it, `decide`, then create it or replace it with
//! the last-seen `resourceVersion` as a precondition. A 409 means another replica wrote first
//! (`write_conflicted`); any other failure is `write_failed` and the term runs out on its own.
//! Every API call has a timeout. Whether this replica may write is always asked of the elector
//! with a fresh reading of the monotonic clock, never cached.

use crate::admin::LoopGuard;
use crate::error::{Error, Result, report, with_timeout};
use crate::metrics::{Metrics, gauge_value};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use node_health::{
    Clock, LeaderAction, LeaderConfig, LeaderElector, LeaseRecord, LeaseWrite, SystemClock,
};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// The Lease's name.
pub const LEASE_NAME: &str = "twosite-controller";

/// Shared view of this replica's leadership. Cheap to clone.
#[derive(Clone)]
pub struct Leadership {
    elector: Arc<Mutex<LeaderElector>>,
    clock: Arc<dyn Clock + Send + Sync>,
    identity: String,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Leadership {
    /// A replica that has not led yet, judged on the process's monotonic clock.
    pub fn new(config: LeaderConfig) -> Result<Self> {
        Self::with_clock(config, Arc::new(SystemClock::new()))
    }

    pub fn with_clock(config: LeaderConfig, clock: Arc<dyn Clock + Send + Sync>) -> Result<Self> {
        let identity = config.identity.clone();
        let elector = LeaderElector::new(config).map_err(Error::LeaderConfig)?;
        Ok(Leadership {
            elector: Arc::new(Mutex::new(elector)),
            clock,
            identity,
        })
    }

    fn elector(&self) -> MutexGuard<'_, LeaderElector> {
        self.elector.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this replica may act as leader right now.
    pub fn is_leader(&self) -> bool {
        let now = self.clock.now();
        self.elector().is_leader(now)
    }

    /// The epoch (`leaseTransitions`) of this replica's current or last term.
    pub fn epoch(&self) -> Option<u64> {
        self.elector().epoch()
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn retry_period(&self) -> Duration {
        self.elector().config().retry_period
    }

    /// Gives up leadership at once (shutdown): no further write passes [`Self::is_leader`].
    pub fn step_down(&self) {
        self.elector().reset();
    }
}

/// The parts of a Lease the election reads.
pub fn lease_record(lease: &Lease) -> LeaseRecord {
    let spec = lease.spec.as_ref();
    LeaseRecord {
        holder: spec.and_then(|s| s.holder_identity.clone()),
        transitions: spec
            .and_then(|s| s.lease_transitions)
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(0),
        duration: Duration::from_secs(
            spec.and_then(|s| s.lease_duration_seconds)
                .and_then(|d| u64::try_from(d).ok())
                .unwrap_or(0),
        ),
        resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
    }
}

/// The Lease to send for `write`, built on the last-read Lease (`base`) so that fields we do
/// not manage (labels, annotations) survive the replace.
pub fn lease_for_write(
    name: &str,
    namespace: &str,
    base: Option<&Lease>,
    write: &LeaseWrite,
    expected_rv: Option<&str>,
    now: jiff::Timestamp,
) -> Lease {
    let mut lease = base.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    lease.metadata.resource_version = expected_rv.map(str::to_string);
    lease.metadata.managed_fields = None;
    let mut spec = lease.spec.take().unwrap_or_default();
    spec.holder_identity = Some(write.holder.clone());
    spec.lease_duration_seconds = Some(i32::try_from(write.duration.as_secs()).unwrap_or(i32::MAX));
    spec.lease_transitions = Some(i32::try_from(write.transitions).unwrap_or(i32::MAX));
    spec.renew_time = Some(MicroTime(now));
    if write.acquire || spec.acquire_time.is_none() {
        spec.acquire_time = Some(MicroTime(now));
    }
    lease.spec = Some(LeaseSpec { ..spec });
    lease
}

/// The Lease shell of one replica.
#[derive(Clone)]
pub struct LeaderLease {
    api: Api<Lease>,
    name: String,
    namespace: String,
    leadership: Leadership,
    metrics: Arc<Metrics>,
    api_timeout: Duration,
}

/// What one election round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundOutcome {
    /// Another replica holds a live lease.
    Waited,
    /// We created the Lease and lead.
    Created,
    /// We renewed or acquired the Lease and lead.
    Wrote,
    /// Another replica wrote first (409): we do not lead.
    Conflicted,
}

impl LeaderLease {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        leadership: Leadership,
        metrics: Arc<Metrics>,
        api_timeout: Duration,
    ) -> Self {
        LeaderLease {
            api: Api::namespaced(client, namespace),
            name: LEASE_NAME.to_string(),
            namespace: namespace.to_string(),
            leadership,
            metrics,
            api_timeout,
        }
    }

    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    /// One round: read, decide, write. Errors leave the elector consistent: a failed read
    /// changes nothing, a failed write is reported to it.
    pub async fn round(&self) -> Result<RoundOutcome> {
        let clock = &self.leadership.clock;
        let current =
            with_timeout("get lease", self.api_timeout, self.api.get_opt(&self.name)).await?;
        // The record was read no earlier than now: counting from here is conservative.
        let action = {
            let mut e = self.leadership.elector();
            e.observe(current.as_ref().map(lease_record), clock.now());
            e.decide(clock.now())
        };
        let (write, expected_rv) = match action {
            LeaderAction::Wait => return Ok(RoundOutcome::Waited),
            LeaderAction::Create(write) => (write, None),
            LeaderAction::Update { write, expected_rv } => (write, Some(expected_rv)),
        };
        let lease = lease_for_write(
            &self.name,
            &self.namespace,
            current.as_ref(),
            &write,
            expected_rv.as_deref(),
            jiff::Timestamp::now(),
        );
        // Leadership counts from the moment the write is sent: the server applies it no earlier.
        let sent_at = clock.now();
        let pp = PostParams::default();
        let result = match expected_rv {
            None => {
                with_timeout(
                    "create lease",
                    self.api_timeout,
                    self.api.create(&pp, &lease),
                )
                .await
            }
            Some(_) => {
                with_timeout(
                    "replace lease",
                    self.api_timeout,
                    self.api.replace(&self.name, &pp, &lease),
                )
                .await
            }
        };
        let mut e = self.leadership.elector();
        match result {
            Ok(written) => {
                e.write_succeeded(lease_record(&written), sent_at, clock.now());
                Ok(if written_by_create(&lease) {
                    RoundOutcome::Created
                } else {
                    RoundOutcome::Wrote
                })
            }
            Err(err) if err.is_conflict() || err.is_already_exists() => {
                e.write_conflicted();
                Ok(RoundOutcome::Conflicted)
            }
            Err(err) => {
                e.write_failed();
                Err(err)
            }
        }
    }

    /// Runs rounds every retry period, forever, publishing leadership changes on `leading`.
    pub async fn run(self, leading: watch::Sender<bool>, guard: LoopGuard) -> Result<()> {
        let retry = self.leadership.retry_period();
        let mut was_leader = false;
        loop {
            guard.beat();
            match self.round().await {
                Ok(outcome) => tracing::trace!(?outcome, "leader election round"),
                Err(err) => {
                    self.metrics.election_failed(err.metric_label());
                    tracing::warn!(error = %report(&err), "leader election round failed");
                }
            }
            let leader = self.leadership.is_leader();
            if leader != was_leader {
                if leader {
                    tracing::info!(
                        identity = self.leadership.identity(),
                        epoch = self.leadership.epoch(),
                        "became leader"
                    );
                } else {
                    tracing::warn!(identity = self.leadership.identity(), "lost leadership");
                }
                was_leader = leader;
            }
            self.metrics.is_leader.set(i64::from(leader));
            if let Some(epoch) = self.leadership.epoch() {
                self.metrics.leader_epoch.set(gauge_value(epoch));
            }
            // Wake the pairing loop on a change only, not every round.
            leading.send_if_modified(|was| std::mem::replace(was, leader) != leader);
            tokio::time::sleep(retry).await;
        }
    }

    /// On shutdown: stop leading, then hand the Lease back (holder cleared, same epoch) so the
    /// other replica can take over without waiting for the lease to expire.
    pub async fn release(&self) -> Result<()> {
        let was_leader = self.leadership.is_leader();
        self.leadership.step_down();
        if !was_leader {
            return Ok(());
        }
        let Some(mut lease) =
            with_timeout("get lease", self.api_timeout, self.api.get_opt(&self.name)).await?
        else {
            return Ok(());
        };
        let mine = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.leadership.identity());
        if !mine {
            return Ok(());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.acquire_time = None;
            spec.renew_time = None;
        }
        lease.metadata.managed_fields = None;
        with_timeout(
            "release lease",
            self.api_timeout,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await?;
        Ok(())
    }
}

fn written_by_create(sent: &Lease) -> bool {
    sent.metadata.resource_version.is_none()
}
