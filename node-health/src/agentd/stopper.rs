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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_stop_command_runs_with_the_node_name_and_a_timeout() {
        let dir = std::env::temp_dir().join(format!("twosite-stop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let marker = dir.join("stopped");
        let command = format!("echo \"$TWOSITE_NODE\" > {}", marker.display());
        CommandStopper::new(Some(command), "a-1", Duration::from_secs(5))
            .stop()
            .await;
        assert_eq!(std::fs::read_to_string(&marker).expect("ran").trim(), "a-1");

        let started = std::time::Instant::now();
        CommandStopper::new(Some("sleep 30".into()), "a-1", Duration::from_millis(200))
            .stop()
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "killed at the timeout"
        );

        // Nothing configured: returns at once.
        CommandStopper::new(None, "a-1", Duration::from_secs(5))
            .stop()
            .await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
