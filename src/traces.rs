//! OpenTelemetry traces (docs/operations.md, "Traces"): the OTLP export set up from
//! `[traces]`, and the W3C Trace Context that events carry in their Kafka headers.
//!
//! - A batch's transaction is one span, linked to the context of every event it applies (a
//!   batch has many parents, so links, not a parent): [`link_events`].
//! - Spans are exported by the SDK's batch processor on a thread of its own; a collector that
//!   is down or slow costs spans (dropped and counted: [`Admission`], [`Counting`]), never an
//!   event or the consume path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT, Sampler,
    SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::{Resource, trace::BatchSpanProcessor};
use rdkafka::message::{Header, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::TracesSettings;
use crate::domain::{Batch, BatchPlan, TraceHeaders};

/// The instrumentation scope of every span.
const SCOPE: &str = "inventory-consumer";
/// The longest the exit waits for the last spans to leave.
pub const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported: per-event work for traces (links, span events) is skipped when
/// not.
pub fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// The tracer provider for `settings`, installed for [`shutdown`]; `None` when tracing is off.
/// `max_links`: a batch span's links (one per event: `processing.batch_max_events`).
pub fn provider(
    settings: &TracesSettings,
    max_links: usize,
) -> anyhow::Result<Option<SdkTracerProvider>> {
    if !settings.enabled() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(settings.endpoint.clone())
        .build()?;
    let held = Arc::new(AtomicUsize::new(0));
    let limit = queue_size();
    // The other `OTEL_BSP_*` variables are the SDK's to read (its builder's default does).
    let config = BatchConfigBuilder::default()
        .with_max_queue_size(limit)
        .build();
    let processor = BatchSpanProcessor::builder(Counting {
        inner: exporter,
        held: held.clone(),
    })
    .with_batch_config(config)
    .build();
    let admission = Admission {
        inner: processor,
        held,
        limit,
    };
    let provider = SdkTracerProvider::builder()
        .with_span_processor(admission)
        .with_sampler(sampler(settings))
        .with_max_links_per_span(u32::try_from(max_links).unwrap_or(u32::MAX))
        .with_resource(
            Resource::builder()
                .with_service_name(settings.service_name.clone())
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        )
        .build();
    let _ = PROVIDER.set(provider.clone());
    Ok(Some(provider))
}

/// The tracer the tracing layer turns spans into OpenTelemetry spans with.
pub fn tracer(provider: &SdkTracerProvider) -> opentelemetry_sdk::trace::Tracer {
    provider.tracer(SCOPE)
}

fn sampler(settings: &TracesSettings) -> Sampler {
    let ratio = settings.sampler_arg;
    match settings.sampler.as_str() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
        }
        _ => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
    }
}

/// Sends what the spans still queued, within [`FLUSH_AT_EXIT`]: the process exits without
/// running destructors.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown_with_timeout(FLUSH_AT_EXIT)
    {
        tracing::warn!(error = %e, "traces: the last spans may not have been sent");
    }
}

/// The remote span context `headers` carry, if they are valid W3C Trace Context: an event
/// without one, or with a malformed one, starts no trace of its own (its batch's span is a
/// root either way).
pub fn context_of(headers: &TraceHeaders) -> Option<SpanContext> {
    let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), headers);
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(&self.traceparent),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// Links `span` to the context of each event of `batch` that carries one.
pub fn link_events(span: &tracing::Span, batch: &Batch) {
    if !enabled() {
        return;
    }
    for trace in batch.traces() {
        if let Some(cx) = context_of(trace) {
            span.add_link(cx);
        }
    }
}

/// A span of the service's own work named `name`, of OpenTelemetry kind `kind` (`internal`,
/// `client`...), with room for an `expired` and a `replies` count; none when traces are off.
pub fn span(name: &'static str, kind: &'static str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "work",
        otel.name = name,
        otel.kind = kind,
        expired = tracing::field::Empty,
        replies = tracing::field::Empty,
    )
}

/// A step of a batch's transaction, as a child span of its batch's (none when traces are off).
pub fn step(name: &'static str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "step",
        otel.name = name,
        otel.kind = "client",
        db.system.name = "postgresql",
    )
}

