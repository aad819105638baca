//! Stopping the node's HA workloads when it loses the right to run, before the watchdog reboots
//! it.

use std::future::Future;
use std::time::Duration;

/// What stops this node's HA workloads.
pub trait WorkloadStopper: Send {
    /// Stops them; failures are logged, never returned: the watchdog reboots the node anyway.
    fn stop(&mut self) -> impl Future<Output = ()> + Send;
}

/// Runs `--stop-command` through `sh -c`, with a timeout, logging its output.
#[derive(Debug, Clone)]
pub struct CommandStopper {
    command: Option<String>,
    node: String,
    timeout: Duration,
}

impl CommandStopper {
    pub fn new(command: Option<String>, node: &str, timeout: Duration) -> Self {
        CommandStopper {
            command: command.filter(|c| !c.trim().is_empty()),
            node: node.to_string(),
            timeout,
        }
    }
}

impl WorkloadStopper for CommandStopper {
    async fn stop(&mut self) {
        let Some(command) = self.command.clone() else {
            tracing::warn!(
                "no --stop-command configured: nothing stops the HA workloads before the \
                 watchdog reboots the node"
            );
            return;
        };
        tracing::warn!(%command, "stopping HA workloads");
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .env("TWOSITE_NODE", &self.node)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(self.timeout, child).await {
            Err(_) => tracing::error!(%command, timeout = ?self.timeout, "stop command timed out"),
            Ok(Err(err)) => tracing::error!(%command, error = %err, "stop command did not start"),
            Ok(Ok(out)) => {
                let stdout = String::from_utf8_lossy(&out.stdout);
                let stderr = String::from_utf8_lossy(&out.stderr);
                if out.status.success() {
                    tracing::info!(%command, %stdout, %stderr, "stop command done");
                } else {
                    tracing::error!(%command, status = %out.status, %stdout, %stderr, "stop command failed");
                }
            }
        }
    }
}
