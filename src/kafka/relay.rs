//! The reply relay (docs/contract.md section 7): publishes the replies queued in `reply_outbox` to
//! `kafka.results_topic`, keyed by order id (a stock event's by its first SKU), in queue order,
//! then deletes their rows.
//!
//! - **At least once.** Rows are deleted only after the broker acknowledged every reply of the
//!   round (the producer is idempotent, `acks=all`); a replica that dies between the
//!   acknowledgement and the delete only makes the next round publish those replies again,
//!   which the order service dedupes by `event_id`.
//! - **In order per order.** One relay publishes at a time across all replicas: a round holds a
//!   transaction-level advisory lock (`pg_try_advisory_xact_lock`, never a session lock), and
//!   the other replicas' relays skip the round. Within a round, replies go out in queue order,
//!   and one order's replies share a partition (their key), whose order the idempotent
//!   producer keeps through retries. It is also gapless (`enable.gapless.guarantee`): should
//!   one reply fail for good, none after it in its partition is delivered; the producer turns
//!   fatal instead, the round fails, and a new producer publishes the same rows again, in
//!   order. Timeouts are outside librdkafka's guarantee: a reply times out after
//!   `message.timeout.ms`, set to the round's acknowledgement bound, and the replies queued
//!   behind it in its partition were sent no earlier, so they time out with it; the round
//!   fails and the next publishes all of them again, in order.
//! - **Bounded.** While Kafka is reachable the queue drains; how far behind it is shows as
//!   `inventory_reply_relay_lag_seconds` (the age of the oldest queued reply).
//! - **Prompt.** A batch or an expiry sweep that queued replies wakes its own replica's relay
//!   as it commits ([`Wake`]): a round starts at once, and another after each round that
//!   published something (replies queued meanwhile). A relay that finds another replica's in
//!   a round tries again within [`BUSY`] until it has had the round itself or the queue is
//!   empty, so the replies its replica queued never wait for a timer. Otherwise a relay looks
//!   every [`IDLE`], for the replies a replica that died left queued. Looking costs one
//!   statement: a round takes its transaction and the lock only when something is queued.
//! - **In the request's trace.** A reply carries a `traceparent` header that continues the trace
//!   of the message that asked for it, stored with its row ([`crate::traces::reply_headers`]).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_postgres::types::{ToSql, Type};
use tokio_util::sync::CancellationToken;

use crate::domain::{TraceHeaders, lock_key};
use crate::store::{Failure, Pool};

/// Replies per round (one transaction).
const ROUND: i64 = 500;
/// How long a round waits for the broker's acknowledgements.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between rounds when the queue is empty and nothing woke the relay.
const IDLE: Duration = Duration::from_millis(100);
/// Pause before trying again when another replica's relay holds the round.
const BUSY: Duration = Duration::from_millis(5);
const AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Rings the relay of this replica: replies were queued and committed. A ring while a round
/// runs is kept, and starts the next round at once.
pub type Wake = std::sync::Arc<tokio::sync::Notify>;

/// How a round went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// This many replies were published (and their rows deleted).
    Published(usize),
    /// Nothing was queued.
    Empty,
    /// Another replica's relay holds the round.
    Busy,
}

const QUEUED: &str = "
    SELECT o.id, coalesce(r.reply_key, r.order_id), r.payload,
           extract(epoch FROM now() - o.queued_at)::float8, o.traceparent, o.tracestate
    FROM reply_outbox o JOIN replies r ON r.event_id = o.event_id
    ORDER BY o.id
    LIMIT $1";

/// The round's lock, and the settings of its transaction (see `relay_round`).
const TAKE_ROUND: &str = "
    SELECT pg_try_advisory_xact_lock($1),
           set_config('idle_in_transaction_session_timeout', '30s', true),
           set_config('synchronous_commit', 'off', true)";

/// Whether anything is queued: the queue's first row by its index (the table churns, and a
/// scan of it would wade through rows deleted but not yet vacuumed).
const OLDEST: &str = "SELECT id FROM reply_outbox ORDER BY id LIMIT 1";

const PUBLISHED: &str = "DELETE FROM reply_outbox WHERE id = ANY($1::bigint[])";

