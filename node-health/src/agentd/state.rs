//! The agent's state file: what one agent process leaves to the next agent process of the same
//! boot, so that a restart (a DaemonSet rolling update, a crash, an OOM kill) hands the right to
//! run over instead of rebooting the node.
//!
//! The decision loop saves the core's [`Handover`] whenever it changes — a successful renewal,
//! the latched loss, the fence marker, a failed watchdog, contact with the other room — through
//! a [`StateRecorder`]; in the agent a separate task writes it ([`run_state_writer`]) so a slow
//! file system never delays a watchdog feed. Each write is atomic (temp file, fsync, rename).
//! At start the agent reads it once ([`load`]) and, when it is this boot's and this node's,
//! resumes its core from it ([`resume_core`]) before anything slow happens.
//!
//! Instants are stored on the boot clock ([`BootClock`], CLOCK_BOOTTIME), which keeps counting
//! across processes and suspend, always rounded to the earlier side: the inherited right to run
//! never ends later than it would have for the process that wrote the file. The file belongs on
//! tmpfs (`/run`), which a reboot clears; it also names its boot ID. Anything unusable — a
//! missing, unreadable, oversized, corrupt or foreign file — is logged and ignored: the agent
//! then starts as a new one would, which is always safe (the watchdog the previous process armed
//! reboots the node unless this one renews in time).

use super::error::report;
use crate::agent::{AgentCore, Handover, LossReason, ResumeState, Resumed};
use crate::time::{Clock, MonoTime};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Where the agent keeps its state by default (tmpfs: a reboot clears it).
pub const DEFAULT_STATE_FILE: &str = "/run/twosite/agent-state.json";
/// The format this agent reads and writes; a file of another version is ignored.
pub const FORMAT_VERSION: u32 = 1;
/// The largest state file read (a real one is well under 1 KiB).
const MAX_SIZE: u64 = 64 * 1024;

/// CLOCK_BOOTTIME in milliseconds: the same for every process of one boot, counting suspend.
/// The agent's own clock too: instants in the state file need no conversion, and a node that
/// wakes from suspend does not believe a lease that ran out while it slept still holds.
#[derive(Debug, Clone, Copy)]
pub struct BootClock(());

impl BootClock {
    /// The clock, once it has been read successfully (the agent does not start without it).
    pub fn new() -> std::io::Result<Self> {
        since_boot().map(|_| BootClock(()))
    }
}

