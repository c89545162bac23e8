//! Termination signals. The first SIGTERM or SIGINT cancels the shutdown token: the replica
//! stops intake, drains, commits and exits 0. A second one exits at once (130), for an operator
//! who does not want to wait for the drain.

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
                    std::process::exit(130);
                }
                tracing::info!(signal, "termination requested; draining");
                shutdown.cancel();
            }
        })?;
    Ok(())
}
