//! One transaction for several partitions' batches (`processing.combine_partitions`).
//!
//! At low and medium rates each partition's batch is small, and a transaction's fixed cost
//! (its statements, its commit) is paid per partition. So the workers of a replica hand their
//! batches here, and this replica's combiner applies what waits in one transaction
//! ([`crate::store::apply_parts`]): the parts are decided one after the other, exactly as their
//! own transactions back to back would be, each with its own fence, pause and recorded offset.
//!
//! - What waits while a transaction runs goes into the next one, as a worker's deliveries do
//!   into its next batch: a second transaction starts beside a running one only when what waits
//!   fills a whole batch (at full load every part fills one alone, and the partitions run side
//!   by side as they would without this). Each is one of the lock budget's holders.
//! - The parts together keep one batch's caps (events, lines, bytes), so a transaction's locks,
//!   memory and time stay a batch's.
//! - Only success is shared. A combined transaction that fails for any reason (a part fenced or
//!   paused, a lock held elsewhere past [`COMBINED_LOCK_WAIT`], a value the database refuses, a
//!   lost connection) changes nothing, and each part goes back to its worker to be applied
//!   alone, on the path that handles each of these.
//! - Each worker has at most one batch here at a time, so a partition's batches still commit
//!   in offset order; a worker told to stop takes back a batch that no transaction took yet,
//!   and waits for the transaction that did.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::domain::Batch;
use crate::domain::batch::{MAX_BYTES_PER_BATCH, MAX_LINES_PER_BATCH};
use crate::store::{BatchOutcome, Guards, Part, Pool, Source, apply_parts};

/// The longest a transaction of several partitions waits for a lock (at most
/// `database.lock_timeout_ms`): one stalled SKU or claimed partition then holds the others back
/// this long, after which each is applied alone.
pub const COMBINED_LOCK_WAIT: Duration = Duration::from_millis(200);

/// What became of a batch handed to the combiner.
#[derive(Debug)]
pub enum Verdict {
    /// Committed: what it did, how long its transaction took, how many partitions it held, and
    /// its span.
    Committed {
        outcome: BatchOutcome,
        took: Duration,
        partitions: usize,
        span: tracing::Span,
    },
    /// Nothing done: apply it in a transaction of its own.
    Alone,
}

/// A replica's combiner; cloned into every worker's context.
#[derive(Clone, Default)]
pub struct Combiner {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<VecDeque<Entry>>,
    submitted: Notify,
    next_id: AtomicU64,
}

impl Shared {
    /// Poisoning cannot leave the queue half-changed (every change is one push or remove).
    fn queue(&self) -> MutexGuard<'_, VecDeque<Entry>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Entry {
    id: u64,
    partition: i32,
    epoch: i64,
    batch: Batch,
    answer: oneshot::Sender<(Batch, Verdict)>,
}

/// A batch handed over: its verdict comes with the batch back.
pub struct Ticket {
    id: u64,
    shared: Arc<Shared>,
    answer: oneshot::Receiver<(Batch, Verdict)>,
}

impl Ticket {
    /// The batch back, if no transaction took it yet.
    pub fn withdraw(&self) -> Option<Batch> {
        let mut queue = self.shared.queue();
        let at = queue.iter().position(|e| e.id == self.id)?;
        queue.remove(at).map(|e| e.batch)
    }

    /// The verdict; `None` if the combiner is gone (the process is past its stop limit, or a
    /// transaction's task failed) and the batch with it.
    pub async fn verdict(&mut self) -> Option<(Batch, Verdict)> {
        (&mut self.answer).await.ok()
    }
}

impl Drop for Ticket {
    /// A worker aborted while its batch waits leaves nothing behind to be applied.
    fn drop(&mut self) {
        let _ = self.withdraw();
    }
}

/// A transaction's caps: one batch's.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub events: usize,
    pub lines: usize,
    pub bytes: usize,
}

impl Caps {
    /// `batch_max_events`, and the lock budget's SKU locks per transaction.
    pub fn of(batch_max_events: usize, max_locks: usize) -> Self {
        Caps {
            events: batch_max_events,
            lines: max_locks.min(MAX_LINES_PER_BATCH),
            bytes: MAX_BYTES_PER_BATCH,
        }
    }
}

/// A waiting batch's size, for [`choose`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Size {
    partition: i32,
    events: usize,
    lines: usize,
    bytes: usize,
}

fn sizes(queue: &VecDeque<Entry>) -> Vec<Size> {
    queue
        .iter()
        .map(|e| Size {
            partition: e.partition,
            events: e.batch.len(),
            lines: e.batch.line_count(),
            bytes: e.batch.bytes(),
        })
        .collect()
}

