//! `twosite witness`: flags, start-up checks, and running the server.

use crate::error::{Error, Result, report};
use crate::grants::RoomGrants;
use crate::http::{Witness, router};
use crate::serve::{serve, tls_acceptor};
use crate::state::StateFile;
use crate::tokens::Tokens;
use node_health::witness::{WitnessConfig, valid_room};
use node_health::{Clock, SystemClock};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsAcceptor;

/// Run the witness: a server at a third site that grants one room of each cluster at a time the
/// right to run when the rooms lose each other.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "twosite-witness", version)]
pub struct WitnessArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:9443")]
    pub listen: SocketAddr,

    /// Where every cluster's highest epoch and last holder are kept (JSON; written atomically
    /// and fsynced before each new grant is answered). Keep it on a local disk and back it up:
    /// losing it risks issuing an epoch twice.
    #[arg(long)]
    pub state_file: PathBuf,

    /// One `CLUSTER_NAME TOKEN` pair per line (`#` comments): the clusters this witness serves
    /// and each one's bearer token (at least 16 characters).
    #[arg(long)]
    pub tokens_file: PathBuf,

    /// TLS certificate chain (PEM); serve HTTPS with --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve plain HTTP (bearer tokens in clear text): for tests, or behind a TLS proxy on the
    /// same host.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub insecure_http: bool,

    /// How long one grant lasts; the holder renews it by claiming again.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub grant_duration_secs: u64,

    /// How long after a grant ran out the other room may be granted: at least the holder's
    /// watchdog timeout plus a margin.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub handover_margin_secs: u64,

    /// The room that wins when both claim at the same moment (both reaching the API server, or
    /// neither).
    #[arg(long)]
    pub preferred_room: Option<String>,
}

impl WitnessArgs {
    /// The arbitration settings, or why the flags are refused.
    pub fn config(&self) -> Result<WitnessConfig> {
        if let Some(room) = &self.preferred_room
            && !valid_room(room)
        {
            return Err(Error::BadPreferredRoom(room.clone()));
        }
        Ok(WitnessConfig {
            grant_duration: Duration::from_secs(self.grant_duration_secs),
            handover_margin: Duration::from_secs(self.handover_margin_secs),
            preferred_room: self.preferred_room.clone(),
            ..WitnessConfig::default()
        })
    }

    /// Whether to serve TLS; refuses plain HTTP unless acknowledged.
    fn tls(&self) -> Result<Option<TlsAcceptor>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => tls_acceptor(cert, key).map(Some),
            (None, None) if self.insecure_http => Ok(None),
            (None, None) => Err(Error::InsecureNotAcknowledged),
            _ => Err(Error::TlsHalfConfigured),
        }
    }
}

/// Everything checked before the server starts.
struct Prepared {
    witness: Witness,
    tls: Option<TlsAcceptor>,
}

fn prepare(args: &WitnessArgs) -> Result<Prepared> {
    let tls = args.tls()?;
    let cfg = args.config()?;
    let tokens = Tokens::load(&args.tokens_file)?;
    let store = StateFile::open(&args.state_file)?;
    let clock: Arc<dyn Clock + Send + Sync> = Arc::new(SystemClock::new());
    let grants = RoomGrants::load(store, &cfg, tokens.clusters(), clock.now())?;
    if cfg.handover_margin < WitnessConfig::default().handover_margin {
        tracing::warn!(
            margin_secs = args.handover_margin_secs,
            "the hand-over margin is shorter than the default: it must cover the rooms' watchdog \
             timeout"
        );
    }
    tracing::info!(
        clusters = ?tokens.clusters().collect::<Vec<_>>(),
        state_file = %args.state_file.display(),
        grant_duration_secs = args.grant_duration_secs,
        handover_margin_secs = args.handover_margin_secs,
        preferred_room = args.preferred_room.as_deref().unwrap_or("(none)"),
        "witness state loaded"
    );
    Ok(Prepared {
        witness: Witness::new(grants, tokens, clock),
        tls,
    })
}

/// Runs the witness until SIGTERM or Ctrl-C (exit 0). Refused flags, tokens file or TLS
/// material exit 2; an unusable state file and other failures exit 1.
pub fn main(args: WitnessArgs) -> ExitCode {
    init_tracing();
    let prepared = match prepare(&args) {
        Ok(p) => p,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            return ExitCode::from(err.exit_code());
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: {}", report(&Error::Runtime(err)));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args.listen, prepared)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            ExitCode::from(err.exit_code())
        }
    }
}

async fn run(listen: SocketAddr, prepared: Prepared) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Bind {
            addr: listen,
            source,
        })?;
    let scheme = if prepared.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(%listen, scheme, "witness listening");
    serve(
        listener,
        router(prepared.witness),
        prepared.tls,
        shutdown_signal(),
    )
    .await?;
    tracing::info!("witness stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A subscriber may already be set (tests, or the `twosite` binary); keep it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    /// How the `twosite` binary wires the witness in.
    #[derive(Parser, Debug)]
    #[command(name = "twosite")]
    struct Twosite {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand, Debug)]
    enum Command {
        Witness(WitnessArgs),
    }

    #[test]
    fn wires_as_a_subcommand_with_its_defaults() {
        let cli = Twosite::try_parse_from([
            "twosite",
            "witness",
            "--state-file",
            "/s",
            "--tokens-file",
            "/t",
            "--insecure-http",
        ])
        .expect("parses");
        let Command::Witness(args) = cli.command;
        assert_eq!(args.listen, "0.0.0.0:9443".parse().expect("addr"));
        let cfg = args.config().expect("config");
        assert_eq!(cfg.grant_duration, Duration::from_secs(10));
        assert_eq!(cfg.handover_margin, Duration::from_secs(7));
        assert_eq!(cfg.preferred_room, None);
        assert!(matches!(args.tls(), Ok(None)));
    }

    #[test]
    fn refuses_flags_that_do_not_fit() {
        let base = [
            "twosite-witness",
            "--state-file",
            "/s",
            "--tokens-file",
            "/t",
        ];
        let parse =
            |extra: &[&str]| WitnessArgs::try_parse_from(base.iter().chain(extra.iter()).copied());
        let plain = parse(&[]).expect("parses");
        assert!(matches!(plain.tls(), Err(Error::InsecureNotAcknowledged)));
        assert_eq!(Error::InsecureNotAcknowledged.exit_code(), 2);
        assert!(parse(&["--insecure-http", "--tls-cert", "c", "--tls-key", "k"]).is_err());
        assert!(parse(&["--tls-cert", "c"]).is_err());
        assert!(parse(&["--grant-duration-secs", "0"]).is_err());
        let bad_room = parse(&["--preferred-room", "East Wing"]).expect("parses");
        assert!(matches!(bad_room.config(), Err(Error::BadPreferredRoom(_))));
        assert!(parse(&["--tokens-file"]).is_err());
    }
}