/// Says loudly at start-up when the results topic does not exist (clusters that create no topic
/// on use): replies then wait in the outbox until it does. Blocking: call off the runtime.
pub fn check_topic(producer: &FutureProducer, topic: &str) {
    match producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
    {
        Ok(metadata) => {
            // Only "unknown": a topic being created on use answers "leader not available".
            let missing = metadata.topics().first().is_none_or(|t| {
                t.error()
                    == Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
            });
            if missing {
                tracing::error!(
                    topic,
                    "the results topic does not exist: replies to order steps stay queued in \
                     reply_outbox until it is created (docs/contract.md section 7)"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, topic, "cannot check that the results topic exists"),
    }
}

/// The relay's producer settings: the service's producer, gapless (see the module doc), and
/// without linger unless `kafka.properties` sets one: a round waits for its acknowledgements
/// anyway, and replies queued while a request is on its way still go out together in the next.
pub fn producer_config(settings: &crate::config::Settings) -> ClientConfig {
    let mut config = settings.kafka.producer_config();
    config
        .set("enable.gapless.guarantee", "true")
        .set("message.timeout.ms", ACK_TIMEOUT.as_millis().to_string());
    let lingers = ["linger.ms", "queue.buffering.max.ms"];
    if !settings
        .kafka
        .flat_properties()
        .keys()
        .any(|k| lingers.contains(&k.as_str()))
    {
        config.set("linger.ms", "0");
    }
    config
}

/// Relays until `stop`; a failed round (broker or database away) is retried, with a new
/// producer if the last one turned fatal.
pub async fn relay_until(
    pool: Pool,
    config: ClientConfig,
    mut producer: FutureProducer,
    topic: String,
    wake: Wake,
    stop: CancellationToken,
) {
    loop {
        let pause = match relay_round(&pool, &producer, &topic).await {
            // More may have been queued meanwhile.
            Ok(Round::Published(_)) => Duration::ZERO,
            Ok(Round::Empty) => IDLE,
            Ok(Round::Busy) => BUSY,
            Err(e) => {
                tracing::warn!(error = %crate::logs::chain(&e), "reply relay round failed; trying again");
                if let Some((_, why)) = producer.client().fatal_error() {
                    tracing::warn!(error = %why, "the reply producer failed for good; replacing it");
                    match config.create() {
                        // Destroying a client blocks (its threads join): off the runtime.
                        Ok(fresh) => {
                            let old = std::mem::replace(&mut producer, fresh);
                            tokio::task::spawn_blocking(move || drop(old));
                        }
                        Err(e) => tracing::error!(error = %e, "cannot create a reply producer"),
                    }
                }
                AFTER_FAILURE
            }
        };
        if pause.is_zero() {
            if stop.is_cancelled() {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
            // Not while busy: the replica's replies may be behind the other relay's round.
            _ = wake.notified(), if pause != BUSY => {}
        }
    }
}

/// One round: publishes up to [`ROUND`] queued replies, unless another replica's relay holds
/// the round. An empty queue is seen in one statement, outside a transaction and without the
/// lock: most wakes find that another relay already published what they were woken for.
pub async fn relay_round(
    pool: &Pool,
    producer: &FutureProducer,
    topic: &str,
) -> Result<Round, Failure> {
    let mut conn = pool.get().await?;
    // Planned on every round, from the tables' statistics of the moment (the pool plans
    // generically): a plan kept with the connection would be the one made when the queue and
    // `replies` were small.
    if conn.query_typed_opt(OLDEST, &[]).await?.is_none() {
        metrics::gauge!(crate::metrics::RELAY_LAG).set(0.0);
        return Ok(Round::Empty);
    }
    let tx = conn.transaction().await?;
    // No SKU contains a space, so this key is outside the SKU lock space.
    let key = lock_key("reply relay");
    // The transaction waits for the broker's acknowledgements: whatever the pool's idle
    // timeout, the server must not end it before ACK_TIMEOUT (rows published but not deleted
    // would be published again on every round). Its commit does not wait for the disk: a
    // delete lost in a server crash is a tail of the queue in order, published again in
    // order, as after a relay that dies before its delete. Set with the lock, in one statement
    // (they end with the transaction either way).
    let ours: bool = tx
        .query_typed_one(TAKE_ROUND, &[(&key, Type::INT8)])
        .await?
        .try_get(0)?;
    if !ours {
        return Ok(Round::Busy);
    }
    let rows = tx.query_typed(QUEUED, &[(&ROUND, Type::INT8)]).await?;
    let lag = match rows.first() {
        Some(row) => row.try_get::<_, f64>(3)?,
        None => 0.0,
    };
    metrics::gauge!(crate::metrics::RELAY_LAG).set(lag);
    if rows.is_empty() {
        return Ok(Round::Empty);
    }
    let round = crate::traces::span("relay replies", "internal");
    round.record("replies", rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    let mut deliveries = Vec::with_capacity(rows.len());
    // Each reply's sending, in its request's trace: ended once acknowledged.
    let mut sends = Vec::new();
    for row in &rows {
        ids.push(row.try_get::<_, i64>(0)?);
        let key: &str = row.try_get(1)?;
        let payload: &str = row.try_get(2)?;
        let tracestate: Option<String> = row.try_get(5)?;
        let request = row
            .try_get::<_, Option<String>>(4)?
            .map(|traceparent| TraceHeaders {
                traceparent,
                tracestate,
            });
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        if let Some((headers, send)) = crate::traces::reply_headers(request.as_ref(), topic) {
            record = record.headers(headers);
            sends.push(send);
        }
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| Failure::transient_from("queueing a reply", e))?;
        deliveries.push(delivery);
    }
    let acked = tokio::time::timeout(ACK_TIMEOUT, async {
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(Failure::transient_from("publishing replies", e)),
                Err(_) => return Err(Failure::transient("the producer dropped a reply")),
            }
        }
        Ok(())
    })
    .await;
    match acked {
        Ok(Ok(())) => {}
        Ok(Err(failure)) => return Err(failure),
        Err(_) => {
            return Err(Failure::transient(format!(
                "replies not acknowledged within {ACK_TIMEOUT:?}"
            )));
        }
    }
    drop(sends);
    let ids_param = [(&ids as &(dyn ToSql + Sync), Type::INT8_ARRAY)];
    tx.execute_typed(PUBLISHED, &ids_param).await?;
    tx.commit().await?;
    drop(round);
    metrics::counter!(crate::metrics::REPLIES).increment(ids.len() as u64);
    Ok(Round::Published(ids.len()))
}
