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
    /// The agent rebooted the node itself (its watchdog was broken).
    Rebooted,
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
    broken: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeWatchdog {
    pub fn new(clock: FakeClock, log: EventLog) -> Self {
        FakeWatchdog {
            clock,
            log,
            broken: Arc::default(),
        }
    }

    /// From now on every arm and feed fails, as a device that went away would.
    pub fn break_it(&self) {
        self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self) -> Result<()> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(super::error::Error::Watchdog {
                path: "/dev/fake-watchdog".into(),
                what: "could not feed",
                source: std::io::Error::other("the fake watchdog is broken"),
            });
        }
        Ok(())
    }
    pub fn is_open(&self) -> bool {
        !self.log.times_of(Event::Armed).is_empty()
    }
}

impl Watchdog for FakeWatchdog {
    fn arm(&mut self) -> Result<()> {
        self.check()?;
        self.log.push(self.clock.now(), Event::Armed);
        Ok(())
    }
    fn feed(&mut self) -> Result<()> {
        self.check()?;
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
    fn reboot(&mut self) -> Result<()> {
        self.log.push(self.clock.now(), Event::Rebooted);
        Ok(())
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

/// The peer key of the fakes and tests.
pub fn test_keys() -> crate::peer_auth::PeerKeys {
    let key = crate::peer_auth::PeerKey::new(b"twosite test peer key, never used in a cluster");
    // A 46-byte constant: always long enough.
    crate::peer_auth::PeerKeys::new(key.expect("a long test key"), None)
}

/// What a [`FakePeer`] answers.
#[derive(Debug, Clone)]
enum FakeAnswer {
    /// The report, signed with [`test_keys`] for the question asked.
    Signed(PeerReport),
    /// These bytes, whatever the question.
    Raw(Vec<u8>),
}

/// A partner that answers with whatever report it is given, signed with [`test_keys`] (or
/// with given bytes, or does not answer).
#[derive(Debug, Clone, Default)]
pub struct FakePeer(Arc<Mutex<Option<FakeAnswer>>>);

impl FakePeer {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn answer(&self, report: Option<PeerReport>) {
        *lock(&self.0) = report.map(FakeAnswer::Signed);
    }
    /// Answers `body` to every question (a forger, a replay).
    pub fn answer_raw(&self, body: Vec<u8>) {
        *lock(&self.0) = Some(FakeAnswer::Raw(body));
    }
}

impl PeerProbe for FakePeer {
    async fn probe(
        &self,
        addr: SocketAddr,
        question: &crate::peer_auth::Question,
    ) -> Result<Vec<u8>> {
        match lock(&self.0).clone() {
            Some(FakeAnswer::Signed(report)) => Ok(crate::peer_auth::sign_answer(
                Some(&test_keys()),
                question,
                &report,
            )),
            Some(FakeAnswer::Raw(body)) => Ok(body),
            None => Err(Error::Probe {
                addr,
                what: "the fake partner does not answer".into(),
            }),
        }
    }
}

#[derive(Debug, Default)]
struct Contact {
    /// Node → the resourceVersion and the renewal mark of its heartbeat Lease.
    versions: std::collections::BTreeMap<String, (u64, i64)>,
    zones: std::collections::BTreeMap<String, String>,
    zone_reads: std::collections::BTreeMap<String, u32>,
    next_version: u64,
    down: bool,
}

/// The other agents' heartbeat Leases and the Nodes' zones, as the contact watch lists them.
#[derive(Debug, Clone, Default)]
pub struct FakeContact(Arc<Mutex<Contact>>);

impl FakeContact {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set_zone(&self, node: &str, zone: &str) {
        lock(&self.0).zones.insert(node.into(), zone.into());
    }
    /// `node`'s agent renews its heartbeat: its Lease gets a new renewTime and
    /// resourceVersion.
    pub fn renew(&self, node: &str) {
        let mut c = lock(&self.0);
        c.next_version += 1;
        let v = c.next_version;
        let mark = c.versions.get(node).map_or(0, |(_, m)| *m) + 1;
        c.versions.insert(node.into(), (v, mark));
    }
    /// Someone else (the controller's fence marker) writes `node`'s Lease: a new
    /// resourceVersion, the same renewTime.
    pub fn controller_write(&self, node: &str) {
        let mut c = lock(&self.0);
        c.next_version += 1;
        let v = c.next_version;
        if let Some(entry) = c.versions.get_mut(node) {
            entry.0 = v;
        }
    }
    /// Every call fails as if the API server were unreachable.
    pub fn set_down(&self, down: bool) {
        lock(&self.0).down = down;
    }
    /// How often the zone of `node` was read.
    pub fn zone_reads(&self, node: &str) -> u32 {
        lock(&self.0).zone_reads.get(node).copied().unwrap_or(0)
    }
}

impl super::contact::ContactApi for FakeContact {
    async fn list_heartbeats(&self) -> Result<Vec<Lease>> {
        let c = lock(&self.0);
        if c.down {
            return Err(FakeHeartbeatApi::unreachable());
        }
        Ok(c.versions
            .iter()
            .map(|(node, (v, mark))| {
                let mut lease = Lease::default();
                lease.metadata.name = Some(super::heartbeat::lease_name(node));
                lease.metadata.resource_version = Some(v.to_string());
                let renewed = jiff::Timestamp::from_second(1_700_000_000 + mark)
                    .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
                lease.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                    holder_identity: Some(node.clone()),
                    renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                        renewed,
                    )),
                    ..Default::default()
                });
                lease
            })
            .collect())
    }
    async fn zone_of(&self, node: &str) -> Result<Option<String>> {
        let mut c = lock(&self.0);
        if c.down {
            return Err(FakeHeartbeatApi::unreachable());
        }
        *c.zone_reads.entry(node.into()).or_default() += 1;
        Ok(c.zones.get(node).cloned())
    }
}

