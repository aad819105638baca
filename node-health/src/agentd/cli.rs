//! `twosite-agent`: flags, and wiring the agent's tasks together.
//!
//! Five tasks share one [`SharedCore`]: the heartbeat renewal, the partner refresh, the partner
//! probes, the peer port and the decision loop; with `--witness-url`, two more: the other
//! room's heartbeats and the claims at the witness; one more writes the state file. If any
//! ends the process exits non-zero; the watchdog, once armed, then reboots the node unless a new
//! agent feeds it in time — exactly what the controller's fence deadline assumes of a node whose
//! agent stopped.
//!
//! A new agent of the same boot resumes from the state file the previous one kept: its decision
//! loop starts first, feeding the watchdog while the inherited right to run holds, before the
//! API client and the room lookup, which can outlast the watchdog's timeout.

use super::SharedCore;
use super::claims::{CLAIM_EVERY, run_claims};
use super::contact::{KubeContact, OtherRoomWatch, run_other_room_watch};
use super::error::{Error, Result, report, with_timeout};
use super::guard_socket::{self, DeadlineStore, GuardContext};
use super::heartbeat::{KubeLeases, NodeFacts, read_boot_id, run_heartbeat};
use super::node_agent::{NodeAgent, TICK};
use super::partner::{KubePairing, PartnerCache, run_partner_refresh, zone};
use super::peer::{self, HttpProbe, PeerMetrics, ProbeContext, run_probes};
use super::peer_keys::{self, DEFAULT_KEY_DIR, KeyStore, RELOAD_EVERY, run_key_reload};
use super::state::{
    self, BootClock, DEFAULT_STATE_FILE, SavedState, StateFile, StateIdentity, StateRecorder,
    run_state_writer,
};
use super::stopper::CommandStopper;
use super::watchdog::{DEFAULT_DEVICE, DeviceWatchdog, FileWatchdog, NoWatchdog, Watchdog};
use super::witness_client::WitnessClient;
use super::witness_flags::WitnessFlags;
use crate::agent::{AgentCore, Resumed};
use crate::time::{Clock, MonoTime};
use crate::verdict::HealthTiming;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How often the partner and its address are read again from the API server.
pub const PARTNER_REFRESH: Duration = Duration::from_secs(10);
/// How long to wait before asking again for the Node's zone at start.
const ROOM_RETRY: Duration = Duration::from_secs(2);
/// How long reading the state file may take at start (it is on tmpfs: far less).
const STATE_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// twosite node agent: heartbeat Lease, watchdog, partner probes, self-fencing.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "twosite-agent", version)]
pub struct Args {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// This node's room [default: the Node's topology.kubernetes.io/zone label].
    #[arg(long, env = "NODE_ZONE")]
    pub room: Option<String>,

    /// Namespace of the heartbeat Lease `twosite-agent-<node>`.
    #[arg(long, env = "POD_NAMESPACE", default_value = "twosite-system")]
    pub namespace: String,

    /// The watchdog device; softdog is loaded when the default device is missing.
    #[arg(long, default_value = DEFAULT_DEVICE)]
    pub watchdog_device: PathBuf,

    /// Run without a watchdog: nothing reboots this node when it loses the right to run.
    /// Refused unless --i-understand-no-fencing is given too.
    #[arg(long)]
    pub no_watchdog: bool,

    /// Accept that --no-watchdog or --test-watchdog-file leaves this node unfenced.
    #[arg(long)]
    pub i_understand_no_fencing: bool,

    /// Tests and development only: feed this regular file instead of a watchdog device and
    /// report the watchdog as enabled. Nothing reboots the node; the test harness must treat
    /// it as rebooted once the feeds stop. Refused unless --i-understand-no-fencing is given.
    #[arg(long, conflicts_with_all = ["no_watchdog", "watchdog_device"])]
    pub test_watchdog_file: Option<PathBuf>,

    /// The directory of the peer keys (the mounted Secret twosite-peer-key: `current`, and
    /// `previous` during a rotation). Answers to partner probes are signed with them and only
    /// answers signed with them count; the directory is read again every 2 s.
    #[arg(long, env = "TWOSITE_PEER_KEY_DIR", default_value = DEFAULT_KEY_DIR)]
    pub peer_key_dir: PathBuf,

