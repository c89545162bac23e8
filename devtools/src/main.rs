use std::process::ExitCode;

use clap::Parser;
use inventory_devtools::cli::{self, Cli};

fn main() -> ExitCode {
    cli::main(Cli::parse())
}