/// How the fake witness answers claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessAnswer {
    /// `granted` with this epoch and duration.
    Grant { epoch: u64, valid_for_ms: u64 },
    /// `held` by the other room.
    Held,
    /// This status with this raw body.
    Raw { status: u16, body: String },
}

/// A claim as the fake witness received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedClaim {
    pub cluster: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The claim, or `None` when the body was not one.
    pub claim: Option<crate::witness::Claim>,
}

#[derive(Debug)]
struct WitnessState {
    answer: WitnessAnswer,
    received: Vec<ReceivedClaim>,
}

/// A witness on 127.0.0.1 that records claims and answers as told (over plain HTTP).
#[derive(Debug, Clone)]
pub struct FakeWitness {
    state: Arc<Mutex<WitnessState>>,
    addr: SocketAddr,
}

impl FakeWitness {
    /// Starts serving on an ephemeral port of 127.0.0.1 (until the runtime ends).
    pub async fn start(answer: WitnessAnswer) -> std::io::Result<Self> {
        use axum::body::Bytes;
        use axum::extract::{Path, State};
        use axum::http::HeaderMap;
        use axum::response::IntoResponse;
        use axum::routing::{get, post};

        async fn claim(
            State(state): State<Arc<Mutex<WitnessState>>>,
            Path(cluster): Path<String>,
            headers: HeaderMap,
            body: Bytes,
        ) -> axum::response::Response {
            let answer = {
                let mut s = lock(&state);
                s.received.push(ReceivedClaim {
                    cluster,
                    authorization: headers
                        .get(http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string),
                    claim: serde_json::from_slice(&body).ok(),
                });
                s.answer.clone()
            };
            let (status, body) = match answer {
                WitnessAnswer::Grant {
                    epoch,
                    valid_for_ms,
                } => (
                    200,
                    serde_json::json!({"outcome": "granted", "epoch": epoch,
                                       "valid_for_ms": valid_for_ms})
                    .to_string(),
                ),
                WitnessAnswer::Held => (
                    200,
                    serde_json::json!({"outcome": "held", "holder": "room-b", "epoch": 1,
                                       "retry_after_ms": 1000})
                    .to_string(),
                ),
                WitnessAnswer::Raw { status, body } => (status, body),
            };
            let status = http::StatusCode::from_u16(status)
                .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
            (
                status,
                [(http::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }

        let state = Arc::new(Mutex::new(WitnessState {
            answer,
            received: Vec::new(),
        }));
        let router = axum::Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/v1/clusters/{cluster}/claim", post(claim))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(FakeWitness { state, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_answer(&self, answer: WitnessAnswer) {
        lock(&self.state).answer = answer;
    }

    /// Every claim received, in order.
    pub fn received(&self) -> Vec<ReceivedClaim> {
        lock(&self.state).received.clone()
    }
}

/// Probe context of the fakes and tests: [`test_keys`], fresh metrics.
pub fn test_probe_context() -> super::peer::ProbeContext {
    super::peer::ProbeContext::new(
        super::peer_keys::KeyStore::new(Some(test_keys())),
        super::peer::PeerMetrics::new(),
    )
}
