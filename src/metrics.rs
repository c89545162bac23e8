//! Prometheus metrics (docs/contract.md section 6), recorded with the `metrics` crate and rendered
//! by `/metrics`. Names are the contract; each is described once here.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const EVENTS: &str = "inventory_events_total";
pub const DUPLICATES: &str = "inventory_duplicates_skipped_total";
pub const DEAD_LETTERS: &str = "inventory_dead_letters_total";
pub const BATCH_SIZE: &str = "inventory_batch_size";
pub const APPLY_SECONDS: &str = "inventory_apply_duration_seconds";
pub const LOCK_WAIT_SECONDS: &str = "inventory_advisory_lock_wait_seconds";
pub const LATENCY_SECONDS: &str = "inventory_event_latency_seconds";
pub const RETRIES: &str = "inventory_batch_retries_total";
pub const COMMITTED_OFFSET: &str = "inventory_partition_committed_offset";
pub const LAG: &str = "inventory_partition_lag";
pub const REBALANCES: &str = "inventory_rebalances_total";
pub const ASSIGNED: &str = "inventory_assigned_partitions";
pub const MEMBERSHIP_PHASE: &str = "inventory_membership_phase";
pub const OFFSET_RESETS: &str = "inventory_offset_resets_total";
pub const HALTED: &str = "inventory_partitions_halted_total";
pub const FLOW_PAUSES: &str = "inventory_partition_flow_pauses_total";
pub const FENCED: &str = "inventory_fenced_batches_total";
pub const REWOUND: &str = "inventory_rewound_deliveries_total";
pub const EXPIRED: &str = "inventory_reservations_expired_total";
pub const REPLIES: &str = "inventory_replies_published_total";
pub const RELAY_LAG: &str = "inventory_reply_relay_lag_seconds";
pub const BATCH_SPLITS: &str = "inventory_batch_splits_total";
pub const RECORDED_OFFSET: &str = "inventory_partition_recorded_offset";
pub const END_OFFSET: &str = "inventory_partition_end_offset";
pub const PAUSED: &str = "inventory_partition_paused";
pub const REPLAYS: &str = "inventory_partition_replays_total";
pub const STEP_OUTS: &str = "inventory_group_step_outs_total";
pub const STEPPED_OUT: &str = "inventory_group_stepped_out";
pub const LOCK_HOLDERS: &str = "inventory_lock_budget_transactions";
pub const LOCKS_PER_BATCH: &str = "inventory_lock_budget_locks_per_batch";
pub const TRANSACTION_PARTITIONS: &str = "inventory_transaction_partitions";
pub const COMBINED_FALLBACKS: &str = "inventory_combined_fallbacks_total";
pub const SPANS_EXPORTED: &str = "inventory_trace_spans_exported_total";
pub const SPANS_DROPPED: &str = "inventory_trace_spans_dropped_total";
pub const BUILD_INFO: &str = "inventory_build_info";

/// Produce-to-commit latency buckets from 1 ms to 5 min: a millisecond apart up to 5 ms and no
/// more than half again apart up to a second, so that a percentile (interpolated within its
/// bucket) tells 2 ms from 5 and 20 from 30; coarse beyond, where only alerting looks.
pub const LATENCY_BUCKETS: [f64; 26] = [
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 300.0,
];

/// Histogram samples wait in the recorder until drained: by a scrape, or by this periodic upkeep
/// when nobody scrapes (else they pile up for good). Runs until `stop`.
pub fn spawn_upkeep(
    handle: PrometheusHandle,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => handle.run_upkeep(),
            }
        }
    })
}

