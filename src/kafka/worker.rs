//! One partition's worker: an async task that takes the partition's deliveries in offset order,
//! groups them into batches, applies each batch in one transaction, and only then records the
//! batch's end as the partition's processed offset.
//!
//! Batching costs no wait: a batch is what is waiting when the worker is free (the deliveries
//! that arrived while its last transaction ran), up to the rule of
//! [`crate::domain::Batch::is_full`]. An idle worker applies a lone delivery at once; under load
//! the batches grow by themselves, as a group commit's do. `batch_linger_ms`, 0 by default, lets
//! a partial batch wait that long for more.
//!
//! With `processing.combine_partitions` a whole batch first goes to the replica's combiner
//! ([`crate::kafka::combiner`]), which may apply it in one transaction with other partitions'
//! batches; what it does not apply comes back, and goes on alone as below.
//!
//! Transient failures are retried with capped exponential backoff; the offset does not move.
//! A batch still failing after `retry_deadline_ms` is fatal. A batch the database refuses for
//! a value one of its messages carries (a data failure) is applied in halves until that message
//! stands alone; it is then dead-lettered as `unstorable` and the rest applies as usual. When told to stop (partition
//! revoked, shutdown) the worker finishes the transaction in progress, if any, and exits;
//! deliveries not yet in a transaction are left to whoever reads the partition next.
//!
//! Within one ownership offsets only move forward: a delivery at or below one already taken
//! (librdkafka can rewind its fetch by a message around a cooperative rebalance, as in
//! librdkafka #4637) is already in a batch here, and is dropped rather than applied again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::domain::{Batch, DeadLetterLimit, Delivery, LimitExceeded};
use crate::kafka::combiner::{Combiner, Verdict};
use crate::kafka::flow::{Backlog, footprint};
use crate::kafka::offsets::OffsetTracker;
use crate::stats::Stats;
use crate::store::ownership::mark_rewound;
use crate::store::{BatchOutcome, Failure, Guards, Pool, Source, apply_batch, claim};

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// How often a batch of a paused partition looks again whether it was resumed.
const PAUSE_CHECK: Duration = Duration::from_secs(1);

/// Produce-to-commit latency of every event of a batch that just committed.
fn record_latency(batch: &Batch) {
    let now_ms = crate::telemetry::unix_millis() as i64;
    let histogram = metrics::histogram!(crate::metrics::LATENCY_SECONDS);
    for created in batch.timestamps() {
        histogram.record((now_ms - created).max(0) as f64 / 1000.0);
    }
}

/// A batch applied alone: its outcome on its span (the current one), when traces are on. (A
/// combined transaction's span has each part's as an event.)
fn record_outcome(outcome: &BatchOutcome) {
    if crate::traces::enabled() {
        let span = tracing::Span::current();
        span.record("applied", outcome.applied);
        span.record("rejected", outcome.rejected);
        span.record("duplicates", outcome.duplicates);
        span.record("dead_letters", outcome.dead_letters);
    }
}

/// What every worker of a process shares.
#[derive(Clone)]
pub struct WorkerContext {
    pub source: Source,
    /// This replica's name as a partition owner in the database.
    pub owner: String,
    pub pool: Pool,
    pub batch_max_events: usize,
    pub linger: Duration,
    /// Transactions of this replica that may hold SKU locks at once (the lock budget's
    /// holders, shared with the expiry sweep): [`crate::store::lock_budget`].
    pub lock_holders: Arc<tokio::sync::Semaphore>,
    pub backoff_max: Duration,
    pub retry_deadline: Duration,
    pub offsets: Arc<OffsetTracker>,
    pub stats: Arc<Stats>,
    pub guards: Guards,
    /// Where a worker reports a fatal failure; the process then shuts down non-zero.
    pub fatal: mpsc::UnboundedSender<Failure>,
    /// Each partition's poison-pill guard starts as a copy of this one.
    pub dead_letter_limit: DeadLetterLimit,
    /// Where a worker reports that it halted its partition (the poll thread pauses it).
    pub halts: mpsc::UnboundedSender<Halted>,
    /// Rung when a batch queued replies: the relay publishes them at once
    /// ([`crate::kafka::relay::Wake`]).
    pub replies_queued: Arc<tokio::sync::Notify>,
    /// Where batches go first when `processing.combine_partitions` is on.
    pub combiner: Option<Combiner>,
}

/// A partition halted at its dead-letter limit, during which of this replica's ownerships of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Halted {
    pub partition: i32,
    pub ownership: u64,
}

