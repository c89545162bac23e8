use std::process::ExitCode;

use clap::Parser;
use inventory_consumer::cli::{self, Cli};

// The batch path allocates and frees large buffers (the arrays of a 500-event batch, the
// driver's write buffer): glibc's allocator spent most of a replica's CPU in `bench` on them
// (malloc_consolidate, unlink_chunk, realloc copies); mimalloc's size classes do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cli::main(Cli::parse())
}
