//! `twosite guard`: flags, checks, and the loop that carries out
//! [`node_health::volume::VolumeGuard`]'s actions — Lease reads and writes, the node agent's
//! deadline, the device, the app — and reports their outcomes back to it.

use super::app::App;
use super::device::{self, BlockDevice};
use super::lease_io;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::PostParams;
use node_health::agentd::guard_socket::{DEFAULT_GUARD_SOCKET, GuardClient};
use node_health::agentd::state::BootClock;
use node_health::time::{Clock, MonoTime};
use node_health::volume::device::Filesystem;
use node_health::volume::{
    GuardAction, GuardState, VolumeGuard, VolumeTiming, WriteId, WriteOutcome,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// How often the loop steps the core when nothing else happens.
const STEP: Duration = Duration::from_millis(100);
/// Every API request's time limit: under the renew interval, as the core asks.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1_500);
/// The agent's time limit.
const AGENT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the Lease is read besides the core's own refreshes: a standby sees a release or a
/// switchover within this, an active guard a handover between its renewals. Two consumers per
/// volume cost four small GETs a second, which small edge clusters carry easily.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// Pause before starting the app again after a failed start.
const START_RETRY: Duration = Duration::from_secs(1);

/// Run an app only while this consumer holds the volume's Lease.
#[derive(clap::Args, Debug, Clone)]
pub struct GuardArgs {
    /// The volume Lease (in --namespace).
    #[arg(long)]
    pub lease: String,
    /// The Lease's namespace: the pod's own.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// The shared block device (the PVC's volumeDevices devicePath).
    #[arg(long)]
    pub device: PathBuf,
    /// Where the device is mounted while this consumer is active.
    #[arg(long)]
    pub mount: PathBuf,
    /// The filesystem: an empty device is formatted with it, a device with any other signature
    /// is never touched.
    #[arg(long = "fs", value_parser = parse_fs)]
    pub filesystem: Filesystem,
    /// This consumer's identity on the Lease: unique per consumer, so the pod's UID.
    #[arg(long, env = "POD_UID")]
    pub identity: String,
    /// The node agent's socket, where the fence deadline is armed before the app starts.
    #[arg(long, default_value = DEFAULT_GUARD_SOCKET)]
    pub agent_socket: PathBuf,
    /// Readiness (/readyz: 200 only while the app runs as the active consumer) and /livez.
    #[arg(long, default_value = "0.0.0.0:9479")]
    pub health_addr: SocketAddr,
    /// The signal that asks the app to stop (SIGKILL follows after --stop-grace-ms), e.g. INT
    /// for PostgreSQL's fast shutdown.
    #[arg(long, default_value = "TERM", value_parser = parse_stop_signal)]
    pub stop_signal: i32,
    /// How long the app has after the stop signal before SIGKILL.
    #[arg(long, default_value = "1500", value_parser = parse_ms)]
    pub stop_grace_ms: Duration,
    /// The app and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub app: Vec<String>,
}

fn parse_fs(s: &str) -> Result<Filesystem, String> {
    s.parse::<Filesystem>().map_err(|e| e.to_string())
}

fn parse_stop_signal(s: &str) -> Result<i32, String> {
    super::app::parse_signal(s).map_err(|e| e.to_string())
}

fn parse_ms(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("{s:?} is not a number of milliseconds: {e}"))
}