    /// Tests only: sign nothing and take unsigned answers, so anyone who can answer on the
    /// partner's address can vouch for this node. Refused unless --i-understand-no-fencing is
    /// given too.
    #[arg(long, conflicts_with = "peer_key_dir")]
    pub insecure_peer_probes: bool,

    /// Address of the peer port (GET /v1/peer, GET /metrics); the partner is probed on the same
    /// port.
    #[arg(long, default_value = "0.0.0.0:9477")]
    pub peer_addr: SocketAddr,

    /// Shell command that stops this node's HA workloads when it loses the right to run
    /// (run with `sh -c`, TWOSITE_NODE set, killed after the watchdog timeout).
    #[arg(long)]
    pub stop_command: Option<String>,

    /// Where the kernel's boot ID is read.
    #[arg(long, default_value = "/proc/sys/kernel/random/boot_id")]
    pub boot_id_file: PathBuf,

    /// Where this agent keeps what the next agent process of this boot inherits (its right to
    /// run, never extended), so an agent restart does not reboot the node. Keep it on tmpfs
    /// (/run): a reboot must clear it.
    #[arg(long, default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,

    /// The unix socket on which the volume guards of this node arm their fence deadlines.
    #[arg(long, default_value = super::guard_socket::DEFAULT_GUARD_SOCKET)]
    pub guard_socket: PathBuf,

    /// Where the armed volume deadlines are kept (tmpfs, beside the state file): an agent
    /// restart resumes enforcing them.
    #[arg(long, default_value = super::guard_socket::DEFAULT_DEADLINE_FILE)]
    pub deadline_file: PathBuf,

    /// With a witness, a room out of contact with the other room runs on only while the
    /// witness grants it the right.
    #[command(flatten)]
    pub witness: WitnessFlags,
}

impl Args {
    /// Refuses `--no-watchdog` unless the operator acknowledged running without fencing.
    pub fn check_fencing(&self) -> Result<()> {
        if self.no_watchdog && !self.i_understand_no_fencing {
            return Err(Error::FencingNotAcknowledged {
                flag: "--no-watchdog",
            });
        }
        if self.test_watchdog_file.is_some() && !self.i_understand_no_fencing {
            return Err(Error::FencingNotAcknowledged {
                flag: "--test-watchdog-file",
            });
        }
        if self.insecure_peer_probes && !self.i_understand_no_fencing {
            return Err(Error::InsecurePeersNotAcknowledged);
        }
        Ok(())
    }

    /// The peer keys, read once at start: none only with the explicit insecure flag.
    pub fn peer_keys(&self) -> Result<KeyStore> {
        if self.insecure_peer_probes {
            return Ok(KeyStore::new(None));
        }
        let keys = peer_keys::load_keys(&self.peer_key_dir).map_err(Error::PeerKeys)?;
        Ok(KeyStore::new(Some(keys)))
    }

    /// The witness client, when `--witness-url` is given; refuses flags that do not go together
    /// and reads the token (and CA) file.
    pub fn witness(&self) -> Result<Option<WitnessClient>> {
        let client = match self.witness.check()? {
            Some(settings) => Some(settings.client()?),
            None => None,
        };
        Ok(client)
    }
}

/// Runs the agent until a task dies (failure) or SIGTERM/Ctrl-C (success). Exit status 2 for
/// refused flags.
pub fn main(args: Args) -> ExitCode {
    init_tracing();
    if let Err(err) = args.check_fencing() {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    let witness = match args.witness() {
        Ok(w) => w,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            return ExitCode::from(2);
        }
    };
    let keys = match args.peer_keys() {
        Ok(k) => k,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            return ExitCode::from(2);
        }
    };
    if keys.get().is_none() {
        tracing::warn!(
            "INSECURE PEER PROBES (--insecure-peer-probes --i-understand-no-fencing): anyone who \
             can answer on the partner's address can vouch for this node"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            tracing::error!(error = %report(&Error::Runtime(err)), "agent could not start");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, witness, keys)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %report(&err), "agent stopped");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The room from `--room`/NODE_ZONE, if given.