impl Clock for BootClock {
    fn now(&self) -> MonoTime {
        match since_boot() {
            Ok(d) => MonoTime(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            // It was read at start, so the kernel cannot refuse it now. Should it anyway, no
            // reading is safe to return (too early extends every right, too late grants one
            // forever): the agent stops, and the watchdog reboots the node.
            Err(err) => panic!("CLOCK_BOOTTIME can no longer be read: {err}"),
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
const BOOT_CLOCK_ID: libc::clockid_t = libc::CLOCK_BOOTTIME;
// Elsewhere (development only; the agent runs on Linux) the monotonic clock, which does not
// count suspend.
#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
const BOOT_CLOCK_ID: libc::clockid_t = libc::CLOCK_MONOTONIC;

#[cfg(unix)]
fn since_boot() -> std::io::Result<Duration> {
    let mut ts = std::mem::MaybeUninit::<libc::timespec>::uninit();
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    if unsafe { libc::clock_gettime(BOOT_CLOCK_ID, ts.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful call above.
    let ts = unsafe { ts.assume_init() };
    let secs = u64::try_from(ts.tv_sec).map_err(std::io::Error::other)?;
    let nanos = u32::try_from(ts.tv_nsec).map_err(std::io::Error::other)?;
    Ok(Duration::new(secs, nanos))
}

#[cfg(not(unix))]
fn since_boot() -> std::io::Result<Duration> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "no boot clock on this platform",
    ))
}

/// A state file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("could not read the state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the state file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("the state file {path} is larger than {MAX_SIZE} bytes")]
    TooLarge { path: PathBuf },
    #[error("the state file {path} is not a valid agent state")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not write the state file {path}: {what}")]
    Write {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Why a state file that could be read is not inherited.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotInherited {
    #[error("it has format version {found}; this agent reads version {FORMAT_VERSION}")]
    Version { found: u32 },
    #[error("it was written in another boot ({found})")]
    OtherBoot { found: String },
    #[error("it was written for node {found}")]
    OtherNode { found: String },
    #[error("its instants lie after the boot clock's now, so it was not written in this boot")]
    FromTheFuture,
}

/// Which agent a state file belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateIdentity {
    pub boot_id: String,
    pub node: String,
    /// The node's room: a resuming agent needs it before it can ask the API server.
    pub room: String,
}

/// A witness grant in the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedGrant {
    pub epoch: u64,
    pub until_boot_ms: u64,
}

/// The state file's contents (JSON). Instants are milliseconds of the boot clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    pub boot_id: String,
    pub node: String,
    pub room: String,
    pub written_at_boot_ms: u64,
    // Required although optional: a file that does not say must never read as "not lost".
    #[serde(deserialize_with = "Option::deserialize")]
    pub renewed_at_boot_ms: Option<u64>,
    pub armed: bool,
    #[serde(deserialize_with = "Option::deserialize")]
    pub lost: Option<LossReason>,
    pub fence_marker: bool,
    pub watchdog_failed: bool,
    pub renew_failures: u32,
    #[serde(deserialize_with = "Option::deserialize")]
    pub other_room_seen_at_boot_ms: Option<u64>,
    pub other_room_heard: bool,
    #[serde(deserialize_with = "Option::deserialize")]
    pub witness_grant: Option<SavedGrant>,
}

impl SavedState {
    /// `handover`, taken at `now` on the agent's clock, with its instants on the boot clock,
    /// which read `boot_now` no later than `now` was read: every instant lands on its earlier
    /// side (exact when both are the same clock, as in the agent).
    pub fn capture(
        id: &StateIdentity,
        handover: &Handover,
        now: MonoTime,
        boot_now: MonoTime,
    ) -> Self {
        let relative = handover.at(now);
        let before = |ago: Duration| {
            u64::try_from(ago.as_millis())
                .ok()
                .and_then(|ago| boot_now.0.checked_sub(ago))
        };
        SavedState {
            version: FORMAT_VERSION,
            boot_id: id.boot_id.clone(),
            node: id.node.clone(),
            room: id.room.clone(),
            written_at_boot_ms: boot_now.0,
            renewed_at_boot_ms: relative.renewed_ago.and_then(before),
            armed: relative.armed,
            lost: relative.lost,
            fence_marker: relative.fence_marker,
            watchdog_failed: relative.watchdog_failed,
            renew_failures: relative.renew_failures,
            other_room_seen_at_boot_ms: relative.other_room_seen_ago.and_then(before),
            other_room_heard: relative.other_room_heard,
            witness_grant: relative.grant.map(|(epoch, left)| SavedGrant {
                epoch,
                until_boot_ms: boot_now
                    .0
                    .saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX)),
            }),
        }
    }

    /// Whether this state is this boot's and this node's, in a format this agent reads.
    pub fn belongs_to(&self, boot_id: &str, node: &str) -> Result<(), NotInherited> {
        if self.version != FORMAT_VERSION {
            return Err(NotInherited::Version {
                found: self.version,
            });
        }
        if self.boot_id != boot_id {
            return Err(NotInherited::OtherBoot {
                found: self.boot_id.clone(),
            });
        }
        if self.node != node {
            return Err(NotInherited::OtherNode {
                found: self.node.clone(),
            });
        }
        Ok(())
    }

    /// What a new process inherits when the boot clock reads `boot_now` (read *after* the new
    /// core's `now`): elapsed times rounded up, what is left of a grant rounded down.
    pub fn inherit(&self, boot_now: MonoTime) -> Result<ResumeState, NotInherited> {
        let past = [self.renewed_at_boot_ms, self.other_room_seen_at_boot_ms];
        if self.written_at_boot_ms > boot_now.0
            || past.iter().flatten().any(|t| *t > self.written_at_boot_ms)
        {
            return Err(NotInherited::FromTheFuture);
        }
        // The boot clock is read in whole milliseconds, up to 1 ms behind: count 1 ms more.
        let now_ms = boot_now.0.saturating_add(1);
        let ago = |t: u64| Duration::from_millis(now_ms - t);
        Ok(ResumeState {
            renewed_ago: self.renewed_at_boot_ms.map(ago),
            armed: self.armed,
            lost: self.lost.clone(),
            fence_marker: self.fence_marker,
            watchdog_failed: self.watchdog_failed,
            renew_failures: self.renew_failures,
            other_room_seen_ago: self.other_room_seen_at_boot_ms.map(ago),
            other_room_heard: self.other_room_heard,
            grant: self.witness_grant.and_then(|g| {
                (g.until_boot_ms > now_ms)
                    .then(|| (g.epoch, Duration::from_millis(g.until_boot_ms - now_ms)))
            }),
        })
    }
}

