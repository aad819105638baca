//! `twosite controller` and `twosite crd`: wiring the loops together.
//!
//! Nine tasks run side by side: the leader election over the Lease, the Node watch, the two
//! heartbeat Lease watches, the TwoSite watch, the pairing loop, the remediation loop, the
//! volume loop and the admin HTTP port (and, with a witness, its health check). If any of them ends or panics the
//! process exits non-zero (Kubernetes restarts it); SIGTERM or Ctrl-C stops it cleanly and hands
//! the Lease back.

use crate::admin::{self, Health};
use crate::crd::{self, TwoSite};
use crate::error::{Error, Result, report};
use crate::heartbeats::{KUBELET_LEASE_NAMESPACE, SharedObserved, Watches};
use crate::leader_lease::{LeaderLease, Leadership};
use crate::metrics::Metrics;
use crate::pairing::{self, Context, FIELD_MANAGER, run_pairing_loop, run_twosite_watch};
use crate::remediation::{RemediationContext, run_remediation_loop};
use crate::witness_link::WitnessLink;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::events::Reporter;
use kube::{Api, Client};
use node_health::agentd::witness_flags::{WitnessFlagError, WitnessFlags, WitnessSettings};
use node_health::{Clock, HealthTiming, LeaderConfig, SystemClock};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

/// `twosite controller` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Namespace of the leader Lease `twosite-controller`.
    #[arg(long, env = "POD_NAMESPACE", default_value = "twosite-system")]
    pub namespace: String,

    /// This replica's identity in the leader Lease [default: POD_NAME, else the hostname].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Address of the admin HTTP port (/livez, /readyz, /metrics).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,

    /// Timeout of every Kubernetes API call, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub api_timeout_secs: u64,

    /// Pause node remediation while dead nodes in both rooms exceed this share of all workers,
    /// in percent (a whole room lost while the other is healthy never pauses).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub max_dead_share_pct: u8,

    /// Without a witness a dead node is fenced on the heartbeat proof alone.
    #[command(flatten)]
    pub witness: WitnessFlags,

    #[command(flatten)]
    pub vm: VmFlags,

    /// Decide and report, but fence, taint out-of-service, delete, hand over and gate nothing:
    /// the log and the Events say what a real run would do. The agents are not affected.
    #[arg(long)]
    pub dry_run: bool,
}

/// KubeVirt VM protection and its admission webhook.
#[derive(clap::Args, Debug, Clone)]
pub struct VmFlags {
    /// Protect KubeVirt VirtualMachines annotated `twosite.dev/ha: "true"` (needs KubeVirt;
    /// without its CRDs the VM watch retries and logs).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub vm_protection: bool,

    /// The HTTPS port of the admission webhook that gates new launcher pods (0: no webhook).
    #[arg(long, default_value_t = 9443)]
    pub webhook_port: u16,

    /// The Secret (in the controller's namespace, shipped empty) that keeps the webhook's
    /// certificate.
    #[arg(long, default_value = "twosite-webhook-tls")]
    pub webhook_secret: String,

    /// The MutatingWebhookConfiguration whose caBundle the controller keeps.
    #[arg(long, default_value = "twosite-vm-gate")]
    pub webhook_config: String,

    /// The webhook's Service: the certificate names `<service>.<namespace>.svc[.cluster.local]`.
    #[arg(long, default_value = "twosite-webhook")]
    pub webhook_service: String,

    /// More names (DNS or IP) for the certificate, for a webhook reached by URL.
    #[arg(long = "webhook-host")]
    pub webhook_hosts: Vec<String>,
}

impl VmFlags {
    /// The names the webhook certificate is made for.
    pub fn cert_names(&self, namespace: &str) -> Vec<String> {
        let svc = &self.webhook_service;
        let mut names = vec![
            format!("{svc}.{namespace}.svc"),
            format!("{svc}.{namespace}.svc.cluster.local"),
        ];
        names.extend(self.webhook_hosts.iter().cloned());
        names
    }
}