/// Why the guard does not start.
#[derive(Debug, thiserror::Error)]
pub enum GuardStartError {
    #[error(
        "--lease {0:?} is not a valid Lease name (lowercase letters, digits, '-' and '.', at most 253)"
    )]
    LeaseName(String),
    #[error("--identity must not be empty (set POD_UID from the pod's metadata.uid)")]
    Identity,
    #[error("no app command after `--`")]
    NoApp,
    #[error("--mount {0} is not an existing directory")]
    MountDir(PathBuf),
    #[error("the stop grace {grace:?} leaves no time to unmount within the stop budget {budget:?}")]
    Grace { grace: Duration, budget: Duration },
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error(transparent)]
    Config(#[from] node_health::volume::GuardConfigError),
    #[error("cannot read the boot clock: {0}")]
    Clock(std::io::Error),
    #[error("cannot reach the API server: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot serve readiness on {addr}: {source}")]
    Health {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the agent channel: {0}")]
    Agent(#[source] node_health::agentd::guard_socket::GuardClientError),
}

/// A DNS-1123 subdomain, as Kubernetes names Leases.
pub fn valid_lease_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

impl GuardArgs {
    /// Every check that needs no API server: a guard that fails one touches nothing.
    pub fn check(&self, timing: &VolumeTiming) -> Result<BlockDevice, GuardStartError> {
        if !valid_lease_name(&self.lease) {
            return Err(GuardStartError::LeaseName(self.lease.clone()));
        }
        if self.identity.trim().is_empty() {
            return Err(GuardStartError::Identity);
        }
        if self.app.is_empty() {
            return Err(GuardStartError::NoApp);
        }
        if self.stop_grace_ms >= timing.stop_budget {
            return Err(GuardStartError::Grace {
                grace: self.stop_grace_ms,
                budget: timing.stop_budget,
            });
        }
        if !self.mount.is_dir() {
            return Err(GuardStartError::MountDir(self.mount.clone()));
        }
        let dev = device::block_device(&self.device)?;
        device::check_unmounted(&dev, std::path::Path::new("/proc/self/mountinfo"))?;
        Ok(dev)
    }
}

/// Runs the guard. Exit status: 0 after a clean stop (SIGTERM), 1 when it had to leave the
/// node to its fence or failed, 2 on refused flags.
pub fn main(args: GuardArgs) -> ExitCode {
    crate::run::init_tracing();
    let timing = VolumeTiming::default();
    let dev = match args.check(&timing) {
        Ok(d) => d,
        Err(err) => {
            eprintln!("error: {}", node_health::report::report(&err));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, dev, timing)) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = %node_health::report::report(&err), "guard stopped");
            ExitCode::FAILURE
        }
    }
}

enum Event {
    Read(Result<Option<Lease>, ()>),
    Wrote(WriteId, WriteOutcome, Option<Lease>),
    Stopped(Result<(), String>),
}

struct Shell {
    args: GuardArgs,
    dev: BlockDevice,
    guard: VolumeGuard,
    api: Api<Lease>,
    agent: GuardClient,
    clock: BootClock,
    last_read: Option<Lease>,
    reading: bool,
    app: Option<App>,
    stopping: bool,
    /// The deadline the agent acknowledged (the app may run only under one).
    acked: Option<MonoTime>,
    disarm_pending: bool,
    next_start: Option<MonoTime>,
    next_poll: MonoTime,
    /// The last reason logged for not taking the Lease (logged when it changes).
    waiting: Option<String>,
    ready: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<Event>,
}