/// A committed plan's rejections and dead letters, as events of the current span (its batch's).
pub fn decisions(plan: &BatchPlan<'_>) {
    if !enabled() {
        return;
    }
    for planned in &plan.events {
        if let Some(reason) = planned.outcome.reason() {
            tracing::debug!(
                event_id = %planned.event.id,
                partition = planned.partition,
                offset = planned.offset,
                reason,
                "event rejected"
            );
        }
    }
    for dead in &plan.dead_letters {
        tracing::debug!(
            partition = dead.delivery.partition,
            offset = dead.delivery.offset,
            reason = dead.error,
            detail = %dead.detail,
            "dead letter"
        );
    }
}

/// The headers of a reply to a request that carried `request`, and the span of its sending:
/// the reply goes on in the request's trace. With traces on, the sending is a producer span
/// whose parent is the request's context, and the header names it; off, the header is the
/// request's own context. `None` when the request carried no valid context.
pub fn reply_headers(
    request: Option<&TraceHeaders>,
    topic: &str,
) -> Option<(OwnedHeaders, tracing::Span)> {
    let parent = context_of(request?)?;
    let mut carrier: HashMap<String, String> = HashMap::new();
    let send = if enabled() {
        let span = tracing::info_span!(
            "send",
            otel.name = %format_args!("send {topic}"),
            otel.kind = "producer",
            messaging.system = "kafka",
            messaging.operation.type = "send",
            messaging.destination.name = %topic,
        );
        let _ = span.set_parent(Context::new().with_remote_span_context(parent));
        TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
        span
    } else {
        let cx = Context::new().with_remote_span_context(parent);
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        tracing::Span::none()
    };
    let mut headers = OwnedHeaders::new();
    // The propagator writes `tracestate` even when empty: left out then.
    for (key, value) in carrier.iter().filter(|(_, v)| !v.is_empty()) {
        headers = headers.insert(Header {
            key: key.as_str(),
            value: Some(value.as_str()),
        });
    }
    Some((headers, send))
}

/// The batch processor's queue (`OTEL_BSP_MAX_QUEUE_SIZE`), read once for it and for
/// [`Admission`].
fn queue_size() -> usize {
    std::env::var(OTEL_BSP_MAX_QUEUE_SIZE)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT)
}

/// Admits ended spans to the batch processor while it holds fewer than its queue's size
/// (queued or being exported), and counts the others as dropped: the processor itself would
/// drop them with a single warning (a collector that is slow or hangs).
#[derive(Debug)]
struct Admission<P> {
    inner: P,
    held: Arc<AtomicUsize>,
    limit: usize,
}

impl<P: SpanProcessor> SpanProcessor for Admission<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.held.fetch_add(1, Ordering::Relaxed) >= self.limit {
            self.held.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::SPANS_DROPPED, "reason" => "queue_full").increment(1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts what the exporter sent and what it could not (the batch processor drops a batch
/// whose export failed), and lets [`Admission`] know the spans are gone either way.
#[derive(Debug)]
struct Counting<E> {
    inner: E,
    held: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for Counting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        self.held.fetch_sub(spans, Ordering::Relaxed);
        match &result {
            Ok(()) => metrics::counter!(crate::metrics::SPANS_EXPORTED).increment(spans as u64),
            Err(_) => {
                metrics::counter!(crate::metrics::SPANS_DROPPED, "reason" => "export_failed")
                    .increment(spans as u64);
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str, tracestate: Option<&str>) -> TraceHeaders {
        TraceHeaders {
            traceparent: traceparent.into(),
            tracestate: tracestate.map(Into::into),
        }
    }

    #[test]
    fn a_valid_traceparent_is_the_remote_context() {
        let cx = context_of(&headers(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=x"),
        ))
        .expect("valid");
        assert_eq!(
            cx.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(cx.is_sampled() && cx.is_remote());
        assert_eq!(cx.trace_state().header(), "vendor=x");
    }

    #[test]
    fn malformed_traceparents_are_no_context() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(context_of(&headers(bad, None)).is_none(), "{bad:?}");
        }
    }
}
