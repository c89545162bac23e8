//! OpenTelemetry traces (docs/operations.md, "Traces") as a tracing backend sees them: an
//! OTLP/HTTP receiver of the test's own decodes what a replica exports with the protocol's
//! published definitions (`opentelemetry-proto`), and events produced with known
//! `traceparent` headers through Apache Kafka are followed into their batch's span, and a
//! reply out of it in its request's trace.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use rand::Rng as _;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::support::{
    EXIT, GROUP, RESULTS_TOPIC, SETTLE, TOPIC, TestEnv, http_get, metric, read_whole_topic,
    wait_until,
};

/// What the receiver got: every span of every request, and each request's `service.name`.
#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    services: BTreeSet<String>,
}

/// An OTLP/HTTP receiver on a local port: `POST /v1/traces`, protobuf.
async fn receiver() -> (SocketAddr, Arc<Mutex<Received>>) {
    let received = Arc::new(Mutex::new(Received::default()));
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                let mut sink = sink.lock().unwrap();
                for resource in request.resource_spans {
                    if let Some(service) = resource.resource.as_ref().and_then(|r| {
                        r.attributes
                            .iter()
                            .find(|a| a.key == "service.name")
                            .and_then(text)
                    }) {
                        sink.services.insert(service);
                    }
                    for scope in resource.scope_spans {
                        sink.spans.extend(scope.spans);
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, received)
}

fn text(kv: &KeyValue) -> Option<String> {
    match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|a| a.key == key).and_then(text)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of one request's trace, and the batch span that links to the request, as text.
fn order_trace(spans: &[Span], trace: &str, request: &str) -> String {
    let line = |s: &Span, depth: usize| {
        let ms = s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano) as f64 / 1e6;
        let attributes: Vec<String> = s
            .attributes
            .iter()
            .filter_map(|a| Some(format!("{}={}", a.key, text(a)?)))
            .collect();
        let events: Vec<String> = s.events.iter().map(|e| e.name.clone()).collect();
        format!(
            "{:indent$}{} [span {}, {ms:.2} ms] {} {:?}\n",
            "",
            s.name,
            hex(&s.span_id),
            attributes.join(" "),
            events,
            indent = depth * 2
        )
    };
    let mut out = format!("trace {trace}\n  request span {request} (the producer's)\n");
    for s in spans.iter().filter(|s| hex(&s.trace_id) == trace) {
        out += &line(s, 2);
    }
    let linking = spans.iter().filter(|s| {
        s.links
            .iter()
            .any(|l| hex(&l.trace_id) == trace && hex(&l.span_id) == request)
    });
    for batch in linking {
        out += &format!("  linked from trace {}:\n", hex(&batch.trace_id));
        out += &line(batch, 2);
        for step in spans.iter().filter(|s| s.parent_span_id == batch.span_id) {
            out += &line(step, 3);
        }
    }
    out
}

/// A W3C `traceparent` with random ids: (header, trace id, span id).
fn traceparent() -> (String, String, String) {
    let mut rng = rand::rng();
    let trace = format!("{:032x}", rng.random::<u128>() | 1);
    let span = format!("{:016x}", rng.random::<u64>() | 1);
    (format!("00-{trace}-{span}-01"), trace, span)
}