async fn run(
    args: GuardArgs,
    dev: BlockDevice,
    timing: VolumeTiming,
) -> Result<ExitCode, GuardStartError> {
    let guard = VolumeGuard::new(args.identity.clone(), timing)?;
    let clock = BootClock::new().map_err(GuardStartError::Clock)?;
    let name = format!("{}/{}/{}", args.namespace, args.lease, args.identity);
    let agent = GuardClient::new(&args.agent_socket, &name, AGENT_TIMEOUT)
        .map_err(GuardStartError::Agent)?;
    let client = kube::Client::try_default()
        .await
        .map_err(GuardStartError::Client)?;
    let api: Api<Lease> = Api::namespaced(client, &args.namespace);
    let ready = Arc::new(AtomicBool::new(false));
    serve_health(args.health_addr, ready.clone()).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    tracing::info!(
        lease = %args.lease, namespace = %args.namespace, identity = %args.identity,
        device = %args.device.display(), mount = %args.mount.display(), fs = %args.filesystem,
        "guard starting as standby"
    );
    let mut shell = Shell {
        args,
        dev,
        guard,
        api,
        agent,
        clock,
        last_read: None,
        reading: false,
        app: None,
        stopping: false,
        acked: None,
        disarm_pending: false,
        next_start: None,
        next_poll: MonoTime::ZERO,
        waiting: None,
        ready,
        tx,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| {
            GuardStartError::Agent(
                node_health::agentd::guard_socket::GuardClientError::Refused(e.to_string()),
            )
        })?;
    let mut ticks = tokio::time::interval(STEP);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = rx.recv() => if let Some(ev) = ev { shell.on_event(ev) },
            _ = ticks.tick() => {}
            _ = term.recv() => {
                tracing::info!("SIGTERM: stepping down (stop the app, unmount, release)");
                shell.guard.retire();
            }
        }
        shell.poll_app();
        shell.step().await;
        match shell.guard.state() {
            GuardState::Retired if shell.app.is_none() && !shell.stopping => {
                shell.flush_disarm().await;
                tracing::info!("stepped down cleanly");
                return Ok(ExitCode::SUCCESS);
            }
            GuardState::Fencing { epoch } => {
                tracing::error!(
                    epoch,
                    "the app did not stop before the fence deadline: leaving the node to its \
                     agent, which fences it"
                );
                return Ok(ExitCode::FAILURE);
            }
            _ => {}
        }
    }
}

impl Shell {
    fn on_event(&mut self, ev: Event) {
        let now = self.clock.now();
        match ev {
            Event::Read(result) => {
                self.reading = false;
                if let Ok(found) = result {
                    self.observe(found, now);
                }
            }
            Event::Wrote(id, outcome, lease) => {
                if let Some(l) = lease {
                    self.last_read = Some(l);
                }
                self.guard.write_result(id, outcome, now);
            }
            Event::Stopped(result) => {
                self.stopping = false;
                match result {
                    Ok(()) => {
                        tracing::info!("app stopped, device synced and unmounted");
                        self.guard.app_stopped();
                    }
                    // Not reported stopped: the deadline stays armed and the agent fences the
                    // node if nothing else works. Never a lazy unmount.
                    Err(why) => tracing::error!(why, "could not stop the app cleanly"),
                }
            }
        }
    }

    fn observe(&mut self, found: Option<Lease>, now: MonoTime) {
        match found {
            None => {
                self.last_read = None;
                self.guard.observe(None, now);
            }
            Some(l) => match lease_io::to_volume_lease(&l) {
                Ok(v) => {
                    self.last_read = Some(l);
                    self.guard.observe(Some(v), now);
                }
                // Unreadable: as if unread (the guard's deadlines keep running).
                Err(err) => {
                    tracing::warn!(error = %err, "the volume Lease is malformed; ignoring this read")
                }
            },
        }
    }

    /// An app that exited on its own is stopped like a demotion: sync and unmount first.
    fn poll_app(&mut self) {
        let exited = self.app.as_mut().and_then(App::exited);
        if let Some(status) = exited {
            tracing::warn!(%status, "the app exited on its own");
            self.ready.store(false, Ordering::Relaxed);
            self.begin_stop();
        }
    }

