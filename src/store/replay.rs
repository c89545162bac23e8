//! `replay`'s side of the database: moving a partition's recorded offset back, so that its
//! messages from there are read and decided again, while replicas run.
//!
//! The recorded offset is where an owner resumes, so rewinding it is the replay; what must not
//! happen is a running worker carrying on from its old position and recording it again over
//! the rewind. So the rewind takes the partitions' fences first (the `partition_owners` rows,
//! in partition order, as batches and claims do: it waits for the batches in flight), moves the
//! offsets back, and moves each partition's epoch on, marking it `rewound_at`. Every later
//! batch of the old epoch is fenced; the owner sees the mark, claims the partition again and
//! fetches from the rewound offset ([`crate::kafka::rewinds`]).

use std::collections::{BTreeMap, HashSet};

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::store::Failure;
use crate::store::ownership::LOCK_OWNERS;

/// One partition moved back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Rewound {
    pub partition: i32,
    /// The offset recorded before (the next offset to read).
    pub from: i64,
    pub to: i64,
}

/// Moves the recorded offset of each partition in `targets` back to its target; a partition
/// whose recorded offset is already at or before its target is left alone (moving forward
/// would skip events). Returns the partitions moved.
pub async fn rewind(
    db: &mut Client,
    group: &str,
    topic: &str,
    targets: &BTreeMap<i32, i64>,
) -> Result<Vec<Rewound>, Failure> {
    let partitions: Vec<i32> = targets.keys().copied().collect();
    let offsets: Vec<i64> = targets.values().copied().collect();
    let tx = db.transaction().await?;
    // The fences, in the order batches and claims take them: the batches in flight end first,
    // and none of the current epochs commits after this transaction.
    tx.execute_typed(
        LOCK_OWNERS,
        &[
            (&group, Type::TEXT),
            (&topic, Type::TEXT),
            (&partitions, Type::INT4_ARRAY),
        ],
    )
    .await?;
    let rows = tx
        .query_typed(
            "WITH before AS (
                 SELECT partition, next_offset FROM partition_offsets
                 WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3)
                 FOR UPDATE)
             UPDATE partition_offsets o SET next_offset = t.target, updated_at = now()
             FROM unnest($3::int[], $4::bigint[]) AS t(p, target)
             JOIN before b ON b.partition = t.p
             WHERE o.consumer_group = $1 AND o.topic = $2 AND o.partition = t.p
               AND t.target < b.next_offset
             RETURNING o.partition, b.next_offset, o.next_offset",
            &[
                (&group, Type::TEXT),
                (&topic, Type::TEXT),
                (&partitions, Type::INT4_ARRAY),
                (&offsets, Type::INT8_ARRAY),
            ],
        )
        .await?;
    let mut moved = rows
        .iter()
        .map(|r| {
            Ok(Rewound {
                partition: r.try_get(0)?,
                from: r.try_get(1)?,
                to: r.try_get(2)?,
            })
        })
        .collect::<Result<Vec<_>, Failure>>()?;
    moved.sort_by_key(|r| r.partition);
    let moved_partitions: Vec<i32> = moved.iter().map(|r| r.partition).collect();
    tx.execute_typed(
        "UPDATE partition_owners SET epoch = epoch + 1, rewound_at = now()
         WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3)",
        &[
            (&group, Type::TEXT),
            (&topic, Type::TEXT),
            (&moved_partitions, Type::INT4_ARRAY),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(moved)
}

/// Of the events `(offset, id)` read again from `topic`'s `partition`, how many distinct ids
/// would decide again: not recorded, and not at an offset already dead-lettered (an event the
/// database could not store is dead-lettered again there, which changes nothing).
pub async fn count_again(
    db: &Client,
    topic: &str,
    partition: i32,
    events: &[(i64, String)],
) -> Result<u64, Failure> {
    let offsets: Vec<i64> = events.iter().map(|(offset, _)| *offset).collect();
    let mut dead: HashSet<i64> = HashSet::new();
    for chunk in offsets.chunks(10_000) {
        for row in db
            .query(
                "SELECT \"offset\" FROM dead_letters
                 WHERE topic = $1 AND partition = $2 AND \"offset\" = ANY($3::bigint[])",
                &[&topic, &partition, &chunk],
            )
            .await?
        {
            dead.insert(row.try_get(0)?);
        }
    }
    let ids: HashSet<String> = events
        .iter()
        .filter(|(offset, _)| !dead.contains(offset))
        .map(|(_, id)| id.clone())
        .collect();
    Ok(ids.len() as u64 - count_recorded(db, &ids).await?)
}

/// How many of `ids` are recorded in `processed_events` (in any period kept).
async fn count_recorded(db: &Client, ids: &HashSet<String>) -> Result<u64, Failure> {
    let mut recorded = 0;
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    for chunk in ids.chunks(10_000) {
        let row = db
            .query_one(
                "SELECT count(DISTINCT event_id) FROM processed_events
                 WHERE event_id = ANY($1::text[])",
                &[&chunk],
            )
            .await?;
        recorded += row.try_get::<_, i64>(0)? as u64;
    }
    Ok(recorded)
}

/// A period whose recorded event ids were dropped (past the dedupe horizon).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GonePeriod {
    pub period: i32,
    /// RFC 3339, UTC; none for the first period, which has no beginning.
    pub started_at: Option<String>,
    pub ended_at: String,
}

/// The periods whose event ids are dropped and that ended at or after `since_ms` (ms since
/// the epoch): a message produced then was decided no earlier, so its id may have been
/// recorded in one of them, and forgotten with it.
pub async fn gone_periods(db: &Client, since_ms: i64) -> Result<Vec<GonePeriod>, Failure> {
    let rows = db
        .query(
            &format!(
                "SELECT period, {}, {} FROM history_periods
                 WHERE events_gone AND ended_at >= to_timestamp($1::float8 / 1000)
                 ORDER BY period",
                super::utc_text("started_at"),
                super::utc_text("ended_at")
            ),
            &[&(since_ms as f64)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(GonePeriod {
                period: r.try_get(0)?,
                started_at: r.try_get(1)?,
                ended_at: r.try_get(2)?,
            })
        })
        .collect()
}
