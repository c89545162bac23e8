//! The poll thread: owns the librdkafka consumer, dispatches each message to its partition's
//! worker, commits processed offsets, and on shutdown drains, commits and leaves the group.
//!
//! It runs on a dedicated OS thread, never on the async runtime: librdkafka runs the rebalance
//! callbacks inside `poll`, and those block while the revoked partitions drain. It never waits
//! for a worker otherwise: a partition whose worker falls behind is paused, the others keep
//! flowing ([`super::flow`]), and every turn of the loop marks the replica live. It also
//! steps the replica out of the group and back in as the database stops and starts answering
//! ([`super::standing`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::http::Health;
use crate::kafka::group::GroupContext;
use crate::kafka::rewinds::Rewind;
use crate::kafka::standing::Change;
use crate::kafka::worker::{Halted, WorkerContext};

/// How long one `poll` may block: also how quickly a shutdown request is noticed.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How often partitions paused for a full queue are checked for room (not after every
/// message: a resume seeks, and a failing one is retried at this pace).
const RESUME_CHECK: Duration = Duration::from_millis(10);

/// How long serving the unsubscribe's rebalance may take before the consumer is closed
/// regardless (the caller bounds the close itself: `run`'s stop margin).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the poll thread listens to besides Kafka.
pub struct Signals {
    pub halts: mpsc::UnboundedReceiver<Halted>,
    pub rewinds: mpsc::UnboundedReceiver<Vec<Rewind>>,
    pub standing: mpsc::UnboundedReceiver<Change>,
}

/// Consumes until `shutdown` is cancelled; returns an error only for a fatal Kafka failure.
/// Blocking: call it on its own thread.
pub fn consume(
    settings: &Settings,
    ctx: WorkerContext,
    mut signals: Signals,
    health: Arc<Health>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
) -> Result<(), KafkaError> {
    let group = GroupContext::new(
        ctx,
        health.clone(),
        settings.incremental_rebalancing(),
        runtime,
        settings.drain_timeout(),
        settings.processing.buffer_bytes,
        shutdown.clone(),
    );
    let consumer: BaseConsumer<GroupContext> = settings
        .kafka
        .consumer_config()
        .create_with_context(group)?;
    consumer.subscribe(&[&settings.kafka.topic])?;
    tracing::info!(
        topic = %settings.kafka.topic,
        group = %settings.kafka.group_id,
        protocol = ?settings.kafka.group_protocol,
        "subscribed"
    );
    let mut every = Chores::new(Duration::from_millis(
        settings.processing.commit_interval_ms,
    ));
    let mut result = Ok(());
    let topic = settings.kafka.topic.as_str();
    while !shutdown.is_cancelled() {
        health.polled();
        if let Err(e) = poll_once(&consumer, &health) {
            result = Err(e);
            break;
        }
        while let Ok(halted) = signals.halts.try_recv() {
            consumer.context().halt(&consumer, halted);
        }
        if let Err(e) = follow_standing(&consumer, &health, topic, &mut signals.standing) {
            tracing::error!(event = crate::logs::KAFKA_FATAL, error = %e, "fatal Kafka error");
            result = Err(e);
            shutdown.cancel();
        }
        rewind_reported(&consumer, &mut signals.rewinds);
        every.run_due(&consumer);
    }
    // Shutdown: give every partition up as a revoke would (drain, commit), then leave the group.
    shutdown.cancel();
    leave(consumer);
    result
}

/// One poll: a message goes to its partition's worker, an error is logged; `Err` only for a
/// fatal one.
fn poll_once(consumer: &BaseConsumer<GroupContext>, health: &Health) -> Result<(), KafkaError> {
    match consumer.poll(POLL_INTERVAL) {
        Some(Ok(message)) => consumer.context().dispatch(consumer, &message),
        Some(Err(e)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) => {
            // The partition's next message is gone (retention deleted it before it was
            // processed, or an offset is out of range): librdkafka jumps as
            // `auto.offset.reset` says. Messages were skipped; say so loudly.
            metrics::counter!(crate::metrics::OFFSET_RESETS).increment(1);
            tracing::error!(error = %e, "offset reset: messages of a partition were skipped");
        }
        Some(Err(e)) if is_fatal(&e, health.has_joined()) => {
            tracing::error!(event = crate::logs::KAFKA_FATAL, error = %e, "fatal Kafka error");
            return Err(e);
        }
        Some(Err(e)) => tracing::warn!(error = %e, "Kafka error; librdkafka retries"),
        None => {}
    }
    Ok(())
}

/// Steps out of the group or back in as the database probe says. Only the latest change
/// counts (a step out and back in while a drain held this thread would be a needless leave
/// and rejoin).
fn follow_standing(
    consumer: &BaseConsumer<GroupContext>,
    health: &Health,
    topic: &str,
    standing: &mut mpsc::UnboundedReceiver<Change>,
) -> Result<(), KafkaError> {
    let mut latest = None;
    while let Ok(change) = standing.try_recv() {
        latest = Some(change);
    }
    let wanted = |c: &Change| matches!(c, Change::StepOut { .. }) != health.is_stepped_out();
    match latest.filter(wanted) {
        Some(change) => change_standing(consumer, health, topic, change),
        None => Ok(()),
    }
}

