//! Logging with tracing, to stderr: JSON for machines (containers, tests), pretty on a terminal;
//! and, with `[traces]` set, the same spans exported to OpenTelemetry ([`crate::traces`]), each
//! JSON log line inside one carrying its `trace_id` and `span_id`.

use std::fmt::Write as _;
use std::io::IsTerminal;

use opentelemetry::trace::TraceContextExt as _;
use tracing::{Event, Subscriber};
use tracing_subscriber::Registry;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, filter::Targets};

use crate::config::{LogFormat, Settings};

/// Installs the global subscriber for logs alone. `RUST_LOG`, when set, wins over `level`.
pub fn init(format: Option<LogFormat>, level: &str) {
    install(format, level, None);
}

/// Installs the global subscriber for a command of the service: its logs (`[log]`) and, with
/// `[traces]` set, its spans exported ([`crate::traces`]). A tracing exporter that cannot be
/// built (a malformed endpoint) is an error.
pub fn init_with_traces(settings: &Settings) -> anyhow::Result<()> {
    let provider = crate::traces::provider(&settings.traces, settings.processing.batch_max_events)?;
    // The service's own spans and events, debug ones included (rejections, dead letters),
    // whatever the log level; never those of the exporter's own HTTP client.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(crate::traces::tracer(p))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_target(false)
            .with_filter(Targets::new().with_target("inventory_consumer", tracing::Level::DEBUG))
            .boxed()
    });
    install(settings.log.format, &settings.log.level, otel);
    Ok(())
}

type Otel = Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync>;

fn install(format: Option<LogFormat>, level: &str, otel: Option<Otel>) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    // A second init (tests, embedded use) keeps the first subscriber.
    let Some(otel) = otel else {
        // Logs alone: one global filter, so that disabled callsites cost nothing.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let _ = match format {
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
            LogFormat::Pretty => builder.compact().try_init(),
        };
        return;
    };
    // Logs and traces, each with its own filter.
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .map_event_format(WithTraceIds)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => fmt.compact().with_filter(filter).boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(fmt)
        .try_init();
}

/// Adds the current span's `trace_id` and `span_id` to a JSON log line, when it is inside a
/// span that traces export.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let cx = opentelemetry::Context::current();
        let span = cx.span().span_context().clone();
        if span.is_valid() && line.ends_with("}\n") {
            line.truncate(line.len() - 2);
            write!(
                line,
                r#","trace_id":"{}","span_id":"{}"}}"#,
                span.trace_id(),
                span.span_id()
            )?;
            line.push('\n');
        }
        writer.write_str(&line)
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