/// The state file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; `Ok(None)` when there is no file. Never blocks on a FIFO or reads more
    /// than [`MAX_SIZE`].
    pub fn read(&self) -> Result<Option<SavedState>, StateError> {
        let path = || self.path.clone();
        let mut options = std::fs::OpenOptions::new();
        options.read(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Opening a FIFO for reading would wait for a writer.
            options.custom_flags(libc::O_NONBLOCK);
        }
        let mut file = match options.open(&self.path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Read {
                    path: path(),
                    source,
                });
            }
        };
        let meta = file.metadata().map_err(|source| StateError::Read {
            path: path(),
            source,
        })?;
        if !meta.is_file() {
            return Err(StateError::NotAFile { path: path() });
        }
        if meta.len() > MAX_SIZE {
            return Err(StateError::TooLarge { path: path() });
        }
        let mut body = Vec::new();
        (&mut file)
            .take(MAX_SIZE + 1)
            .read_to_end(&mut body)
            .map_err(|source| StateError::Read {
                path: path(),
                source,
            })?;
        if u64::try_from(body.len()).unwrap_or(u64::MAX) > MAX_SIZE {
            return Err(StateError::TooLarge { path: path() });
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|source| StateError::Parse {
                path: path(),
                source,
            })
    }

    /// Replaces the file atomically: a temp file in the same directory, fsync, rename. A reader
    /// (or a crash) sees the old state or the new one, never a mix.
    pub fn write(&self, state: &SavedState) -> Result<(), StateError> {
        let fail = |path: &Path, what| {
            let path = path.to_path_buf();
            move |source| StateError::Write { path, what, source }
        };
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(fail(dir, "could not create its directory"))?;
        let mut body = serde_json::to_vec_pretty(state)
            .map_err(std::io::Error::other)
            .map_err(fail(&self.path, "could not encode it"))?;
        body.push(b'\n');
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "agent-state".to_string());
        // The process ID keeps two agents (a test harness's) from sharing a temp file.
        let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let written = write_synced(&temp, &body)
            .map_err(fail(&temp, "could not write the temp file"))
            .and_then(|()| {
                std::fs::rename(&temp, &self.path).map_err(fail(&self.path, "could not rename"))
            });
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written
    }
}

fn write_synced(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(body)?;
    file.sync_all()
}

/// Where a [`StateRecorder`] puts each new state.
pub trait StateSink: Send {
    fn save(&mut self, state: &SavedState);
}

/// Hands the state to [`run_state_writer`]; never blocks, and only the newest state is kept.
impl StateSink for watch::Sender<Option<SavedState>> {
    fn save(&mut self, state: &SavedState) {
        self.send_replace(Some(state.clone()));
    }
}

/// Writes at once, in the caller's thread (tests; the agent uses [`run_state_writer`]).
impl StateSink for StateFile {
    fn save(&mut self, state: &SavedState) {
        if let Err(err) = self.write(state) {
            tracing::warn!(error = %report(&err), "cannot write the state file");
        }
    }
}

/// Turns the core's [`Handover`] into a [`SavedState`] whenever it changes.
pub struct StateRecorder {
    identity: StateIdentity,
    clock: Arc<dyn Clock + Send + Sync>,
    boot: Arc<dyn Clock + Send + Sync>,
    sink: Box<dyn StateSink>,
    last: Option<Handover>,
}

impl StateRecorder {
    /// `clock` is the core's clock, `boot` the boot clock (the same [`BootClock`] in the agent).
    pub fn new(
        identity: StateIdentity,
        clock: Arc<dyn Clock + Send + Sync>,
        boot: Arc<dyn Clock + Send + Sync>,
        sink: impl StateSink + 'static,
    ) -> Self {
        StateRecorder {
            identity,
            clock,
            boot,
            sink: Box::new(sink),
            last: None,
        }
    }

