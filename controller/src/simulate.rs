//! `twosite simulate`: run the simulated two-room cluster and report what happened.

use e2e::sim::{self, scenario};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// The scenario to run (see --list; default node-loss). With --compare: only this one.
    #[arg(long, conflicts_with = "schedules")]
    pub scenario: Option<String>,
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
    /// Run the same worlds and fault schedules under twosite and under what users run today
    /// (Kubernetes alone, Medik8s NHC + SNR, a ConfigMap lock loop) and print the times and
    /// violations side by side. Without --scenario and --schedules: the default scenarios and
    /// 1000 random schedules.
    #[arg(long)]
    pub compare: bool,
}

/// `--compare`: exit status 1 when twosite itself broke an invariant (the alternatives' breaks
/// are the comparison's findings), 2 on bad arguments, else 0.
fn compare(args: &SimulateArgs) -> ExitCode {
    use e2e::sim::compare as cmp;
    let names: Vec<String> = match (&args.scenario, args.schedules) {
        (Some(s), _) => vec![s.clone()],
        (None, Some(_)) => Vec::new(),
        (None, None) => cmp::SCENARIOS.iter().map(|s| s.to_string()).collect(),
    };
    let mut scenarios = Vec::new();
    for name in names {
        let Some(s) =
            cmp::named(&name, args.seed).filter(|s| s.name != "random" || name == "random")
        else {
            eprintln!(
                "error: unknown --scenario {name:?}; `twosite simulate --list` shows the scenarios"
            );
            return ExitCode::from(2);
        };
        scenarios.push(cmp::compare(&s, args.seed));
    }
    let schedules = match (&args.scenario, args.schedules) {
        (Some(_), _) => None,
        (None, n) => Some(cmp::compare_schedules(args.seed, n.unwrap_or(1000))),
    };
    let report = cmp::CompareReport {
        seed: args.seed,
        scenarios,
        schedules,
    };
    if let Err(code) = print_report(args.json, &report, || report.render_text()) {
        return code;
    }
    let twosite_broke = report
        .scenarios
        .iter()
        .flat_map(|s| s.policies.first())
        .any(|p| !p.violations.is_empty())
        || report
            .schedules
            .iter()
            .flatten()
            .take(1)
            .any(|p| p.failing_schedules > 0);
    if twosite_broke {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Exit status 1 when an invariant was violated, 2 on bad arguments, else 0.
pub fn main(args: SimulateArgs) -> ExitCode {
    if args.list {
        for (name, description) in scenario::NAMES {
            println!("{name:<14} {description}");
        }
        return ExitCode::SUCCESS;
    }
    if args.compare {
        return compare(&args);
    }
    let scenario = args.scenario.as_deref().unwrap_or("node-loss");
    let report = match args.schedules {
        Some(n) => sim::run_schedules(args.seed, n),
        None => match scenario::named(scenario, args.seed) {
            Some(s) => sim::run(&s, args.seed),
            None => {
                eprintln!(
                    "error: unknown --scenario {:?}; `twosite simulate --list` shows the scenarios",
                    scenario
                );
                return ExitCode::from(2);
            }
        },
    };
    if let Err(code) = print_report(args.json, &report, || report.render_text()) {
        return code;
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Prints `report` as one JSON object (`json`) or as its text; a report that cannot be encoded
/// is an error (exit status 1).
fn print_report(
    json: bool,
    report: &impl serde::Serialize,
    text: impl FnOnce() -> String,
) -> Result<(), ExitCode> {
    if json {
        match serde_json::to_string(report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: cannot encode the report: {e}");
                return Err(ExitCode::FAILURE);
            }
        }
    } else {
        print!("{}", text());
    }
    Ok(())
}