pub struct PartitionWorker {
    pub partition: i32,
    /// Tells this ownership of the partition from later ones by this replica.
    pub ownership: u64,
    /// Unbounded: the poll thread bounds it in bytes, through `backlog` ([`crate::kafka::flow`]).
    pub deliveries: mpsc::UnboundedReceiver<Delivery>,
    pub backlog: Arc<Backlog>,
    pub stop: CancellationToken,
    pub ctx: WorkerContext,
    pub gate: ForwardOnly,
    /// The epoch this worker claimed its partition with; `None` until claimed (when the claim
    /// during the assignment failed, the worker claims before its first batch).
    pub epoch: Option<i64>,
    pub dead_letter_limit: DeadLetterLimit,
}

/// How one part of a batch went.
enum Applied {
    Done,
    /// Nothing done: apply it in halves.
    TooManyLocks,
    /// Nothing done: the database refused a value one of its messages carries (its words).
    Unstorable(String),
    /// Fenced, fatal or told to stop.
    Stop,
}

/// How a batch handed to the combiner went.
enum Combined {
    Done,
    /// Not applied: apply it alone.
    Alone(Batch),
    /// Told to stop before a transaction took it.
    Stopped,
}

/// Admits offsets that move forward only: the first one, then only beyond the last admitted.
#[derive(Debug, Default, Clone, Copy)]
pub struct ForwardOnly {
    next: Option<i64>,
}

impl ForwardOnly {
    /// `next`: the first offset expected (everything before it is done), if known.
    pub fn starting_at(next: Option<i64>) -> Self {
        ForwardOnly { next }
    }

    /// Whether `offset` is new; if so, it becomes the last admitted.
    fn admit(&mut self, offset: i64) -> bool {
        if self.next.is_some_and(|next| offset < next) {
            return false;
        }
        self.next = Some(offset + 1);
        true
    }
}

impl PartitionWorker {
    pub async fn run(mut self) {
        while let Some(mut batch) = self.collect().await {
            if self.stop.is_cancelled() {
                break;
            }
            // Past the dead-letter limit, only the messages before the crossing one go ahead.
            let mut limit = self.dead_letter_limit.clone();
            let halt = limit.admit(batch.malformed()).err().map(|exceeded| {
                let offset = batch.offset_at(exceeded.at);
                batch.truncate(exceeded.at);
                (offset, exceeded)
            });
            if !batch.is_empty() {
                if !self.apply(batch).await {
                    break;
                }
                self.dead_letter_limit = limit;
            }
            if let Some((offset, exceeded)) = halt {
                self.halt(offset, exceeded);
                break;
            }
        }
        tracing::debug!(partition = self.partition, "partition worker stopped");
    }

    /// Applies a batch (retrying transient failures), in halves, in order, when it would lock
    /// too many SKUs at once or the database refuses a value of one of its messages; that
    /// message, once alone, is dead-lettered. `false` when the worker must stop.
    async fn apply(&mut self, batch: Batch) -> bool {
        // Parts still to apply, the next one last, each with whether it is a message already
        // marked unstorable (a dead letter the database refused too cannot be split further).
        let mut parts = vec![(batch, false)];
        let mut first = true;
        while let Some((part, marked)) = parts.pop() {
            let whole = std::mem::take(&mut first);
            // A stopped worker finishes the transaction it is in, not the rest of a split
            // batch: the parts done have their offsets recorded.
            if !whole && self.stop.is_cancelled() {
                return false;
            }
            // Only a whole batch goes to the combiner: the parts of a split one go on alone.
            let part = match self.combined(part, !whole).await {
                Combined::Done => continue,
                Combined::Stopped => return false,
                Combined::Alone(part) => part,
            };
            match self.apply_part(&part).await {
                Applied::Done => {}
                Applied::TooManyLocks => {
                    let (first, second) = part.halves();
                    parts.push((second, false));
                    parts.push((first, false));
                }
                Applied::Unstorable(why) if part.len() > 1 => {
                    metrics::counter!(crate::metrics::BATCH_SPLITS).increment(1);
                    tracing::debug!(
                        partition = self.partition,
                        error = %why,
                        "batch split: the database refused a value of one of its messages"
                    );
                    let (first, second) = part.halves();
                    parts.push((second, false));
                    parts.push((first, false));
                }
                Applied::Unstorable(why) if !marked => {
                    tracing::warn!(
                        partition = self.partition,
                        offset = part.offsets().map(|(first, _)| first),
                        error = %why,
                        "message dead-lettered: the database cannot store it"
                    );
                    parts.push((part.unstorable(&why), true));
                }
                Applied::Unstorable(why) => {
                    let _ = self.ctx.fatal.send(Failure::fatal_from(
                        format!(
                            "partition {}: the database refuses even the dead letter of offset {:?}",
                            self.partition,
                            part.offsets().map(|(first, _)| first)
                        ),
                        why,
                    ));
                    return false;
                }
                Applied::Stop => return false,
            }
        }
        true
    }