/// A message to produce: its partition, payload and headers.
type Outgoing = (i32, String, Vec<(&'static str, String)>);

/// Produces each message with its headers, acknowledged.
async fn produce(bootstrap: &str, messages: Vec<Outgoing>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for (partition, payload, headers) in messages {
        let mut owned = OwnedHeaders::new();
        for (key, value) in &headers {
            owned = owned.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        let record = FutureRecord::to(TOPIC)
            .partition(partition)
            .key("k")
            .payload(&payload)
            .headers(owned);
        producer
            .send(record, Duration::from_secs(30))
            .await
            .expect("acknowledged");
    }
}

/// A replica on Apache Kafka exports a span per batch transaction: linked to the context of
/// every event that carried a valid `traceparent` (and to no other), with OpenTelemetry's
/// messaging attributes, its steps as child spans, a rejection and a dead letter as events; and
/// its JSON log lines inside a batch carry that span's ids.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_span_links_each_event_that_carries_a_trace() {
    crate::support::install_apache();
    let env = TestEnv::on_apache(3, 1).await;
    let (addr, received) = receiver().await;
    let endpoint = format!("http://{addr}");
    let mut replica = env.replica_with_env(
        "r1",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "inventory-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        &[],
    );

    let mut messages = Vec::new();
    let mut traced: BTreeSet<(String, String)> = BTreeSet::new();
    for i in 0..60 {
        let event = json!({"event_id": format!("t-{i}"), "type": "restock", "sku": format!("S{}", i % 7), "quantity": 5});
        let mut headers = Vec::new();
        match i % 4 {
            0 | 1 => {
                let (header, trace, span) = traceparent();
                traced.insert((trace, span));
                headers.push(("traceparent", header));
                headers.push(("tracestate", "vendor=test".to_owned()));
            }
            // Malformed: no context, never an error.
            2 => headers.push(("traceparent", "00-not-a-trace-01".to_owned())),
            _ => {}
        }
        messages.push((i % 3, event.to_string(), headers));
    }
    let (header, trace, span) = traceparent();
    traced.insert((trace.clone(), span.clone()));
    let sale =
        json!({"event_id": "t-oversold", "type": "sale", "sku": "S0", "quantity": 1_000_000});
    messages.push((0, sale.to_string(), vec![("traceparent", header)]));
    messages.push((1, "{not json".to_owned(), vec![]));
    // An order service's reserve with a trace, and one without: the first reply must continue
    // the request's trace, the second carries none.
    let (header, request_trace, request_span) = traceparent();
    traced.insert((request_trace.clone(), request_span.clone()));
    let reserve = |order: &str| json!({"event_id": format!("{order}-r"), "type": "reserve", "order_id": order, "sku": "S1", "quantity": 1});
    messages.push((
        2,
        reserve("o-traced").to_string(),
        vec![("traceparent", header)],
    ));
    messages.push((2, reserve("o-plain").to_string(), vec![]));
    produce(&env.broker.bootstrap, messages).await;
    env.wait_processed(64, SETTLE).await;
    crate::support::orders::wait_for_replies(&env, 2).await;

    let addr_http = replica.http_addr().await;
    wait_until("the spans to be exported", SETTLE, || async {
        let (_, text) = http_get(&addr_http, "/metrics");
        metric(&text, "inventory_trace_spans_exported_total", &[]) > 0.0
    })
    .await;
    let (status, _) = replica.terminate(EXIT);
    assert!(status.success(), "exit: {status:?}\n{}", replica.log());

    let received = received.lock().unwrap();
    assert!(
        received.services.contains("inventory-under-test"),
        "{:?}",
        received.services
    );
    let batches: Vec<&Span> = received
        .spans
        .iter()
        .filter(|s| s.name == format!("process {TOPIC}"))
        .collect();
    assert!(
        !batches.is_empty(),
        "no batch span among {} spans",
        received.spans.len()
    );
    let mut linked = BTreeSet::new();
    for batch in &batches {
        assert_eq!(batch.kind, SpanKind::Consumer as i32, "{batch:?}");
        assert_eq!(
            attribute(&batch.attributes, "messaging.system").as_deref(),
            Some("kafka")
        );
        assert_eq!(
            attribute(&batch.attributes, "messaging.destination.name").as_deref(),
            Some(TOPIC)
        );
        assert_eq!(
            attribute(&batch.attributes, "messaging.consumer.group.name").as_deref(),
            Some(GROUP)
        );
        assert!(
            batch.parent_span_id.is_empty(),
            "a batch span is a root: {batch:?}"
        );
        for link in &batch.links {
            let pair = (hex(&link.trace_id), hex(&link.span_id));
            assert!(linked.insert(pair.clone()), "linked twice: {pair:?}");
        }
    }
    eprintln!(
        "{} spans, {} batch spans, {} links",
        received.spans.len(),
        batches.len(),
        linked.len()
    );
    assert_eq!(
        linked, traced,
        "the batch spans link exactly the events with a valid context"
    );

    // The steps are children of their batch's span.
    let ids: HashMap<Vec<u8>, &Span> = batches.iter().map(|s| (s.span_id.clone(), *s)).collect();
    for step in ["lock and read", "write", "commit"] {
        let children: Vec<&Span> = received.spans.iter().filter(|s| s.name == step).collect();
        assert!(!children.is_empty(), "no `{step}` span");
        for child in children {
            assert!(
                ids.contains_key(&child.parent_span_id),
                "`{step}` outside a batch span"
            );
            assert_eq!(child.trace_id, ids[&child.parent_span_id].trace_id);
        }
    }

    // The oversold sale's rejection and the malformed message's dead letter, with reasons.
    let events: Vec<(String, Option<String>)> = batches
        .iter()
        .flat_map(|b| b.events.iter())
        .map(|e| (e.name.clone(), attribute(&e.attributes, "reason")))
        .collect();
    assert!(
        events.contains(&("event rejected".into(), Some("insufficient_stock".into()))),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(name, reason)| name == "dead letter" && reason.is_some()),
        "{events:?}"
    );

    // The traced reserve's reply continues its trace: its header names a producer span whose
    // parent is the request's span. The other reply has no header.
    let (replies, _) = read_whole_topic(&env.broker.bootstrap, RESULTS_TOPIC);
    let header_of = |order: &str| {
        let reply = replies
            .iter()
            .find(|m| m.key.as_deref() == Some(order.as_bytes()))
            .unwrap_or_else(|| panic!("no reply for {order}"));
        reply
            .headers
            .iter()
            .find(|(k, _)| k == "traceparent")
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header_of("o-plain"), None);
    let reply_parent = header_of("o-traced").expect("the reply carries a traceparent");
    let parts: Vec<&str> = reply_parent.split('-').collect();
    assert_eq!(parts.len(), 4, "{reply_parent}");
    assert_eq!(
        parts[1], request_trace,
        "the reply is in the request's trace"
    );
    let send = received
        .spans
        .iter()
        .find(|s| hex(&s.span_id) == parts[2])
        .unwrap_or_else(|| panic!("no exported span {} (the reply's parent)", parts[2]));
    assert_eq!(send.name, format!("send {RESULTS_TOPIC}"));
    assert_eq!(send.kind, SpanKind::Producer as i32);
    assert_eq!(
        hex(&send.parent_span_id),
        request_span,
        "the send's parent is the request"
    );
    // The order as a tracing backend shows it (printed for people: `--no-capture`).
    eprintln!(
        "{}",
        order_trace(&received.spans, &request_trace, &request_span)
    );

    // Log lines inside a batch carry its span's ids.
    let committed = replica.events("batch_committed");
    assert!(!committed.is_empty());
    let span_ids: BTreeSet<String> = batches.iter().map(|s| hex(&s.span_id)).collect();
    for line in committed {
        let span_id = line["span_id"].as_str().unwrap_or_default().to_owned();
        assert!(
            span_ids.contains(&span_id),
            "a batch_committed line outside an exported batch span: {line}"
        );
        assert_eq!(line["trace_id"].as_str().map(str::len), Some(32), "{line}");
    }
}

/// A collector that is down costs spans, counted, and nothing else: every event is applied,
/// and the replica exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_is_down_costs_no_event() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let exporter = [
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
    ];
    spans_dropped_no_event_lost(&endpoint, &exporter, 300, "export_failed").await;
}

