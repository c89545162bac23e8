//! The traces runs' OTLP/HTTP receiver: accepts what the replicas export (`POST /v1/traces`)
//! and counts it, as a collector beside them would, so that the runs measure what exporting
//! costs the replicas and not a collector's speed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::runtime::Runtime;

pub(super) struct TraceSink {
    /// The traces URL (`traces.endpoint`).
    pub(super) url: String,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl TraceSink {
    /// Listens on a local port, served by `rt` until bench ends.
    pub(super) fn start(rt: &Runtime) -> anyhow::Result<TraceSink> {
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (requests, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let counts = (requests.clone(), bytes.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                counts.0.fetch_add(1, Relaxed);
                counts.1.fetch_add(body.len() as u64, Relaxed);
                async { axum::http::StatusCode::OK }
            }),
        );
        rt.spawn(async move { axum::serve(listener, app).await });
        Ok(TraceSink {
            url: format!("http://{addr}/v1/traces"),
            requests,
            bytes,
        })
    }

    /// What it received so far, for the report.
    pub(super) fn received(&self) -> String {
        format!(
            "trace receiver: {} export requests, {} KiB in all so far",
            self.requests.load(Relaxed),
            self.bytes.load(Relaxed) >> 10
        )
    }
}
