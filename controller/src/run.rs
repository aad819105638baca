//! Placeholder until the controller shell lands.
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct RunArgs {}

pub fn main(_args: RunArgs) -> ExitCode {
    ExitCode::FAILURE
}

pub fn print_crd() -> ExitCode {
    ExitCode::FAILURE
}