/// Which waiting batches (by index, first come first) the next transaction takes: one per
/// partition, none of a partition whose batch is in a transaction already, within `caps`
/// together and at least one; and whether they fill the caps (the next one would not fit, or
/// one is reached).
fn choose(waiting: &[Size], in_flight: &HashSet<i32>, caps: Caps) -> (Vec<usize>, bool) {
    let (mut events, mut lines, mut bytes) = (0, 0, 0);
    let mut taken: Vec<usize> = Vec::new();
    let mut partitions = HashSet::new();
    for (i, s) in waiting.iter().enumerate() {
        if in_flight.contains(&s.partition) || partitions.contains(&s.partition) {
            continue;
        }
        let fits = events + s.events <= caps.events
            && lines + s.lines <= caps.lines
            && bytes + s.bytes <= caps.bytes;
        if !fits && !taken.is_empty() {
            return (taken, true);
        }
        taken.push(i);
        partitions.insert(s.partition);
        (events, lines, bytes) = (events + s.events, lines + s.lines, bytes + s.bytes);
    }
    let full = events >= caps.events || lines >= caps.lines || bytes >= caps.bytes;
    (taken, full)
}

impl Combiner {
    /// Hands `batch` of `partition` (claimed at `epoch`) to the next transaction.
    pub fn submit(&self, partition: i32, epoch: i64, batch: Batch) -> Ticket {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, verdict) = oneshot::channel();
        self.shared.queue().push_back(Entry {
            id,
            partition,
            epoch,
            batch,
            answer,
        });
        self.shared.submitted.notify_one();
        Ticket {
            id,
            shared: self.shared.clone(),
            answer: verdict,
        }
    }

    /// Takes the batches [`choose`] picks out of the queue; empty unless they fill the caps
    /// when `only_full`.
    fn take(&self, in_flight: &HashSet<i32>, caps: Caps, only_full: bool) -> Vec<Entry> {
        let mut queue = self.shared.queue();
        let (chosen, full) = choose(&sizes(&queue), in_flight, caps);
        if only_full && !full {
            return Vec::new();
        }
        // From the back, so that the indices before stay valid.
        let mut taken: Vec<Entry> = chosen
            .iter()
            .rev()
            .filter_map(|&i| queue.remove(i))
            .collect();
        taken.reverse();
        taken
    }

    /// Runs the transactions until `stop` (cancelled once every worker has ended).
    pub async fn run(self, apply: Applier, holders: Arc<Semaphore>, stop: CancellationToken) {
        let mut running: JoinSet<()> = JoinSet::new();
        let mut partitions_of: HashMap<tokio::task::Id, Vec<i32>> = HashMap::new();
        let mut in_flight: HashSet<i32> = HashSet::new();
        loop {
            // A second transaction beside a running one only for a full one.
            let only_full = !running.is_empty();
            let ready = !self.take_peek_empty(&in_flight, apply.caps, only_full);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                    let id = match done {
                        Ok((id, ())) => id,
                        Err(e) => {
                            tracing::error!(error = %e, "a combined transaction's task failed");
                            e.id()
                        }
                    };
                    for p in partitions_of.remove(&id).unwrap_or_default() {
                        in_flight.remove(&p);
                    }
                }
                permit = holders.clone().acquire_owned(), if ready => {
                    let Ok(permit) = permit else { return };
                    // The workers that one fetch woke submit within microseconds of each other:
                    // let them, so that one transaction takes them all.
                    tokio::task::yield_now().await;
                    if !only_full && !apply.gather.is_zero() {
                        tokio::time::sleep(apply.gather).await;
                    }
                    let taken = self.take(&in_flight, apply.caps, only_full);
                    if taken.is_empty() {
                        continue;
                    }
                    let partitions: Vec<i32> = taken.iter().map(|e| e.partition).collect();
                    in_flight.extend(&partitions);
                    let task = running.spawn(apply.clone().transaction(taken, permit));
                    partitions_of.insert(task.id(), partitions);
                }
                _ = self.shared.submitted.notified(), if !ready => {}
            }
        }
    }

    /// Whether the next transaction would take nothing now.
    fn take_peek_empty(&self, in_flight: &HashSet<i32>, caps: Caps, only_full: bool) -> bool {
        let (chosen, full) = choose(&sizes(&self.shared.queue()), in_flight, caps);
        chosen.is_empty() || (only_full && !full)
    }
}

/// What a combined transaction needs besides its parts.
#[derive(Clone)]
pub struct Applier {
    pub pool: Pool,
    pub source: Source,
    pub guards: Guards,
    pub caps: Caps,
    /// `database.lock_timeout_ms`: a combined transaction waits at most the lesser of this and
    /// [`COMBINED_LOCK_WAIT`].
    pub lock_timeout: Duration,
    /// `processing.combine_gather_us`.
    pub gather: Duration,
}

