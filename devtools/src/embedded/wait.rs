//! Waiting for a condition, bounded: what the tests, `demo` and `bench` do instead of sleeping
//! and hoping. The condition is polled every 100 ms until it holds or `timeout` passes.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `condition` until it holds; an error naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