    /// Saves `handover` unless it is the one saved last.
    pub fn record(&mut self, handover: Handover) {
        if self.last.as_ref() == Some(&handover) {
            return;
        }
        // The boot clock first: instants converted with it then land on their earlier side.
        let boot_now = self.boot.now();
        let now = self.clock.now();
        let state = SavedState::capture(&self.identity, &handover, now, boot_now);
        self.sink.save(&state);
        self.last = Some(handover);
    }
}

/// Writes each new state from `latest` until its sender is gone. A write that fails is logged
/// (once until one succeeds again) and changes nothing else: the next agent process then
/// inherits an older state, or none, which only shortens what it inherits.
pub async fn run_state_writer(
    file: StateFile,
    mut latest: watch::Receiver<Option<SavedState>>,
) -> super::error::Result<()> {
    let mut failing = false;
    while latest.changed().await.is_ok() {
        let Some(state) = latest.borrow_and_update().clone() else {
            continue;
        };
        let target = file.clone();
        let written = tokio::task::spawn_blocking(move || target.write(&state)).await;
        match written {
            Ok(Ok(())) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(file = %file.path().display(), "state file written again");
                }
            }
            Ok(Err(err)) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(
                        error = %report(&err),
                        "cannot write the state file: a restarted agent cannot take over from \
                         this one, and the node reboots when it restarts"
                    );
                }
            }
            Err(join) => tracing::warn!(error = %join, "the state file writer failed"),
        }
    }
    Ok(())
}

/// The state the previous agent process of this boot left for `node`, if any and usable;
/// anything else is logged and ignored.
pub fn load(file: &StateFile, boot_id: &str, node: &str) -> Option<SavedState> {
    let saved = match file.read() {
        Ok(Some(saved)) => saved,
        Ok(None) => {
            tracing::info!(
                file = %file.path().display(),
                "no state file: starting as the first agent of this boot"
            );
            return None;
        }
        Err(err) => {
            tracing::warn!(
                error = %report(&err),
                "ignoring the state file: starting as the first agent of this boot"
            );
            return None;
        }
    };
    match saved.belongs_to(boot_id, node) {
        Ok(()) => Some(saved),
        Err(why) => {
            tracing::info!(
                file = %file.path().display(),
                reason = %why,
                "ignoring the state file: starting as the first agent of this boot"
            );
            None
        }
    }
}

