//! The local channel between the volume guards of this node and its agent: a unix socket on
//! the hostPath `/run/twosite` (`--guard-socket`), one JSON request and one JSON reply per line.
//!
//! Why a unix socket: it is reachable only by pods that mount that hostPath (the guards, which
//! are privileged anyway to mount the device), never over the pod or node network, and its
//! file mode (0600) keeps unprivileged processes of the node out. Who may move or clear a
//! deadline is still decided by the token each guard registers with ([`NodeDeadlines`]).
//!
//! An arm is acknowledged only after the new table is on disk (`--deadline-file`, tmpfs): an
//! agent restarted a moment later resumes enforcing it, so a guard's app never runs on a
//! deadline nobody enforces. Deadlines are judged on the boot clock, which the guard reads too.

use super::SharedCore;
use crate::time::{Clock, MonoTime};
use crate::volume::node_deadline::{DeadlineCheck, DeadlineRefusal, NodeDeadlines};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The default socket, inside the agent's hostPath.
pub const DEFAULT_GUARD_SOCKET: &str = "/run/twosite/guard.sock";
/// The default deadline file, beside the state file.
pub const DEFAULT_DEADLINE_FILE: &str = "/run/twosite/volume-deadlines.json";
/// The longest request line taken.
pub const MAX_LINE: usize = 4096;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A guard's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuardRequest {
    /// Arm or move the deadline: fence this node at `at_ms` (boot clock) + `fence_delay_ms`
    /// unless disarmed first.
    Arm {
        guard: String,
        /// base64 of the guard's random token.
        token: String,
        at_ms: u64,
        fence_delay_ms: u64,
    },
    /// The guard's app has stopped.
    Disarm { guard: String, token: String },
}

