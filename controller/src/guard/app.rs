//! The app the guard wraps: started in its own process group, stopped with SIGTERM and, after a
//! grace, SIGKILL to the whole group (a shell's children included), and reaped.

use std::process::ExitStatus;
use std::time::Duration;
use tokio::process::{Child, Command};

/// A running app.
#[derive(Debug)]
pub struct App {
    child: Child,
    pgid: i32,
}

impl App {
    /// Starts `argv` in `dir`'s presence (the mount point), in a new process group.
    pub fn start(argv: &[String], envs: &[(String, String)]) -> std::io::Result<App> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| std::io::Error::other("no app command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).process_group(0).kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("the app exited at once"))?;
        let pgid = i32::try_from(pid).map_err(std::io::Error::other)?;
        Ok(App { child, pgid })
    }

    /// Whether it has exited (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the app to exit on its own.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    fn signal_group(&self, signal: i32) {
        // SAFETY: kill(2) with a negative pid signals a process group we created; no memory is
        // shared.
        unsafe {
            libc::kill(-self.pgid, signal);
        }
    }

    /// `signal` (SIGTERM, or what `--stop-signal` says) to the group, SIGKILL after `grace`;
    /// returns once the app's main process is reaped and the group killed.
    pub async fn stop(mut self, signal: i32, grace: Duration) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.exited() {
            // Its children may live on in the group.
            self.signal_group(libc::SIGKILL);
            return Ok(status);
        }
        self.signal_group(signal);
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                tracing::warn!(?grace, signal, "the app did not stop in time: killing it");
                self.signal_group(libc::SIGKILL);
                self.child.wait().await?
            }
        };
        // Whatever it left behind in its group must not write either.
        self.signal_group(libc::SIGKILL);
        Ok(status)
    }
}

/// Why a `--stop-signal` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown stop signal {0:?}: use TERM, INT, QUIT, HUP, USR1 or USR2")]
pub struct UnknownSignal(pub String);

/// A stop signal by name (`TERM`, `SIGTERM`, `int`, ...): the app's own orderly shutdown
/// (PostgreSQL's fast shutdown is SIGINT; its SIGTERM waits for clients to leave).
pub fn parse_signal(name: &str) -> Result<i32, UnknownSignal> {
    let upper = name.trim().to_ascii_uppercase();
    match upper.strip_prefix("SIG").unwrap_or(&upper) {
        "TERM" => Ok(libc::SIGTERM),
        "INT" => Ok(libc::SIGINT),
        "QUIT" => Ok(libc::SIGQUIT),
        "HUP" => Ok(libc::SIGHUP),
        "USR1" => Ok(libc::SIGUSR1),
        "USR2" => Ok(libc::SIGUSR2),
        _ => Err(UnknownSignal(name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_parse_by_name_and_others_are_refused() {
        assert_eq!(parse_signal("INT"), Ok(libc::SIGINT));
        assert_eq!(parse_signal("sigterm"), Ok(libc::SIGTERM));
        assert!(parse_signal("KILL").is_err(), "no orderly stop in SIGKILL");
        assert!(parse_signal("9").is_err());
    }
}
