//! The producer of `produce`, the demo and the benchmark: sends messages in order, counts deliveries, and
//! reports failure if any message was not acknowledged, because an oracle computed over
//! messages that never arrived would be wrong.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use inventory_consumer::config::Settings;

#[derive(Default)]
pub struct DeliveryReport {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for DeliveryReport {}

impl ProducerContext for DeliveryReport {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Relaxed);
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

pub struct EventProducer {
    producer: ThreadedProducer<DeliveryReport>,
    topic: String,
    /// Whether each message carries a W3C `traceparent` of its own, as a traced producer's do.
    traced: bool,
}

impl EventProducer {
    pub fn new(settings: &Settings) -> Result<Self, KafkaError> {
        Ok(EventProducer {
            producer: settings
                .kafka
                .producer_config()
                .create_with_context(DeliveryReport::default())?,
            topic: settings.kafka.topic.clone(),
            traced: false,
        })
    }

    /// Gives each message a `traceparent` header with a new trace (sampled), as a producer
    /// instrumented with OpenTelemetry does.
    pub fn traced(self, traced: bool) -> Self {
        EventProducer { traced, ..self }
    }

    /// Queues one message, waiting while librdkafka's queue is full.
    pub fn send(&self, key: Option<&[u8]>, value: &[u8]) -> Result<(), KafkaError> {
        let mut record = BaseRecord::to(&self.topic).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        if self.traced {
            let traceparent = format!(
                "00-{:032x}-{:016x}-01",
                rand::random::<u128>() | 1,
                rand::random::<u64>() | 1
            );
            record = record.headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                key: "traceparent",
                value: Some(traceparent.as_str()),
            }));
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Waits for every queued message; `Ok(delivered)` only if none failed.
    pub fn finish(self, timeout: Duration) -> Result<u64, String> {
        self.producer
            .flush(timeout)
            .map_err(|e| format!("flush: {e}"))?;
        let report = self.producer.context();
        let failed = report.failed.load(Relaxed);
        if failed > 0 {
            let first = report
                .first_error
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_default();
            return Err(format!(
                "{failed} messages were not delivered (first error: {first})"
            ));
        }
        Ok(report.delivered.load(Relaxed))
    }
}