    async fn step(&mut self) {
        let now = self.clock.now();
        if self.disarm_pending {
            self.flush_disarm().await;
        }
        if now >= self.next_poll {
            self.next_poll = now + POLL_EVERY;
            self.refresh();
        }
        let actions = self.guard.step(now);
        self.log_waiting();
        let mut armed_in_batch = None;
        for action in actions {
            match action {
                GuardAction::Refresh => self.refresh(),
                GuardAction::Acquire {
                    id,
                    expected_rv,
                    epoch,
                } => {
                    let identity = self.args.identity.clone();
                    let duration = self.guard.timing().duration;
                    self.write(id, &expected_rv, move |l| {
                        lease_io::acquired(l, &identity, epoch, duration)
                    });
                }
                GuardAction::Renew {
                    id, expected_rv, ..
                } => self.write(id, &expected_rv, |l| Some(lease_io::renewed(l))),
                GuardAction::Release {
                    id, expected_rv, ..
                } => self.write(id, &expected_rv, |l| Some(lease_io::released(l))),
                GuardAction::ArmFence { at } => {
                    let fence_delay = self.guard.timing().fence_delay;
                    match self.agent.arm(at, fence_delay).await {
                        Ok(()) => {
                            self.acked = Some(at);
                            armed_in_batch = Some(at);
                        }
                        Err(err) => tracing::error!(
                            error = %err,
                            "the node agent did not take the fence deadline: the app does not \
                             start (a running app keeps its earlier deadline)"
                        ),
                    }
                }
                GuardAction::DisarmFence => {
                    self.acked = None;
                    self.disarm_pending = true;
                    self.flush_disarm().await;
                }
                GuardAction::StartApp { epoch } => self.start_app(epoch, armed_in_batch, now),
                GuardAction::StopApp => {
                    self.ready.store(false, Ordering::Relaxed);
                    self.begin_stop();
                }
                GuardAction::RequestFence => tracing::error!(
                    "stopping overran the fence deadline: the node agent fences this node"
                ),
            }
        }
    }

    /// Says why a standby does not take the Lease, once per kind of reason.
    fn log_waiting(&mut self) {
        let why = match self.guard.state() {
            GuardState::Standby => self.guard.last_refusal().map(|r| {
                // The reason without its changing figures.
                let text = r.to_string();
                text.split(", unchanged for")
                    .next()
                    .unwrap_or(&text)
                    .to_string()
            }),
            _ => None,
        };
        if why != self.waiting {
            if let Some(w) = &why {
                tracing::info!(why = %w, "standby: not taking the Lease");
            }
            self.waiting = why;
        }
    }

    async fn flush_disarm(&mut self) {
        if !self.disarm_pending {
            return;
        }
        match self.agent.disarm().await {
            Ok(()) => self.disarm_pending = false,
            Err(node_health::agentd::guard_socket::GuardClientError::Refused(why))
                if why.contains("no deadline is armed") =>
            {
                self.disarm_pending = false
            }
            Err(err) => tracing::warn!(error = %err, "could not disarm the deadline yet; retrying"),
        }
    }

