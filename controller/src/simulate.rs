//! `twosite simulate`: placeholder until the simulation lands.
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {}

pub fn main(_args: SimulateArgs) -> ExitCode {
    ExitCode::FAILURE
}