/// A collector that accepts connections and never answers holds the export; spans that find
/// the queue full are dropped and counted, and nothing else changes: every event is applied,
/// and the replica exits 0 on SIGTERM, its last flush bounded.
#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_hangs_costs_no_event() {
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", hang.local_addr().unwrap());
    // Accepts, and holds every connection open without a word.
    std::thread::spawn(move || {
        let held: Vec<_> = hang.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    let exporter = [
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "20"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "10"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000"),
    ];
    spans_dropped_no_event_lost(&endpoint, &exporter, 200, "queue_full").await;
}

/// The most events a transaction holds in [`spans_dropped_no_event_lost`].
const EVENTS_PER_TRANSACTION: usize = 5;

/// A replica exporting to `endpoint` (with the `exporter` variables) is sent `events` traced
/// restocks. Spans must be dropped and counted with `reason`, none exported; every event
/// applied; the replica exits 0 on SIGTERM.
///
/// Its transactions hold at most [`EVENTS_PER_TRANSACTION`] events, so the spans (4 a
/// transaction: the batch's and its 3 steps') outnumber a small queue whatever the timing:
/// uncapped, a replica that starts late takes the events in 2 or 3 transactions, and a queue of
/// 20 never fills.
async fn spans_dropped_no_event_lost(
    endpoint: &str,
    exporter: &[(&str, &str)],
    events: i64,
    reason: &str,
) {
    let env = TestEnv::new(3).await;
    let mut variables = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)];
    variables.extend_from_slice(exporter);
    let cap = EVENTS_PER_TRANSACTION.to_string();
    let mut replica =
        env.replica_with_env("r1", &variables, &[("processing.batch_max_events", &cap)]);
    let mut messages = Vec::new();
    for i in 0..events {
        let (header, _, _) = traceparent();
        let event = json!({"event_id": format!("e-{i}"), "type": "restock", "sku": format!("S{}", i % 11), "quantity": 1});
        messages.push((
            (i % 3) as i32,
            event.to_string(),
            vec![("traceparent", header)],
        ));
    }
    produce(&env.broker.bootstrap, messages).await;
    env.wait_processed(events, SETTLE).await;
    let addr = replica.http_addr().await;
    let label = format!("reason=\"{reason}\"");
    wait_until(
        &format!("spans dropped ({reason}) to be counted"),
        SETTLE,
        || async {
            let (_, text) = http_get(&addr, "/metrics");
            metric(&text, "inventory_trace_spans_dropped_total", &[&label]) > 0.0
        },
    )
    .await;
    let (_, text) = http_get(&addr, "/metrics");
    assert_eq!(
        metric(&text, "inventory_trace_spans_exported_total", &[]),
        0.0
    );
    let stopping = std::time::Instant::now();
    let (status, _) = replica.terminate(EXIT);
    assert!(status.success(), "exit: {status:?}\n{}", replica.log());
    eprintln!("exit took {:?} ({reason})", stopping.elapsed());
    assert_eq!(
        env.db
            .scalar("SELECT sum(current_stock)::bigint FROM products")
            .await,
        events
    );
}