fn room_flag(args: &Args) -> Option<String> {
    args.room
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_string)
}

/// The room from `--room`/NODE_ZONE, else the Node's zone label; waits for the API server.
async fn resolve_room(
    client: &Client,
    node: &str,
    flag: Option<String>,
    timeout: Duration,
) -> Result<String> {
    if let Some(room) = flag {
        return Ok(room);
    }
    let nodes: Api<Node> = Api::all(client.clone());
    loop {
        match with_timeout("get node", timeout, nodes.get_opt(node)).await {
            Ok(found) => {
                return found.as_ref().and_then(zone).ok_or_else(|| Error::NoRoom {
                    node: node.to_string(),
                });
            }
            Err(err) => {
                tracing::warn!(error = %report(&err), "cannot read this node's zone yet; retrying");
                tokio::time::sleep(ROOM_RETRY).await;
            }
        }
    }
}

fn watchdog(args: &Args, timing: &HealthTiming) -> Result<Box<dyn Watchdog>> {
    if args.no_watchdog {
        tracing::warn!(
            "running WITHOUT a watchdog (--no-watchdog --i-understand-no-fencing): this node \
             does not fence itself; the controller must not rely on it"
        );
        return Ok(Box::new(NoWatchdog));
    }
    if let Some(file) = &args.test_watchdog_file {
        tracing::warn!(
            file = %file.display(),
            "TEST WATCHDOG (--test-watchdog-file --i-understand-no-fencing): the agent reports a \
             watchdog, but nothing reboots this node"
        );
        return Ok(Box::new(FileWatchdog::new(file)));
    }
    Ok(Box::new(DeviceWatchdog::prepare(
        &args.watchdog_device,
        timing.watchdog,
    )?))
}

/// The state file's contents for this boot and node, if usable (read off the runtime's threads,
/// with a time limit: a state file must never hold the agent up).
async fn load_state(file: &StateFile, boot_id: &str, node: &str) -> Option<SavedState> {
    let (file, boot_id, node) = (file.clone(), boot_id.to_string(), node.to_string());
    let read = tokio::task::spawn_blocking(move || state::load(&file, &boot_id, &node));
    match tokio::time::timeout(STATE_READ_TIMEOUT, read).await {
        Ok(Ok(saved)) => saved,
        Ok(Err(join)) => {
            tracing::warn!(error = %join, "could not read the state file: starting as the first agent of this boot");
            None
        }
        Err(_) => {
            tracing::warn!(
                "reading the state file takes longer than {STATE_READ_TIMEOUT:?}: starting as \
                 the first agent of this boot"
            );
            None
        }
    }
}

/// Says what resuming made of the previous agent process's state (`boot_now`: the boot clock).
fn log_resumed(resumed: &Resumed, saved: &SavedState, boot_now: MonoTime) {
    let renewed_ago_ms = saved
        .renewed_at_boot_ms
        .map(|t| boot_now.as_millis().saturating_sub(t));
    match resumed {
        Resumed::Running(basis) => tracing::info!(
            ?basis,
            renewed_ago_ms,
            "resuming the previous agent process of this boot: its right to run still holds; \
             arming and feeding the watchdog now, until that right runs out unless this agent \
             renews"
        ),
        Resumed::Lost(reason) => tracing::error!(
            ?reason,
            "the previous agent process of this boot had lost the right to run: it stays lost \
             until the node reboots; stopping the HA workloads, never feeding the watchdog"
        ),
        Resumed::Expired => tracing::warn!(
            renewed_ago_ms,
            fence_marker = saved.fence_marker,
            "the previous agent process of this boot had armed the watchdog, but its right to \
             run has run out: not feeding it; the node reboots unless this agent renews first"
        ),
        Resumed::NotArmed => tracing::info!(
            "the previous agent process of this boot had not armed the watchdog: starting like a \
             new agent"
        ),
    }
}

