//! Termination signals. The first SIGTERM or SIGINT cancels the shutdown token: the replica
//! stops intake, drains, commits and exits 0. A second one exits at once (130), for an operator
//! who does not want to wait for the drain.

use std::io::Write;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio_util::sync::CancellationToken;

pub fn on_termination(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if shutdown.is_cancelled() {
                    eprintln!("second termination signal: exiting without draining");
                    exit_now(130);
                }
                tracing::info!(
                    event = crate::logs::SHUTDOWN_REQUESTED,
                    signal,
                    "termination requested; draining"
                );
                shutdown.cancel();
            }
        })?;
    Ok(())
}

/// Ends the process without the C library's exit handlers. librdkafka threads can outlive
/// `main` (the reply producer's topic check, a client whose close was abandoned at its
/// deadline), and OpenSSL's exit handler frees the state their TLS handshakes use: a replica
/// that had logged its fatal TLS error crashed with SIGSEGV instead of exiting 3. Nothing is
/// lost by skipping the handlers: the logs and the counters are flushed here, and what the
/// replica applied is in the database with its offsets.
pub fn exit_now(code: u8) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` takes no pointers and never returns; skipping destructors and exit
    // handlers is its purpose here.
    unsafe { libc::_exit(code.into()) }
}