/// What kind of series a metric is.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric but `BUILD_INFO`: its kind, its unit if any, and the help `/metrics` shows
/// (docs/contract.md lists them for users).
const DESCRIPTIONS: &[(&str, Kind, Option<Unit>, &str)] = &[
    (
        EVENTS,
        Kind::Counter,
        None,
        "Events decided, by outcome (applied, rejected).",
    ),
    (
        DUPLICATES,
        Kind::Counter,
        None,
        "Deliveries of events already recorded, skipped.",
    ),
    (
        DEAD_LETTERS,
        Kind::Counter,
        None,
        "Bad messages written to dead_letters.",
    ),
    (
        BATCH_SIZE,
        Kind::Histogram,
        None,
        "Deliveries per applied batch.",
    ),
    (
        APPLY_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time to apply and commit one batch.",
    ),
    (
        LOCK_WAIT_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time to take a batch's advisory locks.",
    ),
    (
        LATENCY_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "From the producer's timestamp of an event to the commit of its batch.",
    ),
    (
        RETRIES,
        Kind::Counter,
        None,
        "Batches retried after a transient failure.",
    ),
    (
        COMMITTED_OFFSET,
        Kind::Gauge,
        None,
        "Next offset committed to Kafka, per partition.",
    ),
    (
        LAG,
        Kind::Gauge,
        None,
        "Messages behind the high watermark, per partition (from librdkafka statistics).",
    ),
    (
        REBALANCES,
        Kind::Counter,
        None,
        "Rebalance events, by kind (assign, revoke, lost).",
    ),
    (ASSIGNED, Kind::Gauge, None, "Partitions this replica owns."),
    (
        MEMBERSHIP_PHASE,
        Kind::Gauge,
        None,
        "1 for the replica's membership phase now (consuming, draining, stopped), 0 for the others.",
    ),
    (
        OFFSET_RESETS,
        Kind::Counter,
        None,
        "Times the client jumped over messages it could no longer fetch (retention, out of range).",
    ),
    (
        HALTED,
        Kind::Counter,
        None,
        "Partitions halted at their dead-letter limit (a producer sending mostly bad messages).",
    ),
    (
        FLOW_PAUSES,
        Kind::Counter,
        None,
        "Times a partition stopped fetching because its worker's backlog was full (a slow or stalled partition).",
    ),
    (
        FENCED,
        Kind::Counter,
        None,
        "Batches rolled back because another replica claimed the partition since (a zombie).",
    ),
    (
        REWOUND,
        Kind::Counter,
        None,
        "Deliveries the client handed over again within one ownership of a partition, dropped.",
    ),
    (
        REPLIES,
        Kind::Counter,
        None,
        "Replies to order steps published to the results topic (at least once).",
    ),
    (
        RELAY_LAG,
        Kind::Gauge,
        Some(Unit::Seconds),
        "Age of the oldest reply still queued for the results topic, as this replica's relay last saw it.",
    ),
    (
        EXPIRED,
        Kind::Counter,
        None,
        "Reservations released by the service because their expiry passed.",
    ),
    (
        BATCH_SPLITS,
        Kind::Counter,
        None,
        "Batches split in two because their commits and releases would lock too many SKUs at once.",
    ),
    (
        RECORDED_OFFSET,
        Kind::Gauge,
        None,
        "Next offset of each partition as recorded in the database by this replica's last batch (where a new owner resumes).",
    ),
    (
        END_OFFSET,
        Kind::Gauge,
        None,
        "End offset (high watermark) of each owned partition, as the client last saw it; minus the recorded offset, the lag of the database.",
    ),
    (
        PAUSED,
        Kind::Gauge,
        None,
        "1 while this replica's worker of the partition waits because an operator paused it (`pause`).",
    ),
    (
        REPLAYS,
        Kind::Counter,
        None,
        "Partitions this replica claimed again to read from an offset an operator rewound them to (`replay`).",
    ),
    (
        STEP_OUTS,
        Kind::Counter,
        None,
        "Times this replica left the consumer group because the database did not answer for database.step_out_after_ms.",
    ),
    (
        STEPPED_OUT,
        Kind::Gauge,
        None,
        "1 while this replica is out of the consumer group because the database does not answer.",
    ),
    (
        LOCK_HOLDERS,
        Kind::Gauge,
        None,
        "Transactions of this replica that may hold SKU locks at once: its share of the server's lock table (database.max_replicas).",
    ),
    (
        LOCKS_PER_BATCH,
        Kind::Gauge,
        None,
        "The most SKU locks one of this replica's transactions takes; a batch over it is applied in parts.",
    ),
    (
        TRANSACTION_PARTITIONS,
        Kind::Histogram,
        None,
        "Partitions whose batches one combined transaction applied (processing.combine_partitions).",
    ),
    (
        COMBINED_FALLBACKS,
        Kind::Counter,
        None,
        "Combined transactions that failed and changed nothing; their partitions' batches were applied alone.",
    ),
    (
        SPANS_EXPORTED,
        Kind::Counter,
        None,
        "Trace spans the OTLP exporter delivered (traces.endpoint).",
    ),
    (
        SPANS_DROPPED,
        Kind::Counter,
        None,
        "Trace spans lost: reason export_failed (the collector down or refusing) or queue_full (it is slow or hangs).",
    ),
];

fn describe_all() {
    for &(name, kind, unit, help) in DESCRIPTIONS {
        match (kind, unit) {
            (Kind::Counter, None) => describe_counter!(name, help),
            (Kind::Counter, Some(unit)) => describe_counter!(name, unit, help),
            (Kind::Gauge, None) => describe_gauge!(name, help),
            (Kind::Gauge, Some(unit)) => describe_gauge!(name, unit, help),
            (Kind::Histogram, None) => describe_histogram!(name, help),
            (Kind::Histogram, Some(unit)) => describe_histogram!(name, unit, help),
        }
    }
}

/// Installs the global recorder; call once per process, before anything records.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(BATCH_SIZE.into()),
            &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(TRANSACTION_PARTITIONS.into()),
            &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0],
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(LATENCY_SECONDS.into()),
            &LATENCY_BUCKETS,
        )?
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
        ])?
        .install_recorder()?;
    describe_gauge!(
        BUILD_INFO,
        "1, labelled with this build's release (version) and newest migration (schema): what a rolling update has reached."
    );
    metrics::gauge!(
        BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "schema" => crate::store::migrate::newest_known().to_string()
    )
    .set(1.0);
    describe_all();
    start_at_zero();
    Ok(handle)
}

/// Every counter from zero at start-up, not from its first event: an alert on
/// `increase(...)` then sees the first occurrence too, and a series that never moved still
/// says so instead of being absent.
fn start_at_zero() {
    for outcome in ["applied", "rejected"] {
        metrics::counter!(EVENTS, "outcome" => outcome).absolute(0);
    }
    for kind in ["assign", "revoke", "lost"] {
        metrics::counter!(REBALANCES, "kind" => kind).absolute(0);
    }
    for name in [
        DUPLICATES,
        DEAD_LETTERS,
        RETRIES,
        OFFSET_RESETS,
        HALTED,
        FLOW_PAUSES,
        FENCED,
        REWOUND,
        EXPIRED,
        REPLIES,
        BATCH_SPLITS,
        REPLAYS,
        STEP_OUTS,
        COMBINED_FALLBACKS,
        SPANS_EXPORTED,
    ] {
        metrics::counter!(name).absolute(0);
    }
    for reason in ["export_failed", "queue_full"] {
        metrics::counter!(SPANS_DROPPED, "reason" => reason).absolute(0);
    }
    metrics::gauge!(ASSIGNED).set(0.0);
    metrics::gauge!(STEPPED_OUT).set(0.0);
}
