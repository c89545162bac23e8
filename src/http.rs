//! HTTP per replica (docs/contract.md section 6): `/livez`, `/readyz`, `/metrics`.
//!
//! - `/livez` is 200 while the poll loop keeps turning (a wedged poll thread is a reason to
//!   restart the process; a slow database is not: it is retried, and shows in `/readyz`).
//! - `/readyz` is 200 once the replica has joined the group and reached the database, and 503
//!   from the moment a shutdown starts draining, and while the database does not answer (the
//!   body says why; a replica that stepped out of the group for it says so too).
//! - `/metrics` is the Prometheus text format (see [`crate::metrics`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::telemetry::unix_millis;

/// What the probes report, updated by the consumer.
#[derive(Debug)]
pub struct Health {
    /// A poll loop silent for this long is considered wedged
    /// ([`crate::config::Settings::liveness_window`]).
    liveness_window: Duration,
    /// Milliseconds since the epoch of the poll loop's latest turn.
    last_poll_ms: AtomicU64,
    joined: AtomicBool,
    /// Why the database is not usable now, if it is not.
    database: Mutex<Option<String>>,
    /// Why the replica stepped out of the group, while it is out.
    stepped_out: Mutex<Option<String>>,
    /// Stepped back in, and no rebalance yet.
    rejoining: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    pub fn new(liveness_window: Duration) -> Self {
        Health {
            liveness_window,
            last_poll_ms: AtomicU64::new(0),
            joined: AtomicBool::new(false),
            database: Mutex::new(Some("not reached yet".to_owned())),
            stepped_out: Mutex::new(None),
            rejoining: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    pub fn polled(&self) {
        self.last_poll_ms.store(unix_millis(), Relaxed);
    }

    pub fn joined(&self) {
        self.joined.store(true, Relaxed);
        self.rejoining.store(false, Relaxed);
    }

    /// Whether the replica has joined the group at least once (its first rebalance).
    pub fn has_joined(&self) -> bool {
        self.joined.load(Relaxed)
    }

    /// `None`: the database answers; else why it does not.
    pub fn database_reachable(&self, unreachable: Option<String>) {
        *lock(&self.database) = unreachable;
    }

    /// `Some(why)` once the replica stepped out of the group; `None` when it is back in (and
    /// not ready until its first rebalance).
    pub fn stepped_out(&self, why: Option<String>) {
        self.rejoining.store(why.is_none(), Relaxed);
        *lock(&self.stepped_out) = why;
    }

    pub fn is_stepped_out(&self) -> bool {
        lock(&self.stepped_out).is_some()
    }

    pub fn draining(&self) {
        self.draining.store(true, Relaxed);
    }

    pub fn is_live(&self) -> bool {
        let last = self.last_poll_ms.load(Relaxed);
        last == 0 || unix_millis().saturating_sub(last) < self.liveness_window.as_millis() as u64
    }

    /// `Ok` when ready, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Relaxed) {
            Err("draining".into())
        } else if let Some(why) = lock(&self.stepped_out).clone() {
            Err(format!("stepped out of the consumer group: {why}"))
        } else if let Some(why) = lock(&self.database).clone() {
            Err(format!("database not reached: {why}"))
        } else if !self.joined.load(Relaxed) || self.rejoining.load(Relaxed) {
            Err("not yet in the consumer group".into())
        } else {
            Ok(())
        }
    }
}

/// A poisoned lock still holds the last reason written: use it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

/// Binds `addr` and serves until `shutdown`; returns the bound address (port 0 picks one) and
/// the server's task, which ends once the open requests are answered.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState { health, metrics });
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok((bound, task))
}

async fn livez(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if s.health.is_live() {
        (StatusCode::OK, "live\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "poll loop stalled\n")
    }
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    match s.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn render_metrics(State(s): State<AppState>) -> String {
    s.metrics.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_group_and_database_and_ends_with_the_drain() {
        let h = Health::new(Duration::from_secs(60));
        assert_eq!(
            h.readiness(),
            Err("database not reached: not reached yet".into())
        );
        h.database_reachable(None);
        assert_eq!(h.readiness(), Err("not yet in the consumer group".into()));
        h.joined();
        assert_eq!(h.readiness(), Ok(()));
        h.database_reachable(Some("no answer within 5 s".into()));
        h.stepped_out(Some("the database has not answered for 20 s".into()));
        assert_eq!(
            h.readiness(),
            Err("stepped out of the consumer group: the database has not answered for 20 s".into())
        );
        h.stepped_out(None);
        h.database_reachable(None);
        assert_eq!(
            h.readiness(),
            Err("not yet in the consumer group".into()),
            "back in, before its first rebalance"
        );
        h.joined();
        assert_eq!(h.readiness(), Ok(()));
        h.draining();
        assert_eq!(h.readiness(), Err("draining".into()));
    }

    #[test]
    fn liveness_follows_the_poll_loop() {
        let window = Duration::from_secs(60);
        let h = Health::new(window);
        assert!(h.is_live(), "starting up");
        h.polled();
        assert!(h.is_live());
        h.last_poll_ms
            .store(unix_millis() - window.as_millis() as u64 + 1_000, Relaxed);
        assert!(h.is_live());
        h.last_poll_ms
            .store(unix_millis() - window.as_millis() as u64 - 1, Relaxed);
        assert!(!h.is_live());
    }
}