/// Reports pile up while a rewind waits on the database: handles the latest of each
/// partition once per turn.
fn rewind_reported(
    consumer: &BaseConsumer<GroupContext>,
    rewinds: &mut mpsc::UnboundedReceiver<Vec<Rewind>>,
) {
    let mut rewound = BTreeMap::new();
    while let Ok(reports) = rewinds.try_recv() {
        for r in reports {
            let epoch = rewound.entry(r.partition).or_insert(r.epoch);
            *epoch = (*epoch).max(r.epoch);
        }
    }
    if !rewound.is_empty() {
        let rewound: Vec<Rewind> = rewound
            .into_iter()
            .map(|(partition, epoch)| Rewind { partition, epoch })
            .collect();
        consumer.context().rewind(consumer, &rewound);
    }
}

/// The poll thread's periodic work, each at its own pace.
struct Chores {
    commit_interval: Duration,
    last_commit: Instant,
    last_resume_check: Instant,
    last_restart_check: Instant,
}

impl Chores {
    fn new(commit_interval: Duration) -> Self {
        let now = Instant::now();
        Chores {
            commit_interval,
            last_commit: now,
            last_resume_check: now,
            last_restart_check: now,
        }
    }

    /// Restarts partitions a rewind left without a worker, resumes partitions whose queue has
    /// room, commits the offsets the database holds.
    fn run_due(&mut self, consumer: &BaseConsumer<GroupContext>) {
        if self.last_restart_check.elapsed() >= crate::kafka::rewinds::CHECK_INTERVAL {
            consumer.context().restart_unstarted(consumer);
            self.last_restart_check = Instant::now();
        }
        if self.last_resume_check.elapsed() >= RESUME_CHECK {
            consumer.context().resume_ready(consumer);
            self.last_resume_check = Instant::now();
        }
        if self.last_commit.elapsed() >= self.commit_interval {
            consumer.context().commit_processed(consumer);
            self.last_commit = Instant::now();
        }
    }
}

/// Gives every partition up as a revoke would (drain, commit), then leaves the group.
fn leave(consumer: BaseConsumer<GroupContext>) {
    consumer.context().shutdown(&consumer);
    consumer.unsubscribe();
    // Serve the unsubscribe's own rebalance before dropping: a rebalance event left unpolled
    // can hang the close that drop performs (librdkafka #4884).
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    while Instant::now() < deadline && consumer.assignment().is_ok_and(|a| a.count() > 0) {
        let _ = consumer.poll(POLL_INTERVAL);
    }
    drop(consumer);
    tracing::info!("left the consumer group");
}

/// Leaves the group (its revoke drains and commits as any revoke does, in the polls that
/// follow) or joins it again. The group hands the partitions to the replicas that can serve
/// them; a replica out of it keeps probing the database ([`super::standing`]).
fn change_standing(
    consumer: &BaseConsumer<GroupContext>,
    health: &Health,
    topic: &str,
    change: Change,
) -> Result<(), KafkaError> {
    match change {
        Change::StepOut { reason } => {
            metrics::counter!(crate::metrics::STEP_OUTS).increment(1);
            metrics::gauge!(crate::metrics::STEPPED_OUT).set(1.0);
            tracing::warn!(
                reason = %reason,
                owned = ?consumer.context().owned(),
                "stepping out of the consumer group: the database does not answer; its \
                 partitions go to replicas that can serve them"
            );
            health.stepped_out(Some(reason));
            consumer.unsubscribe();
        }
        Change::StepIn => {
            tracing::info!("rejoining the consumer group: the database answers again");
            consumer.subscribe(&[topic])?;
            health.stepped_out(None);
            metrics::gauge!(crate::metrics::STEPPED_OUT).set(0.0);
        }
    }
    Ok(())
}

/// librdkafka retries everything else itself; these need an operator (or a restart): refused
/// credentials, an unknown SCRAM user, and, until the replica first joined its group, a TLS
/// failure (a broker certificate the configured CA does not vouch for). Retrying those would
/// only hide a misconfiguration behind a silent loop. Once it has worked, a TLS failure is more
/// likely a broker restarting or a network blip mid-handshake: librdkafka retries it.
fn is_fatal(e: &KafkaError, joined: bool) -> bool {
    let ssl = e.rdkafka_error_code() == Some(RDKafkaErrorCode::SSL);
    (ssl && !joined)
        || matches!(e, KafkaError::MessageConsumptionFatal(_))
        || matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::GroupAuthorizationFailed
                    | RDKafkaErrorCode::SaslAuthenticationFailed
            )
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_kafka_errors() {
        let joined = true;
        assert!(is_fatal(
            &KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::UnknownMemberId),
            joined
        ));
        assert!(is_fatal(
            &KafkaError::MessageConsumption(RDKafkaErrorCode::TopicAuthorizationFailed),
            joined
        ));
        assert!(is_fatal(
            &KafkaError::MessageConsumption(RDKafkaErrorCode::Authentication),
            joined
        ));
        let ssl = KafkaError::MessageConsumption(RDKafkaErrorCode::SSL);
        assert!(
            is_fatal(&ssl, false),
            "before the first join: misconfigured"
        );
        assert!(!is_fatal(&ssl, true), "after it: retried");
        assert!(!is_fatal(
            &KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure),
            joined
        ));
        assert!(!is_fatal(
            &KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition),
            joined
        ));
    }
}
