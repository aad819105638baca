//! The `twosite` command: run the controller, simulate a two-room cluster, or run a witness.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "twosite",
    version,
    about = "High availability for Kubernetes clusters that span two server rooms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller against the cluster in the current kubeconfig or service account.
    Controller(controller::run::RunArgs),
    /// Print the TwoSite CustomResourceDefinition as YAML.
    Crd,
    /// Run the simulated two-room cluster and check the safety invariants.
    Simulate(controller::simulate::SimulateArgs),
    /// Run an app only while this consumer holds its RWX block volume's Lease (the container's
    /// entrypoint in each consumer pod).
    Guard(controller::guard::run::GuardArgs),
    /// Move a protected volume to another consumer pod and wait until it holds it.
    Switchover(controller::cli::switchover::SwitchoverArgs),
    /// Show rooms, pairs, nodes, witness, leader and every protected volume.
    Status(controller::cli::status::StatusArgs),
    /// Run a witness: the third vote that lets one room go on when the rooms lose each other.
    Witness(witness::WitnessArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate(args) => controller::simulate::main(args),
        Command::Crd => controller::run::print_crd(),
        Command::Controller(args) => controller::run::main(args),
        Command::Guard(args) => controller::guard::run::main(args),
        Command::Switchover(args) => controller::cli::switchover::main(args),
        Command::Status(args) => controller::cli::status::main(args),
        Command::Witness(args) => witness::main(args),
    }
}
