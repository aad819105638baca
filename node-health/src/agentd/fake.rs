//! Stand-ins for the clock, the watchdog, the workload stopper, the Lease API and the partner,
//! for tests of the agent's loop (here and in `tests/`).

use super::error::{Error, Result};
use super::heartbeat::{FENCE_MARKER_ANNOTATION, HeartbeatApi};
use super::peer::PeerProbe;
use super::stopper::WorkloadStopper;
use super::watchdog::Watchdog;
use crate::agent::PeerReport;
use crate::time::{Clock, MonoTime};
use k8s_openapi::api::coordination::v1::Lease;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A clock that moves only when told.
#[derive(Debug, Clone, Default)]
pub struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set(&self, t: MonoTime) {
        self.0.store(t.0, Ordering::SeqCst);
    }
    pub fn advance(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> MonoTime {
        MonoTime(self.0.load(Ordering::SeqCst))
    }
}

/// What a fake did, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The watchdog device was opened (armed).
    Armed,
    Fed,
    /// The HA workloads were stopped.
    Stopped,
}

/// A shared, timestamped record of what the fakes did, in order.
#[derive(Debug, Clone, Default)]
pub struct EventLog {
    events: Arc<Mutex<Vec<(MonoTime, Event)>>>,
}

impl EventLog {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&self, t: MonoTime, e: Event) {
        lock(&self.events).push((t, e));
    }
    pub fn events(&self) -> Vec<(MonoTime, Event)> {
        lock(&self.events).clone()
    }
    /// When `e` happened, in order.
    pub fn times_of(&self, e: Event) -> Vec<MonoTime> {
        lock(&self.events)
            .iter()
            .filter(|(_, x)| *x == e)
            .map(|(t, _)| *t)
            .collect()
    }
}

/// A watchdog that records arming and feeding.
#[derive(Debug, Clone)]
pub struct FakeWatchdog {
    clock: FakeClock,
    log: EventLog,
}

impl FakeWatchdog {
    pub fn new(clock: FakeClock, log: EventLog) -> Self {
        FakeWatchdog { clock, log }
    }
    pub fn is_open(&self) -> bool {
        !self.log.times_of(Event::Armed).is_empty()
    }
}

impl Watchdog for FakeWatchdog {
    fn arm(&mut self) -> Result<()> {
        self.log.push(self.clock.now(), Event::Armed);
        Ok(())
    }
    fn feed(&mut self) -> Result<()> {
        // Like the device: feeding an unopened watchdog opens it first.
        if !self.is_open() {
            self.log.push(self.clock.now(), Event::Armed);
        }
        self.log.push(self.clock.now(), Event::Fed);
        Ok(())
    }
    fn fences(&self) -> bool {
        true
    }
}

/// A workload stopper that records when it was called.
#[derive(Debug, Clone)]
pub struct FakeStopper {
    clock: FakeClock,
    log: EventLog,
}

impl FakeStopper {
    pub fn new(clock: FakeClock, log: EventLog) -> Self {
        FakeStopper { clock, log }
    }
}

impl WorkloadStopper for FakeStopper {
    async fn stop(&mut self) {
        self.log.push(self.clock.now(), Event::Stopped);
    }
}

/// How the fake API server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiMode {
    #[default]
    Up,
    /// Every call fails as if the API server were unreachable.
    Down,
    /// The next write answers 409 Conflict, then `Up`.
    ConflictOnce,
}

#[derive(Debug, Default)]
struct FakeLeases {
    lease: Option<Lease>,
    version: u64,
    mode: ApiMode,
    writes: Vec<Lease>,
}

/// An in-memory Lease store with resourceVersion preconditions, outages and conflicts.
#[derive(Debug, Clone, Default)]
pub struct FakeHeartbeatApi(Arc<Mutex<FakeLeases>>);

impl FakeHeartbeatApi {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set_mode(&self, mode: ApiMode) {
        lock(&self.0).mode = mode;
    }
    /// Every Lease written successfully, in order.
    pub fn writes(&self) -> Vec<Lease> {
        lock(&self.0).writes.clone()
    }
    /// The controller commits a fence: its marker goes onto the stored Lease.
    pub fn mark_fenced(&self) {
        let mut s = lock(&self.0);
        s.version += 1;
        let version = s.version.to_string();
        if let Some(lease) = s.lease.as_mut() {
            lease
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(FENCE_MARKER_ANNOTATION.to_string(), "boot-1".to_string());
            lease.metadata.resource_version = Some(version);
        }
    }
    pub fn stored(&self) -> Option<Lease> {
        lock(&self.0).lease.clone()
    }

    fn unreachable() -> Error {
        Error::Timeout {
            action: "fake API server is down",
            after: Duration::ZERO,
        }
    }

    fn conflict() -> Error {
        let status =
            kube::core::Status::failure("the object has been modified", "Conflict").with_code(409);
        Error::Kube {
            action: "replace heartbeat lease",
            source: kube::Error::Api(status.boxed()),
        }
    }

    fn write(&self, lease: &Lease, create: bool) -> Result<Lease> {
        let mut s = lock(&self.0);
        match s.mode {
            ApiMode::Down => return Err(Self::unreachable()),
            ApiMode::ConflictOnce => {
                s.mode = ApiMode::Up;
                return Err(Self::conflict());
            }
            ApiMode::Up => {}
        }
        let current_rv = s
            .lease
            .as_ref()
            .and_then(|l| l.metadata.resource_version.clone());
        if create && s.lease.is_some() {
            return Err(Self::conflict());
        }
        if !create && lease.metadata.resource_version != current_rv {
            return Err(Self::conflict());
        }
        s.version += 1;
        let mut stored = lease.clone();
        stored.metadata.resource_version = Some(s.version.to_string());
        s.writes.push(lease.clone());
        s.lease = Some(stored.clone());
        Ok(stored)
    }
}

impl HeartbeatApi for FakeHeartbeatApi {
    async fn get(&self, _name: &str) -> Result<Option<Lease>> {
        let s = lock(&self.0);
        if s.mode == ApiMode::Down {
            return Err(Self::unreachable());
        }
        Ok(s.lease.clone())
    }
    async fn create(&self, lease: &Lease) -> Result<Lease> {
        self.write(lease, true)
    }
    async fn replace(&self, _name: &str, lease: &Lease) -> Result<Lease> {
        self.write(lease, false)
    }
}

/// A partner that answers with whatever report it is given (or does not answer).
#[derive(Debug, Clone, Default)]
pub struct FakePeer(Arc<Mutex<Option<PeerReport>>>);

impl FakePeer {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn answer(&self, report: Option<PeerReport>) {
        *lock(&self.0) = report;
    }
}

impl PeerProbe for FakePeer {
    async fn probe(&self, addr: SocketAddr) -> Result<PeerReport> {
        lock(&self.0).clone().ok_or(Error::Probe {
            addr,
            what: "the fake partner does not answer".into(),
        })
    }
}