impl RunArgs {
    /// The witness settings, `None` without `--witness-url`: the same checks as the agent's.
    pub fn witness_settings(
        &self,
    ) -> std::result::Result<Option<WitnessSettings>, WitnessFlagError> {
        self.witness.check()
    }
}

/// The exit status for a bad command line (as clap uses).
pub const USAGE_EXIT: u8 = 2;

/// Runs the controller until SIGTERM/Ctrl-C (success) or until a main loop dies (failure).
pub fn main(args: RunArgs) -> ExitCode {
    let witness = match args.witness_settings() {
        Ok(w) => w,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            return ExitCode::from(USAGE_EXIT);
        }
    };
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            let err = Error::Runtime(err);
            tracing::error!(error = %report(&err), "controller could not start");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, witness)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %report(&err), "controller stopped");
            ExitCode::FAILURE
        }
    }
}

/// Prints the TwoSite CustomResourceDefinition as YAML (what `deploy/crd.yaml` holds).
pub fn print_crd() -> ExitCode {
    match crd::crd_yaml() {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {}", report(&Error::CrdYaml(err)));
            ExitCode::FAILURE
        }
    }
}

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A subscriber may already be set (tests); keep it.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .try_init();
}

/// `--identity`, else POD_NAME (through clap), else the hostname.
pub fn resolve_identity(flag: Option<String>) -> Result<String> {
    if let Some(id) = flag.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
        return Ok(id);
    }
    let host = hostname::get().map_err(Error::NoIdentity)?;
    host.into_string()
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Error::NoIdentity(std::io::Error::other("the hostname is empty or not UTF-8"))
        })
}