/// With traces off a reply still continues its request's trace: its headers are the request's
/// own `traceparent` and `tracestate`.
#[tokio::test(flavor = "multi_thread")]
async fn with_traces_off_a_reply_carries_its_requests_context() {
    let env = TestEnv::new(3).await;
    let mut replica = env.replica("r1", &[]);
    let (header, _, _) = traceparent();
    let restock = json!({"event_id": "off-s", "type": "restock", "sku": "S1", "quantity": 3});
    let reserve = json!({"event_id": "off-r", "type": "reserve", "order_id": "o-off", "sku": "S1", "quantity": 1});
    produce(
        &env.broker.bootstrap,
        vec![
            (0, restock.to_string(), vec![]),
            (
                0,
                reserve.to_string(),
                vec![
                    ("traceparent", header.clone()),
                    ("tracestate", "vendor=off".to_owned()),
                ],
            ),
        ],
    )
    .await;
    env.wait_processed(2, SETTLE).await;
    crate::support::orders::wait_for_replies(&env, 1).await;
    let (replies, _) = read_whole_topic(&env.broker.bootstrap, RESULTS_TOPIC);
    let reply = replies
        .iter()
        .find(|m| m.key.as_deref() == Some(b"o-off".as_slice()))
        .expect("the reserve's reply");
    let mut headers = reply.headers.clone();
    headers.sort();
    assert_eq!(
        headers,
        [
            ("traceparent".to_owned(), header),
            ("tracestate".to_owned(), "vendor=off".to_owned())
        ]
    );
    let (status, _) = replica.terminate(EXIT);
    assert!(status.success(), "exit: {status:?}\n{}", replica.log());
}