    async fn apply_part(&mut self, batch: &Batch) -> Applied {
        let (first, last) = batch.offsets().unwrap_or_default();
        let span = self.batch_span(batch, (first, last));
        match self.apply_with_retry(batch).instrument(span).await {
            Ok(()) => Applied::Done,
            Err(Some(Failure::TooManyLocks { skus })) => {
                metrics::counter!(crate::metrics::BATCH_SPLITS).increment(1);
                tracing::debug!(
                    partition = self.partition,
                    first_offset = first,
                    skus,
                    "batch split: its reservations span too many SKUs for one transaction"
                );
                Applied::TooManyLocks
            }
            Err(Some(Failure::Fenced(why))) => {
                // Not fatal: the partition is someone else's now; the group tells us soon.
                self.ctx.stats.record_fenced();
                tracing::warn!(
                    partition = self.partition,
                    reason = %why,
                    "fenced: another replica owns this partition now; its work here is abandoned"
                );
                Applied::Stop
            }
            Err(Some(Failure::Data(why))) => Applied::Unstorable(crate::logs::chain(&why)),
            Err(Some(behind @ Failure::Behind { .. })) => {
                // Marked: the poll thread restarts the partition from the recorded offset.
                tracing::warn!(
                    event = crate::logs::PARTITION_BEHIND,
                    partition = self.partition,
                    reason = %behind,
                    "partition behind its fetch position"
                );
                Applied::Stop
            }
            Err(Some(fatal)) => {
                let _ = self.ctx.fatal.send(fatal);
                Applied::Stop
            }
            Err(None) => Applied::Stop,
        }
    }

    /// The span of a batch applied alone. With traces on it follows OpenTelemetry's messaging
    /// conventions and links to each event's context; its outcome is recorded once committed.
    fn batch_span(&self, batch: &Batch, (first, last): (i64, i64)) -> tracing::Span {
        let topic = &self.ctx.source.topic;
        if !crate::traces::enabled() {
            return tracing::info_span!(
                "batch",
                topic = %topic,
                partition = self.partition,
                first_offset = first,
                last_offset = last,
            );
        }
        let span = tracing::info_span!(
            "batch",
            otel.name = %format_args!("process {topic}"),
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.destination.name = %topic,
            messaging.destination.partition.id = %self.partition,
            messaging.consumer.group.name = %self.ctx.source.group,
            messaging.batch.message_count = batch.len(),
            topic = %topic,
            partition = self.partition,
            first_offset = first,
            last_offset = last,
            applied = tracing::field::Empty,
            rejected = tracing::field::Empty,
            duplicates = tracing::field::Empty,
            dead_letters = tracing::field::Empty,
        );
        crate::traces::link_events(&span, batch);
        span
    }

    /// Stops the partition at `offset`, the message that took it past its dead-letter limit:
    /// the partition's offset stays there, and the poll thread pauses the partition.
    fn halt(&self, offset: Option<i64>, exceeded: LimitExceeded) {
        self.ctx.stats.record_halted();
        tracing::error!(
            partition = self.partition,
            offset,
            malformed = exceeded.malformed,
            seen = exceeded.seen,
            "dead-letter limit exceeded: partition halted (a producer is sending bad messages); \
             fix the producer, or raise processing.dead_letter_max_share, then restart"
        );
        let _ = self.ctx.halts.send(Halted {
            partition: self.partition,
            ownership: self.ownership,
        });
    }

    /// Waits for the next batch; `None` when stopped or the partition's channel closed.
    async fn collect(&mut self) -> Option<Batch> {
        let mut batch = Batch::default();
        while batch.is_empty() {
            let d = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                d = self.deliveries.recv() => d?,
            };
            self.take(&mut batch, d);
        }
        let deadline = Instant::now() + self.ctx.linger;
        while !batch.is_full(self.ctx.batch_max_events, self.ctx.source.max_locks) {
            // What waits already (it arrived while the last transaction ran) joins at once.
            match self.deliveries.try_recv() {
                Ok(d) => {
                    self.take(&mut batch, d);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            // Nothing more waits: apply now, unless a linger was set and has time left.
            if Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                _ = sleep_until(deadline) => break,
                d = self.deliveries.recv() => match d {
                    Some(d) => self.take(&mut batch, d),
                    None => break,
                },
            }
        }
        Some(batch)
    }