async fn run(args: RunArgs, witness: Option<WitnessSettings>) -> Result<()> {
    let identity = resolve_identity(args.identity)?;
    let api_timeout = Duration::from_secs(args.api_timeout_secs);
    let timing = HealthTiming::default();
    timing.validate().map_err(Error::Timing)?;
    let clock: Arc<dyn Clock + Send + Sync> = Arc::new(SystemClock::new());
    let leadership =
        Leadership::with_clock(LeaderConfig::new(identity.clone()), Arc::clone(&clock))?;
    let client = Client::try_default().await.map_err(Error::ClientConfig)?;
    let metrics = Arc::new(Metrics::new());
    let health = Health::new();
    let listener = admin::bind(args.admin_addr).await?;
    tracing::info!(
        identity,
        namespace = args.namespace,
        admin = %args.admin_addr,
        "starting twosite controller"
    );

    let lease = LeaderLease::new(
        client.clone(),
        &args.namespace,
        leadership.clone(),
        Arc::clone(&metrics),
        api_timeout,
    );
    let recorder = crate::events::EventSink::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: Some(identity.clone()),
        },
    );
    let (pairing_tx, pairing_rx) = watch::channel(None);
    let webhook_pairing = pairing_tx.subscribe();
    let (view_tx, view_rx) = watch::channel(None);
    let (volumes_tx, volumes_rx) = watch::channel(Vec::new());
    let (vms_tx, vms_rx) = watch::channel(Vec::new());
    let ctx = Context {
        twosites: Api::<TwoSite>::all(client.clone()),
        recorder: recorder.clone(),
        leadership: leadership.clone(),
        metrics: Arc::clone(&metrics),
        api_timeout,
        pairing_out: pairing_tx,
        remediation: view_rx.clone(),
        volumes: volumes_rx,
        vms: vms_rx,
    };
    let mut volume_ctx = crate::volumes::VolumeContext {
        leases: Api::all(client.clone()),
        pods: Api::all(client.clone()),
        client: client.clone(),
        recorder: recorder.clone(),
        leadership: leadership.clone(),
        metrics: Arc::clone(&metrics),
        api_timeout,
        timing: node_health::volume::VolumeTiming::default(),
        clock: Arc::clone(&clock),
        dry_run: args.dry_run,
        stores: None,
    };
    let mut remediation_ctx = RemediationContext {
        nodes: Api::all(client.clone()),
        agent_leases: Api::namespaced(client.clone(), &args.namespace),
        pods: Api::all(client.clone()),
        recorder,
        leadership: leadership.clone(),
        metrics: Arc::clone(&metrics),
        api_timeout,
        timing,
        max_dead_share_pct: args.max_dead_share_pct,
        witness: None,
        vms: None,
        pod_index: Some(crate::pod_index::PodIndex::default()),
        dry_run: args.dry_run,
        fence_commits: Default::default(),
    };
    if args.dry_run {
        tracing::warn!(
            "dry-run: decisions are logged, nothing is fenced, tainted out-of-service, deleted, handed over or gated"
        );
    }
    let witness = match witness {
        Some(w) => {
            tracing::info!(
                url = w.url,
                cluster = w.cluster,
                "fencing needs the witness's grant"
            );
            let port = crate::witness_port::HttpWitness::new(&w)?;
            Some(Arc::new(WitnessLink::new(
                Arc::new(port),
                Arc::clone(&clock),
                timing.drift_ppm,
                Arc::clone(&metrics),
            )))
        }
        None => {
            tracing::info!("no witness configured: fencing on the heartbeat proof alone");
            None
        }
    };
    remediation_ctx.witness = witness.clone();
    let vm_recorder = remediation_ctx.recorder.clone();
    let vm_clock = Arc::clone(&clock);
    let vm_watch = args
        .vm
        .vm_protection
        .then(|| crate::vm::watch::start(&client, health.register("VM watches", None)));
    remediation_ctx.vms = vm_watch.as_ref().map(|(s, _)| s.clone());
    let observed = SharedObserved::default();
    let watches = Arc::new(Watches {
        observed: observed.clone(),
        clock: Arc::clone(&clock),
        timing,
    });
    let (leading_tx, leading_rx) = watch::channel(false);
    let (facts_tx, facts_rx) = watch::channel(None);
    let twosite_changed = Arc::new(Notify::new());

    // A round takes at most two API calls; a pairing pass at most a handful plus RESYNC.
    let lease_silence = Some(leadership.retry_period() + api_timeout * 2 + Duration::from_secs(30));
    let pairing_silence = Some(pairing::RESYNC + api_timeout * 6 + Duration::from_secs(30));
    // A pass makes a handful of calls per remediated node, each with its timeout.
    let remediation_silence = Some(api_timeout * 20 + Duration::from_secs(30));
    let mut tasks = JoinSet::new();
    let mut names = HashMap::new();
    let mut spawn = |name: &'static str, task: futures::future::BoxFuture<'static, Result<()>>| {
        let handle = tasks.spawn(task);
        names.insert(handle.id(), name);
    };
    spawn(
        "leader election",
        Box::pin(lease.clone().run(
            leading_tx,
            health.register("leader election", lease_silence),
        )),
    );
    spawn("node watch", {
        let (w, api, guard) = (
            Arc::clone(&watches),
            Api::<Node>::all(client.clone()),
            health.register("node watch", None),
        );
        Box::pin(async move { w.nodes(api, facts_tx, guard).await })
    });
    spawn("agent lease watch", {
        let (w, api, guard) = (
            Arc::clone(&watches),
            Api::<Lease>::namespaced(client.clone(), &args.namespace),
            health.register("agent lease watch", None),
        );
        Box::pin(async move { w.agent_leases(api, guard).await })
    });
    spawn("kubelet lease watch", {
        let (w, api, guard) = (
            Arc::clone(&watches),
            Api::<Lease>::namespaced(client.clone(), KUBELET_LEASE_NAMESPACE),
            health.register("kubelet lease watch", None),
        );
        Box::pin(async move { w.kubelet_leases(api, guard).await })
    });
    if let Some(index) = remediation_ctx.pod_index.clone() {
        let (api, guard) = (
            Api::<Pod>::all(client.clone()),
            health.register("pod watch", None),
        );
        spawn(
            "pod watch",
            Box::pin(crate::pod_index::run_pod_watch(api, index, guard)),
        );
    }
    spawn(
        "remediation",
        Box::pin(run_remediation_loop(
            remediation_ctx,
            observed,
            pairing_rx,
            view_tx,
            Arc::clone(&health),
            clock,
            health.register("remediation", remediation_silence),
        )),
    );
    // A pass makes a few writes per switching volume (and lists two kinds until the watches
    // have listed).
    let volume_silence = Some(api_timeout * 10 + Duration::from_secs(30));
    let (volume_stores, volume_watches) =
        crate::volumes::start_watches(&client, health.register("volume watches", None));
    volume_ctx.stores = Some(volume_stores);
    spawn("volume watches", volume_watches);
    spawn(
        "volumes",
        Box::pin(crate::volumes::run_volume_loop(
            volume_ctx,
            view_rx.clone(),
            volumes_tx,
            health.register("volumes", volume_silence),
        )),
    );
    if let Some((stores, watches)) = vm_watch {
        spawn("VM watches", watches);
        spawn(
            "VMs",
            Box::pin(crate::vm::run_vm_loop(
                crate::vm::VmContext {
                    client: client.clone(),
                    stores: stores.clone(),
                    recorder: vm_recorder,
                    leadership: leadership.clone(),
                    metrics: Arc::clone(&metrics),
                    api_timeout,
                    clock: Arc::clone(&vm_clock),
                    dry_run: args.dry_run,
                },
                view_rx.clone(),
                vms_tx,
                health.register("VMs", Some(api_timeout * 10 + Duration::from_secs(30))),
            )),
        );
        if args.vm.webhook_port != 0 {
            spawn(
                "VM webhook",
                Box::pin(crate::vm::webhook::run(
                    client.clone(),
                    args.namespace.clone(),
                    args.vm.clone(),
                    crate::vm::webhook::WebhookState {
                        stores,
                        view: view_rx.clone(),
                        pairing: webhook_pairing,
                        dry_run: args.dry_run,
                    },
                    api_timeout,
                )),
            );
        }
    } else {
        tracing::info!("VM protection is off (--vm-protection=false)");
    }
    spawn(
        "TwoSite watch",
        Box::pin(run_twosite_watch(
            Api::<TwoSite>::all(client.clone()),
            Arc::clone(&twosite_changed),
            health.register("TwoSite watch", None),
        )),
    );
    spawn(
        "pairing",
        Box::pin(run_pairing_loop(
            ctx,
            facts_rx,
            twosite_changed,
            leading_rx,
            health.register("pairing", pairing_silence),
        )),
    );
    if let Some(link) = witness {
        spawn(
            "witness health",
            Box::pin(link.run_health_loop(health.register(
                "witness health",
                Some(crate::witness_link::HEALTH_EVERY * 3 + crate::witness_link::CALL_TIMEOUT),
            ))),
        );
    }
    spawn(
        "admin server",
        Box::pin(admin::serve(
            listener,
            Arc::clone(&health),
            Arc::clone(&metrics),
        )),
    );

    let outcome = tokio::select! {
        joined = tasks.join_next_with_id() => Err(match joined {
            Some(Ok((id, Ok(())))) => Error::LoopEnded(names.get(&id).copied().unwrap_or("unknown")),
            Some(Ok((_, Err(err)))) => err,
            Some(Err(source)) => Error::TaskDied {
                name: names.get(&source.id()).copied().unwrap_or("unknown"),
                source,
            },
            None => Error::LoopEnded("all"),
        }),
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    };
    // Stop every loop (the pairing loop first of all: no write after this), then hand the
    // Lease back so the other replica takes over at once.
    tasks.shutdown().await;
    if let Err(err) = lease.release().await {
        tracing::warn!(error = %report(&err), "could not release the leader Lease");
    }
    outcome
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
                return;
            }
            Err(err) => tracing::warn!(error = %err, "cannot listen for SIGTERM; Ctrl-C only"),
        }
    }
    if tokio::signal::ctrl_c().await.is_err() {
        // No signal handling at all: run until a loop dies.
        std::future::pending::<()>().await;
    }
}
