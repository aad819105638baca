//! `twosite-agent`: the node agent (heartbeat Lease, watchdog, partner probes, self-fencing).

use clap::Parser;

fn main() -> std::process::ExitCode {
    node_health::agentd::cli::main(node_health::agentd::cli::Args::parse())
}