    fn refresh(&mut self) {
        if self.reading {
            return;
        }
        self.reading = true;
        let (api, name, tx) = (self.api.clone(), self.args.lease.clone(), self.tx.clone());
        tokio::spawn(async move {
            let read = tokio::time::timeout(REQUEST_TIMEOUT, api.get_opt(&name)).await;
            let result = match read {
                Ok(Ok(found)) => Ok(found),
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "reading the volume Lease failed");
                    Err(())
                }
                Err(_) => {
                    tracing::warn!("reading the volume Lease timed out");
                    Err(())
                }
            };
            let _ = tx.send(Event::Read(result));
        });
    }

    fn write(
        &mut self,
        id: WriteId,
        expected_rv: &str,
        build: impl FnOnce(&Lease) -> Option<Lease>,
    ) {
        let body = self
            .last_read
            .as_ref()
            .filter(|l| l.metadata.resource_version.as_deref() == Some(expected_rv))
            .and_then(build);
        let Some(body) = body else {
            // The core wrote against a version this shell no longer holds: a conflict.
            let now = self.clock.now();
            self.guard.write_result(id, WriteOutcome::Conflict, now);
            return;
        };
        let (api, name, tx) = (self.api.clone(), self.args.lease.clone(), self.tx.clone());
        tokio::spawn(async move {
            let put = tokio::time::timeout(
                REQUEST_TIMEOUT,
                api.replace(&name, &PostParams::default(), &body),
            )
            .await;
            let (outcome, lease) = match put {
                Ok(Ok(l)) => match lease_io::to_volume_lease(&l) {
                    Ok(v) => (WriteOutcome::Ok(v), Some(l)),
                    Err(_) => (WriteOutcome::Failed, None),
                },
                Ok(Err(kube::Error::Api(s))) if s.is_conflict() => (WriteOutcome::Conflict, None),
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "a volume Lease write failed");
                    (WriteOutcome::Failed, None)
                }
                Err(_) => (WriteOutcome::Failed, None),
            };
            let _ = tx.send(Event::Wrote(id, outcome, lease));
        });
    }

    fn start_app(&mut self, epoch: u64, armed: Option<MonoTime>, now: MonoTime) {
        // Only under a deadline the agent holds, and not in a tight loop after a failure.
        let covered =
            armed.is_some() || (self.acked.is_some() && self.acked == self.guard.fence_deadline());
        if !covered || self.next_start.is_some_and(|t| now < t) {
            // Not started: after demote_after of this, the core gives the lease back.
            self.guard.start_refused(now);
            return;
        }
        let started =
            device::check_unmounted(&self.dev, std::path::Path::new("/proc/self/mountinfo"))
                .and_then(|()| {
                    device::prepare_and_mount(&self.dev, &self.args.mount, self.args.filesystem)
                })
                .map_err(|e| node_health::report::report(&e))
                .and_then(|prepared| {
                    tracing::info!(?prepared, mount = %self.args.mount.display(), "device mounted");
                    let envs = vec![
                        ("TWOSITE_EPOCH".to_string(), epoch.to_string()),
                        (
                            "TWOSITE_MOUNT".to_string(),
                            self.args.mount.display().to_string(),
                        ),
                    ];
                    App::start(&self.args.app, &envs).map_err(|e| {
                        // Mounted but no app: unmount again before saying it stopped.
                        if let Err(u) = device::sync_and_unmount(&self.args.mount) {
                            tracing::error!(error = %u, "could not unmount after a failed start");
                        }
                        format!("cannot start the app: {e}")
                    })
                });
        match started {
            Ok(app) => {
                tracing::info!(epoch, "active: the app runs");
                self.app = Some(app);
                self.ready.store(true, Ordering::Relaxed);
            }
            Err(why) => {
                tracing::error!(why, "could not become active");
                self.next_start = Some(now + START_RETRY);
                self.guard.start_refused(now);
            }
        }
    }

    fn begin_stop(&mut self) {
        if self.stopping {
            return;
        }
        let Some(app) = self.app.take() else {
            return;
        };
        self.stopping = true;
        let (signal, grace) = (self.args.stop_signal, self.args.stop_grace_ms);
        let (mount, tx) = (self.args.mount.clone(), self.tx.clone());
        tokio::spawn(async move {
            let stopped = app.stop(signal, grace).await.map_err(|e| e.to_string());
            let result = match stopped {
                Ok(status) => {
                    tracing::info!(%status, "app stopped");
                    tokio::task::spawn_blocking(move || device::sync_and_unmount(&mount))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| node_health::report::report(&e)))
                }
                Err(e) => Err(e),
            };
            let _ = tx.send(Event::Stopped(result));
        });
    }
}

async fn serve_health(addr: SocketAddr, ready: Arc<AtomicBool>) -> Result<(), GuardStartError> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "active")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "standby")
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| GuardStartError::Health { addr, source })?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(error = %err, "readiness server stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_checked_like_kubernetes_does() {
        assert!(valid_lease_name("db-volume"));
        assert!(valid_lease_name("a.b-1"));
        for bad in ["", "DB", "-a", "a-", "a..b", "a_b", &"x".repeat(254)] {
            assert!(!valid_lease_name(bad), "{bad:?}");
        }
    }
}