/// Starts the decision loop over `core` (once: it takes the watchdog).
fn spawn_decision_loop(
    tasks: &mut JoinSet<(&'static str, Result<()>)>,
    core: &SharedCore,
    clock: &Arc<dyn Clock + Send + Sync>,
    watchdog: &mut Option<Box<dyn Watchdog>>,
    stopper: &CommandStopper,
    recorder: StateRecorder,
    deadlines: &DeadlineStore,
) {
    let Some(watchdog) = watchdog.take() else {
        return;
    };
    let agent = NodeAgent::new(core.clone(), clock.clone(), watchdog, stopper.clone())
        .with_state(recorder)
        .with_deadlines(deadlines.clone());
    tasks.spawn(async move { ("decision loop", agent.run(TICK).await) });
}

async fn run(args: Args, witness: Option<WitnessClient>, keys: KeyStore) -> Result<()> {
    let timing = HealthTiming::default();
    timing.validate().map_err(Error::Timing)?;
    let watchdog = watchdog(&args, &timing)?;
    let fences = watchdog.fences();
    let mut watchdog = Some(watchdog);
    let boot_id = read_boot_id(&args.boot_id_file)?;
    // Every deadline is judged on the boot clock: the state file's instants then mean the same
    // to the next process, and a node waking from suspend sees its lease as expired.
    let boot = BootClock::new().map_err(Error::BootClock)?;
    let clock: Arc<dyn Clock + Send + Sync> = Arc::new(boot);
    let state_file = StateFile::new(&args.state_file);
    let saved = load_state(&state_file, &boot_id, &args.node_name).await;
    // Before the decision loop: deadlines armed under the previous agent process stay enforced.
    let deadlines = DeadlineStore::load(Some(&args.deadline_file), &boot_id);

    let mut tasks: JoinSet<(&'static str, Result<()>)> = JoinSet::new();
    let (state_tx, state_rx) = watch::channel(None);
    tasks.spawn({
        let file = state_file.clone();
        async move { ("state file", run_state_writer(file, state_rx).await) }
    });
    let stopper = CommandStopper::new(args.stop_command.clone(), &args.node_name, timing.watchdog);
    let new_core = |room: &str| {
        let mut core = AgentCore::new(&*args.node_name, room, timing);
        core.set_witness_configured(witness.is_some());
        core
    };
    let recorder = |room: &str| {
        let identity = StateIdentity {
            boot_id: boot_id.clone(),
            node: args.node_name.clone(),
            room: room.to_string(),
        };
        StateRecorder::new(identity, clock.clone(), clock.clone(), state_tx.clone())
    };

    // Resuming: the decision loop feeds per the inherited right before the slow start below.
    // The room is the one the previous process used (unless --room says otherwise).
    let mut resumed = None;
    if let Some(saved) = saved {
        let room = room_flag(&args).unwrap_or_else(|| saved.room.clone());
        let mut core = new_core(&room);
        if let Some(outcome) = state::resume_core(&mut core, &saved, clock.as_ref(), &boot) {
            log_resumed(&outcome, &saved, boot.now());
            let core = SharedCore::new(core);
            spawn_decision_loop(
                &mut tasks,
                &core,
                &clock,
                &mut watchdog,
                &stopper,
                recorder(&room),
                &deadlines,
            );
            resumed = Some((core, room));
        }
    }

    let client = Client::try_default().await.map_err(Error::ClientConfig)?;
    let (core, room) = match resumed {
        Some(resumed) => resumed,
        None => {
            let room = resolve_room(
                &client,
                &args.node_name,
                room_flag(&args),
                timing.request_timeout,
            )
            .await?;
            (SharedCore::new(new_core(&room)), room)
        }
    };
    spawn_decision_loop(
        &mut tasks,
        &core,
        &clock,
        &mut watchdog,
        &stopper,
        recorder(&room),
        &deadlines,
    );
    let listener = peer::bind(args.peer_addr).await?;
    let guard_listener =
        guard_socket::bind(&args.guard_socket).map_err(|source| Error::GuardSocket {
            path: args.guard_socket.clone(),
            source,
        })?;
    tasks.spawn({
        let ctx = GuardContext {
            store: deadlines.clone(),
            core: core.clone(),
            clock: clock.clone(),
            watchdog_fences: fences,
        };
        async move {
            (
                "guard socket",
                guard_socket::serve(guard_listener, ctx).await,
            )
        }
    });
    tracing::info!(
        node = args.node_name,
        room,
        namespace = args.namespace,
        peer = %args.peer_addr,
        boot_id,
        watchdog = fences,
        witness = witness.as_ref().map(|w| w.base_url()),
        cluster = witness.as_ref().map(|w| w.cluster()),
        state_file = %args.state_file.display(),
        guard_socket = %args.guard_socket.display(),
        peer_keys = keys.get().map(|k| k.ids()).unwrap_or_else(|| "NONE (--insecure-peer-probes)".into()),
        "starting twosite agent"
    );
    let metrics = PeerMetrics::new();
    if !args.insecure_peer_probes {
        let (dir, store) = (args.peer_key_dir.clone(), keys.clone());
        tasks.spawn(async move {
            run_key_reload(dir, store, RELOAD_EVERY).await;
            ("peer key reload", Ok(()))
        });
    }

    let partners = PartnerCache::new();
    let facts = NodeFacts {
        node: args.node_name.clone(),
        namespace: args.namespace.clone(),
        boot_id,
        watchdog_enabled: fences,
        lease_duration: timing.agent_lease,
    };

    tasks.spawn({
        let api = KubeLeases::new(client.clone(), &args.namespace, timing.request_timeout);
        let (core, clock) = (core.clone(), clock.clone());
        let every = timing.agent_renew;
        async move {
            (
                "heartbeat",
                run_heartbeat(api, facts, core, clock, every).await,
            )
        }
    });
    tasks.spawn({
        let source = KubePairing::new(client.clone(), timing.request_timeout);
        let (node, port) = (args.node_name.clone(), args.peer_addr.port());
        let (cache, core) = (partners.clone(), core.clone());
        async move {
            let done = run_partner_refresh(source, node, port, cache, core, PARTNER_REFRESH);
            ("partner refresh", done.await)
        }
    });
    tasks.spawn({
        let probe = HttpProbe::new(timing.probe_interval / 2);
        let (cache, core, clock) = (partners.clone(), core.clone(), clock.clone());
        let ctx = ProbeContext::new(keys.clone(), metrics.clone());
        let every = timing.probe_interval;
        async move {
            (
                "peer probe",
                run_probes(probe, cache, core, clock, ctx, every).await,
            )
        }
    });
    tasks.spawn({
        let (core, clock, keys, metrics) = (core.clone(), clock.clone(), keys.clone(), metrics);
        async move {
            let served = peer::serve(listener, core, clock, keys, metrics);
            ("peer port", served.await)
        }
    });
    if let Some(witness) = witness {
        tasks.spawn({
            let api = KubeContact::new(client.clone(), &args.namespace, timing.request_timeout);
            let watch = OtherRoomWatch::new(room.clone());
            let (core, clock) = (core.clone(), clock.clone());
            let every = timing.agent_renew;
            async move {
                let done = run_other_room_watch(api, watch, core, clock, every);
                ("other-room watch", done.await)
            }
        });
        tasks.spawn({
            let (core, clock) = (core.clone(), clock.clone());
            async move {
                (
                    "witness claims",
                    run_claims(witness, core, clock, CLAIM_EVERY).await,
                )
            }
        });
    }
    tokio::select! {
        joined = tasks.join_next() => match joined {
            Some(Ok((name, result))) => {
                if let Err(err) = result {
                    tracing::error!(task = name, error = %report(&err), "task failed");
                }
                Err(Error::TaskEnded(name))
            }
            Some(Err(join)) => {
                tracing::error!(error = %join, "a task panicked");
                Err(Error::TaskEnded("agent"))
            }
            None => Err(Error::TaskEnded("agent")),
        },
        () = shutdown_signal() => {
            if core.lock().is_armed() {
                tracing::warn!(
                    state_file = %args.state_file.display(),
                    "stopping: the watchdog stays armed and reboots the node unless a new agent \
                     feeds it within {:?} (one started by then resumes from the state file and \
                     feeds it while this agent's right to run would have held)",
                    timing.watchdog
                );
            } else {
                tracing::info!("stopping");
            }
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the agent");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