/// The agent's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl GuardReply {
    fn ok() -> Self {
        GuardReply {
            ok: true,
            error: None,
        }
    }

    fn refused(why: impl std::fmt::Display) -> Self {
        GuardReply {
            ok: false,
            error: Some(why.to_string()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeadlineFileBody {
    boot_id: String,
    deadlines: NodeDeadlines,
}

/// The deadlines of this node, shared by the socket server and the decision loop, and the file
/// they are kept in.
#[derive(Debug, Clone)]
pub struct DeadlineStore {
    inner: Arc<Mutex<NodeDeadlines>>,
    file: Option<PathBuf>,
    boot_id: String,
}

impl DeadlineStore {
    /// The store, resumed from `file` when it names this boot (anything else starts empty: a
    /// reboot cleared every app, and a file we cannot read was never acknowledged from).
    pub fn load(file: Option<&Path>, boot_id: &str) -> Self {
        let deadlines = file
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|body| serde_json::from_slice::<DeadlineFileBody>(&body).ok())
            .filter(|b| b.boot_id == boot_id)
            .map(|b| b.deadlines)
            .unwrap_or_default();
        if !deadlines.is_empty() {
            tracing::warn!(
                guards = deadlines.iter().count(),
                "resumed armed volume deadlines of this boot: enforcing them"
            );
        }
        DeadlineStore {
            inner: Arc::new(Mutex::new(deadlines)),
            file: file.map(Path::to_path_buf),
            boot_id: boot_id.to_string(),
        }
    }

    /// What the decision loop must do at `now`.
    pub fn check(&self, now: MonoTime, watchdog: Duration) -> DeadlineCheck {
        self.lock().check(now, watchdog)
    }

    pub fn snapshot(&self) -> NodeDeadlines {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NodeDeadlines> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `change` to a copy, writes the copy to the file, then makes it current: a reply
    /// is sent only for a table that an agent restart would resume.
    fn update(
        &self,
        change: impl FnOnce(&mut NodeDeadlines) -> Result<(), DeadlineRefusal>,
    ) -> Result<(), String> {
        let mut table = self.lock();
        let mut next = table.clone();
        change(&mut next).map_err(|e| e.to_string())?;
        if let Some(file) = &self.file {
            let body = DeadlineFileBody {
                boot_id: self.boot_id.clone(),
                deadlines: next.clone(),
            };
            write_file(file, &body).map_err(|e| {
                format!(
                    "cannot record the deadline in {}: {e}; refusing it (an agent restart would \
                     forget it)",
                    file.display()
                )
            })?;
        }
        *table = next;
        Ok(())
    }
}

fn write_file(path: &Path, body: &DeadlineFileBody) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let temp = dir.join(format!(".volume-deadlines.{}.tmp", std::process::id()));
    let bytes = serde_json::to_vec(body).map_err(std::io::Error::other)?;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&temp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// What the server needs of the agent.
#[derive(Clone)]
pub struct GuardContext {
    pub store: DeadlineStore,
    pub core: SharedCore,
    pub clock: Arc<dyn Clock + Send + Sync>,
    /// The watchdog resets the node when not fed (false with `--no-watchdog`).
    pub watchdog_fences: bool,
}

impl GuardContext {
    /// Handles one request.
    pub fn handle(&self, request: GuardRequest) -> GuardReply {
        let decode = |t: &str| base64::engine::general_purpose::STANDARD.decode(t.trim());
        let result = match request {
            GuardRequest::Arm {
                guard,
                token,
                at_ms,
                fence_delay_ms,
            } => match decode(&token) {
                Err(_) => Err("the token is not base64".to_string()),
                Ok(token) => {
                    let (watchdog, enforceable) = {
                        let core = self.core.lock();
                        let fences = self.watchdog_fences
                            && core.is_armed()
                            && !core.is_watchdog_failed()
                            && !core.is_lost();
                        (core.timing().watchdog, fences)
                    };
                    let now = self.clock.now();
                    self.store.update(|t| {
                        t.arm(
                            &guard,
                            &token,
                            MonoTime(at_ms),
                            Duration::from_millis(fence_delay_ms),
                            now,
                            watchdog,
                            enforceable,
                        )
                    })
                }
            },
            GuardRequest::Disarm { guard, token } => match decode(&token) {
                Err(_) => Err("the token is not base64".to_string()),
                Ok(token) => self.store.update(|t| t.disarm(&guard, &token)),
            },
        };
        match result {
            Ok(()) => GuardReply::ok(),
            Err(why) => GuardReply::refused(why),
        }
    }
}

/// Binds the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves guards until the listener fails.
pub async fn serve(listener: UnixListener, ctx: GuardContext) -> super::error::Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(error = %err, "guard socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(err) = serve_one(stream, &ctx).await {
                tracing::debug!(error = %err, "guard socket: connection ended");
            }
        });
    }
}

async fn serve_one(stream: UnixStream, ctx: &GuardContext) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    // Enough for a long-lived guard's requests (one per renewal) for days; it reconnects after
    // an idle timeout anyway.
    let mut lines = BufReader::new(read.take(64 * 1024 * 1024));
    loop {
        let mut line = Vec::new();
        let n = match tokio::time::timeout(READ_TIMEOUT, lines.read_until(b'\n', &mut line)).await {
            Ok(r) => r?,
            // An idle connection is closed; the guard reconnects.
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        let reply = if line.len() > MAX_LINE || !line.ends_with(b"\n") {
            let reply =
                GuardReply::refused(format!("a request is one line of at most {MAX_LINE} bytes"));
            send(&mut write, &reply).await?;
            return Ok(());
        } else {
            match serde_json::from_slice::<GuardRequest>(&line) {
                Ok(request) => {
                    let guard = match &request {
                        GuardRequest::Arm { guard, .. } | GuardRequest::Disarm { guard, .. } => {
                            guard.clone()
                        }
                    };
                    let reply = ctx.handle(request);
                    if let Some(why) = &reply.error {
                        tracing::warn!(guard, why, "refused a guard's request");
                    }
                    reply
                }
                Err(err) => GuardReply::refused(format!("malformed request: {err}")),
            }
        };
        send(&mut write, &reply).await?;
    }
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &GuardReply,
) -> std::io::Result<()> {
    let mut body = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    body.push(b'\n');
    write.write_all(&body).await
}

