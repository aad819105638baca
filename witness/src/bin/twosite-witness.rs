//! `twosite-witness`: the witness server on its own (the same as `twosite witness`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    witness::main(witness::WitnessArgs::parse())
}
