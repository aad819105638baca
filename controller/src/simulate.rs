//! `twosite simulate`: run the simulated two-room cluster and report what happened.

use e2e::sim::{self, scenario};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// The scenario to run (see --list).
    #[arg(long, default_value = "node-loss", conflicts_with = "schedules")]
    pub scenario: String,
    /// List the scenarios and exit.
    #[arg(long)]
    pub list: bool,
    /// Seed for the simulation's randomness (clock drift, delays, random schedules).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run this many random fault schedules (seeds SEED, SEED+1, ...) and summarise.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub schedules: Option<u64>,
    /// Print exactly one JSON object instead of the timeline.
    #[arg(long)]
    pub json: bool,
}

/// Exit status 1 when an invariant was violated, 2 on bad arguments, else 0.
pub fn main(args: SimulateArgs) -> ExitCode {
    if args.list {
        for (name, description) in scenario::NAMES {
            println!("{name:<14} {description}");
        }
        return ExitCode::SUCCESS;
    }
    let report = match args.schedules {
        Some(n) => sim::run_schedules(args.seed, n),
        None => match scenario::named(&args.scenario, args.seed) {
            Some(s) => sim::run(&s, args.seed),
            None => {
                eprintln!(
                    "error: unknown --scenario {:?}; `twosite simulate --list` shows the scenarios",
                    args.scenario
                );
                return ExitCode::from(2);
            }
        },
    };
    if args.json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: cannot encode the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.render_text());
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
