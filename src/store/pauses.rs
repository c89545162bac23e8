//! Partitions paused by an operator, kept in `partition_pauses`. A batch of a paused partition
//! applies nothing ([`super::apply`] reads the pause under the partition's fence), whichever
//! replica owns the partition; pausing takes the same row locks first, so it returns only once
//! every batch in flight on those partitions has ended, and none commits after.

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::store::{Failure, utc_text};

/// Which of some partitions (`$3`) are paused, [`WHOLE_TOPIC`] for all: sent right after the batch's
/// [`FENCE`](crate::store::ownership::FENCE), as a statement of its own. Under READ COMMITTED a
/// statement reads what was committed when it started; the fence may start before a pause
/// commits and get the row only after (it waited for the pause's lock), so a pause read in the
/// fence's own statement would be missed, and the batch would commit after `pause` returned.
pub(crate) const PAUSED: &str = "
    SELECT partition FROM partition_pauses
    WHERE consumer_group = $1 AND topic = $2 AND (partition = ANY($3::int[]) OR partition = -1)";

/// The whole topic, in `partition_pauses.partition`.
pub const WHOLE_TOPIC: i32 = -1;

/// One pause: a partition, or [`WHOLE_TOPIC`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pause {
    pub partition: i32,
    /// RFC 3339, UTC.
    pub paused_at: String,
    pub paused_by: String,
    pub reason: Option<String>,
}

/// Pauses `partitions` (each, or [`WHOLE_TOPIC`]) of `group` on `topic`; pausing again changes
/// nothing. Returns once no batch of them is in flight.
pub async fn pause(
    db: &mut Client,
    group: &str,
    topic: &str,
    partitions: &[i32],
    by: &str,
    reason: Option<&str>,
) -> Result<(), Failure> {
    let tx = db.transaction().await?;
    // Waits for the batches holding these fences; new ones wait for us, then see the pause.
    tx.execute_typed(
        "SELECT 1 FROM partition_owners
         WHERE consumer_group = $1 AND topic = $2 AND ($3 OR partition = ANY($4))
         ORDER BY partition FOR UPDATE",
        &[
            (&group, Type::TEXT),
            (&topic, Type::TEXT),
            (&partitions.contains(&WHOLE_TOPIC), Type::BOOL),
            (&partitions, Type::INT4_ARRAY),
        ],
    )
    .await?;
    tx.execute_typed(
        "INSERT INTO partition_pauses (consumer_group, topic, partition, paused_by, reason)
         SELECT $1, $2, p, $4, $5 FROM unnest($3::int[]) AS t(p)
         ON CONFLICT DO NOTHING",
        &[
            (&group, Type::TEXT),
            (&topic, Type::TEXT),
            (&partitions, Type::INT4_ARRAY),
            (&by, Type::TEXT),
            (&reason, Type::TEXT),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Lifts the pauses of `partitions` (each, or [`WHOLE_TOPIC`]); `None`: every pause of the
/// topic. Returns how many pauses were lifted.
pub async fn resume(
    db: &Client,
    group: &str,
    topic: &str,
    partitions: Option<&[i32]>,
) -> Result<u64, Failure> {
    Ok(db
        .execute_typed(
            "DELETE FROM partition_pauses
             WHERE consumer_group = $1 AND topic = $2 AND ($3::int[] IS NULL OR partition = ANY($3))",
            &[
                (&group, Type::TEXT),
                (&topic, Type::TEXT),
                (&partitions, Type::INT4_ARRAY),
            ],
        )
        .await?)
}

/// The pauses of `group` on `topic`, by partition ([`WHOLE_TOPIC`] first).
pub async fn list(db: &Client, group: &str, topic: &str) -> Result<Vec<Pause>, Failure> {
    let rows = db
        .query_typed(
            &format!(
                "SELECT partition, {}, paused_by, reason FROM partition_pauses
                 WHERE consumer_group = $1 AND topic = $2 ORDER BY partition",
                utc_text("paused_at")
            ),
            &[(&group, Type::TEXT), (&topic, Type::TEXT)],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(Pause {
                partition: row.try_get(0)?,
                paused_at: row.try_get(1)?,
                paused_by: row.try_get(2)?,
                reason: row.try_get(3)?,
            })
        })
        .collect()
}