impl Applier {
    /// One transaction over `taken`, holding one of the lock budget's permits; each part's
    /// verdict goes back to its worker with its batch.
    async fn transaction(self, taken: Vec<Entry>, permit: OwnedSemaphorePermit) {
        let parts: Vec<Part<'_>> = taken
            .iter()
            .map(|e| Part {
                batch: &e.batch,
                epoch: e.epoch,
            })
            .collect();
        let lock_wait = (parts.len() > 1).then(|| COMBINED_LOCK_WAIT.min(self.lock_timeout));
        let span = self.span(&taken);
        let started = Instant::now();
        let applied = apply_parts(&self.pool, &self.source, &parts, self.guards, lock_wait)
            .instrument(span.clone())
            .await;
        let took = started.elapsed();
        drop(parts);
        drop(permit);
        let partitions = taken.len();
        metrics::histogram!(crate::metrics::TRANSACTION_PARTITIONS).record(partitions as f64);
        match applied {
            Ok(outcomes) => {
                record_parts(&span, &taken, &outcomes);
                for (entry, outcome) in taken.into_iter().zip(outcomes) {
                    let verdict = Verdict::Committed {
                        outcome,
                        took,
                        partitions,
                        span: span.clone(),
                    };
                    let _ = entry.answer.send((entry.batch, verdict));
                }
            }
            Err(failure) => {
                metrics::counter!(crate::metrics::COMBINED_FALLBACKS).increment(1);
                tracing::debug!(
                    parent: &span,
                    partitions,
                    error = %crate::logs::chain(&failure),
                    "combined transaction failed; its partitions' batches are applied alone"
                );
                for entry in taken {
                    let _ = entry.answer.send((entry.batch, Verdict::Alone));
                }
            }
        }
    }
}

impl Applier {
    /// The span of one combined transaction (none when traces are off): the messaging
    /// conventions' batch span for several partitions, linked to every event of every part.
    fn span(&self, taken: &[Entry]) -> tracing::Span {
        if !crate::traces::enabled() {
            return tracing::Span::none();
        }
        let topic = &self.source.topic;
        let partitions: Vec<i32> = taken.iter().map(|e| e.partition).collect();
        let span = tracing::info_span!(
            "batch",
            otel.name = %format_args!("process {topic}"),
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.destination.name = %topic,
            messaging.consumer.group.name = %self.source.group,
            messaging.batch.message_count = taken.iter().map(|e| e.batch.len()).sum::<usize>(),
            transaction_partitions = partitions.len(),
            partitions = %crate::logs::list(&partitions),
        );
        for entry in taken {
            crate::traces::link_events(&span, &entry.batch);
        }
        span
    }
}

/// Each part's offsets and outcome, as an event of the combined transaction's span.
fn record_parts(span: &tracing::Span, taken: &[Entry], outcomes: &[BatchOutcome]) {
    if !crate::traces::enabled() {
        return;
    }
    for (entry, outcome) in taken.iter().zip(outcomes) {
        let (first, last) = entry.batch.offsets().unwrap_or_default();
        tracing::debug!(
            parent: span,
            partition = entry.partition,
            first_offset = first,
            last_offset = last,
            applied = outcome.applied,
            rejected = outcome.rejected,
            duplicates = outcome.duplicates,
            dead_letters = outcome.dead_letters,
            "part committed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(partition: i32, events: usize) -> Size {
        Size {
            partition,
            events,
            lines: events,
            bytes: events * 100,
        }
    }

    const CAPS: Caps = Caps {
        events: 10,
        lines: 10,
        bytes: 1 << 20,
    };

    #[test]
    fn takes_first_come_within_the_caps_one_batch_per_partition() {
        let none = HashSet::new();
        let waiting = [size(1, 3), size(2, 3), size(1, 2), size(3, 4), size(4, 1)];
        assert_eq!(
            choose(&waiting, &none, CAPS),
            (vec![0, 1, 3], true),
            "partition 1's second batch waits for its first; 4 would pass the cap"
        );
        assert_eq!(
            choose(&[size(1, 3), size(2, 3)], &none, CAPS),
            (vec![0, 1], false),
            "room for more: not full"
        );
        assert_eq!(
            choose(&[size(1, 10)], &none, CAPS),
            (vec![0], true),
            "one batch at the cap is full"
        );
    }

    #[test]
    fn takes_one_over_the_caps_alone_and_skips_partitions_in_a_transaction() {
        let none = HashSet::new();
        assert_eq!(
            choose(&[size(1, 30), size(2, 1)], &none, CAPS),
            (vec![0], true),
            "at least one, however large"
        );
        let busy = HashSet::from([1]);
        assert_eq!(
            choose(&[size(1, 3), size(2, 3)], &busy, CAPS),
            (vec![1], false)
        );
        assert_eq!(choose(&[size(1, 3)], &busy, CAPS), (vec![], false));
        let bytes = Caps { bytes: 500, ..CAPS };
        assert_eq!(
            choose(&[size(1, 3), size(2, 3)], &none, bytes),
            (vec![0], true),
            "bytes cap too"
        );
    }

    #[test]
    fn a_withdrawn_or_dropped_ticket_leaves_nothing_queued() {
        let combiner = Combiner::default();
        let ticket = combiner.submit(1, 7, Batch::default());
        let kept = combiner.submit(2, 7, Batch::default());
        assert!(ticket.withdraw().is_some());
        assert!(ticket.withdraw().is_none(), "once");
        drop(kept);
        assert!(combiner.shared.queue().is_empty());
    }
}