/// Resumes `core` (new, its witness setting made) from `saved` at the current time of `clock`;
/// `boot` is the boot clock. `None` when the state's instants do not fit this boot (logged; the
/// core is left as new).
pub fn resume_core(
    core: &mut AgentCore,
    saved: &SavedState,
    clock: &dyn Clock,
    boot: &dyn Clock,
) -> Option<Resumed> {
    // The core's clock first, the boot clock second: elapsed times then come out no shorter
    // than they are at `now`.
    let now = clock.now();
    let boot_now = boot.now();
    match saved.inherit(boot_now) {
        Ok(previous) => Some(core.resume(&previous, now)),
        Err(why) => {
            tracing::warn!(reason = %why, "ignoring the state file: starting as the first agent of this boot");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agentd::fake::FakeClock;
    use crate::{HealthTiming, RunBasis};

    fn identity() -> StateIdentity {
        StateIdentity {
            boot_id: "boot-1".into(),
            node: "a-1".into(),
            room: "room-a".into(),
        }
    }

    fn saved() -> SavedState {
        let mut a = AgentCore::new("a-1", "room-a", HealthTiming::default());
        a.renewal_succeeded(MonoTime(10_000));
        a.tick(MonoTime(10_000));
        a.renewal_failed();
        a.observe_other_room(MonoTime(9_000));
        a.witness_granted(MonoTime(10_500), 3, Duration::from_secs(10));
        // A's clock reads 11 s when the boot clock reads 61 s.
        SavedState::capture(
            &identity(),
            &a.handover(),
            MonoTime(11_000),
            MonoTime(61_000),
        )
    }

    #[test]
    fn capture_puts_instants_on_the_boot_clock() {
        let s = saved();
        assert_eq!(s.written_at_boot_ms, 61_000);
        assert_eq!(s.renewed_at_boot_ms, Some(60_000));
        assert_eq!(s.other_room_seen_at_boot_ms, Some(60_000), "armed at 10 s");
        assert_eq!(
            s.witness_grant,
            Some(SavedGrant {
                epoch: 3,
                until_boot_ms: 70_400
            })
        );
        assert!(s.armed && s.lost.is_none() && !s.fence_marker && !s.watchdog_failed);
        assert_eq!(s.renew_failures, 1);
        assert_eq!(s.room, "room-a");
    }

    #[test]
    fn the_state_file_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::new(dir.path().join("sub/agent-state.json"));
        assert_eq!(file.read().expect("no file is no error"), None);
        let mut state = saved();
        file.write(&state).expect("write");
        assert_eq!(file.read().expect("read"), Some(state.clone()));
        state.lost = Some(LossReason::FenceMarker);
        state.watchdog_failed = true;
        file.write(&state).expect("write again");
        assert_eq!(file.read().expect("read"), Some(state));
        // Atomic: only the state file is left, no temp file.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["agent-state.json"]);
    }

    #[test]
    fn a_failed_write_leaves_the_previous_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent-state.json");
        let file = StateFile::new(&path);
        let state = saved();
        file.write(&state).expect("write");
        // A directory where the temp file would go: the write fails, the old state stays whole.
        let temp = dir
            .path()
            .join(format!(".agent-state.json.{}.tmp", std::process::id()));
        std::fs::create_dir(&temp).expect("mkdir");
        let newer = SavedState {
            lost: Some(LossReason::LeaseExpired),
            ..state.clone()
        };
        assert!(file.write(&newer).is_err());
        assert_eq!(file.read().expect("read"), Some(state));
    }

    #[test]
    fn unusable_files_are_errors_or_refusals_never_a_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent-state.json");
        let file = StateFile::new(&path);
        for body in [
            &b""[..],
            b"{",
            b"null",
            b"\xff\xfe",
            br#"{"version": 1}"#,
            // Every field but `lost`: a file that does not say is not "not lost".
            br#"{"version":1,"boot_id":"boot-1","node":"a-1","room":"room-a",
                "written_at_boot_ms":5,"renewed_at_boot_ms":4,"armed":true,"fence_marker":false,
                "watchdog_failed":false,"renew_failures":0,"other_room_seen_at_boot_ms":null,
                "other_room_heard":false,"witness_grant":null}"#,
        ] {
            std::fs::write(&path, body).expect("write");
            assert!(
                matches!(file.read(), Err(StateError::Parse { .. })),
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(load(&file, "boot-1", "a-1"), None);
        }
        std::fs::write(&path, vec![b' '; 70_000]).expect("write");
        assert!(matches!(file.read(), Err(StateError::TooLarge { .. })));
        std::fs::remove_file(&path).expect("rm");
        std::fs::create_dir(&path).expect("mkdir");
        assert!(matches!(file.read(), Err(StateError::NotAFile { .. })));
        assert_eq!(load(&file, "boot-1", "a-1"), None);
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_in_place_of_the_state_file_does_not_hang_the_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent-state.json");
        let c_path = std::ffi::CString::new(path.to_str().expect("utf-8")).expect("c string");
        // SAFETY: mkfifo reads a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            StateFile::new(&path).read(),
            Err(StateError::NotAFile { .. })
        ));
    }

    #[test]
    fn another_boot_node_or_version_is_not_inherited() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::new(dir.path().join("agent-state.json"));
        let state = saved();
        file.write(&state).expect("write");
        assert_eq!(load(&file, "boot-1", "a-1"), Some(state.clone()));
        assert_eq!(load(&file, "boot-2", "a-1"), None);
        assert_eq!(
            state.belongs_to("boot-2", "a-1"),
            Err(NotInherited::OtherBoot {
                found: "boot-1".into()
            })
        );
        assert_eq!(load(&file, "boot-1", "a-2"), None);
        file.write(&SavedState {
            version: 2,
            ..state
        })
        .expect("write");
        assert_eq!(load(&file, "boot-1", "a-1"), None);
    }

    #[test]
    fn instants_after_the_boot_clocks_now_are_not_inherited() {
        let state = saved();
        assert_eq!(
            state.inherit(MonoTime(60_999)),
            Err(NotInherited::FromTheFuture)
        );
        let forged = SavedState {
            renewed_at_boot_ms: Some(62_000),
            ..state.clone()
        };
        assert_eq!(
            forged.inherit(MonoTime(70_000)),
            Err(NotInherited::FromTheFuture)
        );
        assert!(state.inherit(MonoTime(61_000)).is_ok());
    }

    #[test]
    fn inheriting_rounds_elapsed_time_up_and_what_is_left_down() {
        let previous = saved().inherit(MonoTime(64_000)).expect("inherited");
        assert_eq!(previous.renewed_ago, Some(Duration::from_millis(4_001)));
        assert_eq!(
            previous.other_room_seen_ago,
            Some(Duration::from_millis(4_001))
        );
        assert_eq!(previous.grant, Some((3, Duration::from_millis(6_399))));
        assert_eq!(previous.renew_failures, 1);
        assert!(previous.armed);
        let gone = saved().inherit(MonoTime(70_399)).expect("inherited");
        assert_eq!(gone.grant, None, "a grant that has ended is not inherited");
    }

    #[test]
    fn resuming_places_inherited_instants_on_the_new_clock() {
        // B's clock has another origin than the boot clock.
        let clock = FakeClock::new();
        clock.set(MonoTime(100_000));
        let boot = FakeClock::new();
        boot.set(MonoTime(64_000));
        let mut b = AgentCore::new("a-1", "room-a", HealthTiming::default());
        let resumed = resume_core(&mut b, &saved(), &clock, &boot);
        assert_eq!(resumed, Some(Resumed::Running(RunBasis::Lease)));
        // Renewed 4 s (and 1 ms, for the whole-millisecond boot clock) before B's now.
        assert_eq!(b.last_renewal(), Some(MonoTime(95_999)));
        // A state from the future leaves the core as new.
        let mut c = AgentCore::new("a-1", "room-a", HealthTiming::default());
        boot.set(MonoTime(60_000));
        assert_eq!(resume_core(&mut c, &saved(), &clock, &boot), None);
        assert_eq!(c.last_renewal(), None);
    }

    #[tokio::test]
    async fn the_writer_task_writes_the_newest_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::new(dir.path().join("agent-state.json"));
        let (mut tx, rx) = watch::channel(None);
        let writer = tokio::spawn(run_state_writer(file.clone(), rx));
        let state = saved();
        tx.save(&state);
        drop(tx);
        writer.await.expect("joined").expect("ended");
        assert_eq!(file.read().expect("read"), Some(state));
    }

    #[test]
    fn the_recorder_saves_only_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::new(dir.path().join("agent-state.json"));
        let clock = FakeClock::new();
        clock.set(MonoTime(11_000));
        let boot = FakeClock::new();
        boot.set(MonoTime(61_000));
        let mut recorder = StateRecorder::new(
            identity(),
            Arc::new(clock.clone()),
            Arc::new(boot.clone()),
            file.clone(),
        );
        let mut a = AgentCore::new("a-1", "room-a", HealthTiming::default());
        a.renewal_succeeded(MonoTime(10_000));
        recorder.record(a.handover());
        let first = file.read().expect("read").expect("written");
        assert_eq!(first.renewed_at_boot_ms, Some(60_000));
        clock.advance(Duration::from_secs(1));
        boot.advance(Duration::from_secs(1));
        recorder.record(a.handover());
        assert_eq!(
            file.read().expect("read"),
            Some(first),
            "unchanged: not rewritten"
        );
        assert!(a.tick(MonoTime(12_000)).armed);
        recorder.record(a.handover());
        let armed = file.read().expect("read").expect("written");
        assert!(armed.armed && armed.written_at_boot_ms == 62_000);
    }

    #[test]
    fn the_boot_clock_counts_from_boot() {
        let clock = BootClock::new().expect("CLOCK_BOOTTIME");
        let a = clock.now();
        std::thread::sleep(Duration::from_millis(20));
        let b = clock.now();
        assert!(b.since(a) >= Duration::from_millis(20), "{a:?} {b:?}");
        assert!(a > MonoTime::ZERO);
    }
}