    /// Adds `d` to the batch unless this ownership already took its offset.
    fn take(&mut self, batch: &mut Batch, d: Delivery) {
        self.backlog.taken(footprint(&d));
        if !self.gate.admit(d.offset) {
            // Counted, and logged at debug only: an offset reset can make these many.
            metrics::counter!(crate::metrics::REWOUND).increment(1);
            tracing::debug!(
                partition = self.partition,
                offset = d.offset,
                "delivery at an offset already taken; dropped"
            );
            return;
        }
        batch.push(d);
    }

    /// `Err(Some(_))`: fatal; `Err(None)`: abandoned because the worker was told to stop.
    async fn apply_with_retry(&mut self, batch: &Batch) -> Result<(), Option<Failure>> {
        let Some((first, last)) = batch.offsets() else {
            return Ok(());
        };
        let mut started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut paused = false;
        loop {
            // One of the replica's lock-holding transactions (its lock budget); waiting for
            // one ends when the worker is told to stop, like a backoff.
            let permit = tokio::select! {
                permit = self.ctx.lock_holders.clone().acquire_owned() => permit,
                _ = self.stop.cancelled() => {
                    self.ctx.stats.record_abandoned();
                    return Err(None);
                }
            };
            let attempt = Instant::now();
            let attempted = self.attempt(batch).await;
            drop(permit);
            match attempted {
                Ok(outcome) => {
                    let took = attempt.elapsed();
                    record_outcome(&outcome);
                    self.committed(batch, (first, last), &outcome, (took, 1), paused);
                    return Ok(());
                }
                Err(Failure::Paused(_)) => {
                    // An operator's pause: no deadline. The partition's queue fills and flow
                    // control stops fetching it; a revoke or shutdown ends the wait.
                    if !self.wait_while_paused(&mut paused, first).await {
                        return Err(None);
                    }
                    // The time paused does not count towards the retry deadline.
                    started = Instant::now();
                }
                Err(Failure::Transient(why)) if started.elapsed() < self.ctx.retry_deadline => {
                    self.ctx.stats.record_retry();
                    tracing::warn!(
                        event = crate::logs::BATCH_RETRY,
                        partition = self.partition,
                        first_offset = first,
                        retry_in_ms = backoff.as_millis() as u64,
                        error = %crate::logs::chain(&why),
                        "batch failed, will retry"
                    );
                    tokio::select! {
                        _ = self.stop.cancelled() => {
                            self.ctx.stats.record_abandoned();
                            return Err(None);
                        }
                        _ = sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.ctx.backoff_max);
                }
                Err(Failure::Transient(why)) => {
                    return Err(Some(Failure::fatal_from(
                        format!(
                            "partition {}: batch at offset {first} still failing after {:?}",
                            self.partition, self.ctx.retry_deadline
                        ),
                        why,
                    )));
                }
                Err(other) => return Err(Some(other)),
            }
        }
    }

    /// A batch committed: its counters and metrics, and the offset after it, which may now
    /// advance (its effect is in the database).
    fn committed(
        &self,
        batch: &Batch,
        (first, last): (i64, i64),
        outcome: &BatchOutcome,
        (took, partitions): (Duration, usize),
        was_paused: bool,
    ) {
        if was_paused {
            tracing::info!(
                event = crate::logs::PAUSE_LIFTED,
                partition = self.partition,
                "partition resumed"
            );
        }
        if outcome.replies > 0 {
            self.ctx.replies_queued.notify_one();
        }
        let partition = self.partition.to_string();
        metrics::gauge!(crate::metrics::PAUSED, "partition" => partition.clone()).set(0.0);
        record_latency(batch);
        metrics::histogram!(crate::metrics::APPLY_SECONDS).record(took.as_secs_f64());
        metrics::histogram!(crate::metrics::BATCH_SIZE).record(batch.len() as f64);
        self.ctx.stats.record_batch(outcome);
        self.ctx.offsets.processed(self.partition, last + 1);
        metrics::gauge!(crate::metrics::RECORDED_OFFSET, "partition" => partition)
            .set((last + 1) as f64);
        tracing::debug!(
            event = crate::logs::BATCH_COMMITTED,
            partition = self.partition,
            first_offset = first,
            last_offset = last,
            applied = outcome.applied,
            rejected = outcome.rejected,
            duplicates = outcome.duplicates,
            dead_letters = outcome.dead_letters,
            transaction_partitions = partitions,
            "batch committed"
        );
    }