/// A guard's side of the channel.
#[derive(Debug, Clone)]
pub struct GuardClient {
    socket: PathBuf,
    guard: String,
    token: String,
    timeout: Duration,
}

/// Why a request to the agent did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum GuardClientError {
    #[error("cannot reach the node agent at {socket}: {source}")]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the node agent's answer is malformed: {0}")]
    Malformed(String),
    #[error("the node agent refused: {0}")]
    Refused(String),
}

impl GuardClient {
    /// A client that registers with a fresh random token.
    pub fn new(socket: &Path, guard: &str, timeout: Duration) -> Result<Self, GuardClientError> {
        let mut token = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut token)
            .map_err(|_| GuardClientError::Refused("no randomness for the guard's token".into()))?;
        Ok(GuardClient {
            socket: socket.to_path_buf(),
            guard: guard.to_string(),
            token: base64::engine::general_purpose::STANDARD.encode(token),
            timeout,
        })
    }

    pub async fn arm(&self, at: MonoTime, fence_delay: Duration) -> Result<(), GuardClientError> {
        self.send(GuardRequest::Arm {
            guard: self.guard.clone(),
            token: self.token.clone(),
            at_ms: at.as_millis(),
            fence_delay_ms: u64::try_from(fence_delay.as_millis()).unwrap_or(u64::MAX),
        })
        .await
    }

    pub async fn disarm(&self) -> Result<(), GuardClientError> {
        self.send(GuardRequest::Disarm {
            guard: self.guard.clone(),
            token: self.token.clone(),
        })
        .await
    }

    async fn send(&self, request: GuardRequest) -> Result<(), GuardClientError> {
        let exchange = async {
            let mut stream = UnixStream::connect(&self.socket).await.map_err(|source| {
                GuardClientError::Unreachable {
                    socket: self.socket.clone(),
                    source,
                }
            })?;
            let mut body = serde_json::to_vec(&request)
                .map_err(|e| GuardClientError::Malformed(e.to_string()))?;
            body.push(b'\n');
            let io = |source| GuardClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            };
            stream.write_all(&body).await.map_err(io)?;
            let mut line = Vec::new();
            BufReader::new(stream.take(MAX_LINE as u64))
                .read_until(b'\n', &mut line)
                .await
                .map_err(io)?;
            serde_json::from_slice::<GuardReply>(&line)
                .map_err(|e| GuardClientError::Malformed(e.to_string()))
        };
        let reply = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| GuardClientError::Timeout(self.timeout))??;
        if reply.ok {
            Ok(())
        } else {
            Err(GuardClientError::Refused(
                reply.error.unwrap_or_else(|| "no reason given".into()),
            ))
        }
    }
}

/// Says that a deadline passed (the decision loop calls it once per passing).
pub fn log_overdue(check: &DeadlineCheck) {
    if !check.overdue.is_empty() {
        tracing::error!(
            guards = ?check.overdue,
            "a volume guard's fence deadline passed before its app was reported stopped: \
             stopping the HA workloads and rebooting this node now"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentCore;
    use crate::verdict::HealthTiming;

    /// A clock the test sets.
    struct At(Mutex<MonoTime>);
    impl Clock for At {
        fn now(&self) -> MonoTime {
            *self.0.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }

    fn context(dir: &Path, armed: bool) -> GuardContext {
        let mut core = AgentCore::new("a-1", "room-a", HealthTiming::default());
        if armed {
            core.renewal_succeeded(MonoTime(0));
            assert!(core.tick(MonoTime(0)).armed);
        }
        GuardContext {
            store: DeadlineStore::load(Some(&dir.join("deadlines.json")), "boot-1"),
            core: SharedCore::new(core),
            clock: Arc::new(At(Mutex::new(MonoTime(0)))),
            watchdog_fences: true,
        }
    }

    async fn ask(socket: &Path, line: &[u8]) -> GuardReply {
        let mut s = UnixStream::connect(socket).await.expect("connect");
        s.write_all(line).await.expect("send");
        let mut reply = Vec::new();
        BufReader::new(s)
            .read_until(b'\n', &mut reply)
            .await
            .expect("reply");
        serde_json::from_slice(&reply).expect("a reply")
    }

    #[tokio::test]
    async fn a_guard_arms_moves_and_clears_its_deadline_and_nobody_else_can() {
        let dir = tempfile::tempdir().expect("dir");
        let socket = dir.path().join("guard.sock");
        let ctx = context(dir.path(), true);
        let store = ctx.store.clone();
        let server = tokio::spawn(serve(bind(&socket).expect("bind"), ctx));
        let guard =
            GuardClient::new(&socket, "apps/db/uid-a", Duration::from_secs(1)).expect("client");
        guard
            .arm(MonoTime(10_000), Duration::from_secs(1))
            .await
            .expect("armed");
        assert_eq!(
            store.snapshot().get("apps/db/uid-a").map(|d| d.at),
            Some(MonoTime(10_000))
        );
        // Persisted before the reply: a restarted agent enforces it.
        let resumed = DeadlineStore::load(Some(&dir.path().join("deadlines.json")), "boot-1");
        assert_eq!(resumed.snapshot(), store.snapshot());
        // Another boot's file is not resumed.
        assert!(
            DeadlineStore::load(Some(&dir.path().join("deadlines.json")), "boot-2")
                .snapshot()
                .is_empty()
        );

        // Another process with its own token cannot move or clear it.
        let forger =
            GuardClient::new(&socket, "apps/db/uid-a", Duration::from_secs(1)).expect("client");
        assert!(matches!(
            forger.disarm().await,
            Err(GuardClientError::Refused(why)) if why.contains("another token")
        ));
        assert!(
            forger
                .arm(MonoTime(60_000), Duration::from_secs(1))
                .await
                .is_err()
        );
        assert_eq!(
            store.snapshot().get("apps/db/uid-a").map(|d| d.at),
            Some(MonoTime(10_000))
        );

        // Bad input gets a clear refusal, never a crash.
        let reply = ask(&socket, b"{\"op\":\"arm\",\"guard\":\"x\"}\n").await;
        assert!(
            !reply.ok
                && reply
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("malformed"))
        );
        let reply = ask(
            &socket,
            b"{\"op\":\"disarm\",\"guard\":\"x\",\"token\":\"***\"}\n",
        )
        .await;
        assert!(!reply.ok && reply.error.as_deref().is_some_and(|e| e.contains("base64")));
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.push(b'\n');
        let reply = ask(&socket, &long).await;
        assert!(
            !reply.ok
                && reply
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("one line"))
        );

        guard.disarm().await.expect("disarmed");
        assert!(store.snapshot().is_empty());
        assert!(!server.is_finished(), "the server survives bad input");
        server.abort();
    }

    #[tokio::test]
    async fn an_agent_that_cannot_fence_refuses_every_deadline() {
        let dir = tempfile::tempdir().expect("dir");
        let socket = dir.path().join("guard.sock");
        // Not armed yet: its watchdog is not running, nothing would reset the node.
        let ctx = context(dir.path(), false);
        let server = tokio::spawn(serve(bind(&socket).expect("bind"), ctx));
        let guard =
            GuardClient::new(&socket, "apps/db/uid-a", Duration::from_secs(1)).expect("client");
        assert!(matches!(
            guard.arm(MonoTime(10_000), Duration::from_secs(1)).await,
            Err(GuardClientError::Refused(why)) if why.contains("cannot enforce")
        ));
        server.abort();
        // No agent at all: the guard is told so (and does not start its app).
        let gone = GuardClient::new(&dir.path().join("none.sock"), "g", Duration::from_secs(1))
            .expect("client");
        assert!(matches!(
            gone.arm(MonoTime(10_000), Duration::from_secs(1)).await,
            Err(GuardClientError::Unreachable { .. })
        ));
    }
}