    /// Hands a whole batch (not `alone`), short of full, to the replica's combiner, if it has
    /// one and the partition is claimed (a claim still to make is made on the path alone), and
    /// waits for
    /// its verdict. Told to stop meanwhile, it takes the batch back if no transaction took it
    /// yet, else waits for that transaction, as for one of its own.
    async fn combined(&mut self, batch: Batch, alone: bool) -> Combined {
        let (Some(combiner), Some(epoch), Some((first, last))) =
            (&self.ctx.combiner, self.epoch, batch.offsets())
        else {
            return Combined::Alone(batch);
        };
        // A full batch fills a transaction by itself: nothing to share it with.
        if alone || batch.is_full(self.ctx.batch_max_events, self.ctx.source.max_locks) {
            return Combined::Alone(batch);
        }
        let mut ticket = combiner.submit(self.partition, epoch, batch);
        let verdict = tokio::select! {
            biased;
            verdict = ticket.verdict() => verdict,
            _ = self.stop.cancelled() => match ticket.withdraw() {
                Some(_) => {
                    self.ctx.stats.record_abandoned();
                    return Combined::Stopped;
                }
                None => ticket.verdict().await,
            },
        };
        match verdict {
            Some((
                batch,
                Verdict::Committed {
                    outcome,
                    took,
                    partitions,
                    span,
                },
            )) => {
                // Its log lines belong to the transaction's span.
                let _in_span = span.enter();
                self.committed(&batch, (first, last), &outcome, (took, partitions), false);
                Combined::Done
            }
            Some((batch, Verdict::Alone)) => Combined::Alone(batch),
            None => {
                // The batch is gone with the combiner: going on would skip its offsets.
                let _ = self.ctx.fatal.send(Failure::fatal(format!(
                    "partition {}: the combiner stopped with the batch at offset {first}",
                    self.partition
                )));
                Combined::Stopped
            }
        }
    }

    /// Waits a while for an operator's resume (says so once, when the pause is first met);
    /// `false` when the worker was told to stop meanwhile (the batch is abandoned).
    async fn wait_while_paused(&mut self, paused: &mut bool, first: i64) -> bool {
        let partition = self.partition.to_string();
        if !*paused {
            *paused = true;
            metrics::gauge!(crate::metrics::PAUSED, "partition" => partition.clone()).set(1.0);
            tracing::info!(
                event = crate::logs::PAUSE_MET,
                partition = self.partition,
                first_offset = first,
                "partition paused by an operator: waiting for resume"
            );
        }
        tokio::select! {
            _ = self.stop.cancelled() => {
                metrics::gauge!(crate::metrics::PAUSED, "partition" => partition).set(0.0);
                self.ctx.stats.record_abandoned();
                false
            }
            _ = sleep(PAUSE_CHECK) => true,
        }
    }

    /// One try: claim the partition if that is still to do, then apply the batch.
    async fn attempt(&mut self, batch: &Batch) -> Result<BatchOutcome, Failure> {
        let epoch = match self.epoch {
            Some(epoch) => epoch,
            None => {
                let claims = claim(
                    &self.ctx.pool,
                    &self.ctx.source,
                    &self.ctx.owner,
                    &[self.partition],
                )
                .await?;
                let claimed = claims.get(&self.partition).ok_or_else(|| {
                    Failure::fatal(format!(
                        "claiming partition {} returned no row",
                        self.partition
                    ))
                })?;
                // This worker fetches from Kafka's committed offset (the claim during the
                // assignment failed). When the database records an earlier one, the messages
                // between were never applied: the partition must be read again from there.
                let first = batch.offsets().map_or(0, |(first, _)| first);
                if let Some(recorded) = claimed.next_offset.filter(|r| *r < first) {
                    mark_rewound(
                        &self.ctx.pool,
                        &self.ctx.source,
                        self.partition,
                        claimed.epoch,
                    )
                    .await?;
                    return Err(Failure::Behind {
                        partition: self.partition,
                        recorded,
                        first,
                    });
                }
                self.epoch = Some(claimed.epoch);
                claimed.epoch
            }
        };
        apply_batch(
            &self.ctx.pool,
            &self.ctx.source,
            batch,
            self.ctx.guards,
            epoch,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::ForwardOnly;

    #[test]
    fn admits_only_offsets_beyond_the_last_admitted() {
        let mut gate = ForwardOnly::starting_at(None);
        assert!(gate.admit(40));
        assert!(gate.admit(41));
        assert!(!gate.admit(41), "the same offset again");
        assert!(!gate.admit(7), "a rewind");
        assert!(gate.admit(45), "a gap (compaction, transactions) moves on");

        let mut resumed = ForwardOnly::starting_at(Some(100));
        assert!(
            !resumed.admit(99),
            "before the recorded offset: already applied"
        );
        assert!(resumed.admit(100));
    }
}
