//! What the database says about a group's partitions: who claimed each last (owner, epoch)
//! and where its processing stands (the offset recorded with the last batch). For `status`.

use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use crate::store::{Failure, utc_text};

/// One partition as recorded; a partition claimed but never applied has no offset yet, and
/// one whose offsets outlived its claim (a restored backup of another group) no owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRecord {
    pub partition: i32,
    pub owner: Option<String>,
    pub epoch: Option<i64>,
    /// RFC 3339, UTC.
    pub claimed_at: Option<String>,
    pub next_offset: Option<i64>,
    /// When the offset was last recorded; RFC 3339, UTC.
    pub recorded_at: Option<String>,
}

/// Every partition of `group` on `topic` that has an owner or an offset, by partition.
pub async fn partitions(
    db: &impl GenericClient,
    group: &str,
    topic: &str,
) -> Result<Vec<PartitionRecord>, Failure> {
    let rows = db
        .query_typed(
            &format!(
                "SELECT coalesce(o.partition, f.partition), o.owner, o.epoch, {}, f.next_offset, {}
                 FROM (SELECT * FROM partition_owners WHERE consumer_group = $1 AND topic = $2) o
                 FULL JOIN (SELECT * FROM partition_offsets
                            WHERE consumer_group = $1 AND topic = $2) f
                     ON f.partition = o.partition
                 ORDER BY 1",
                utc_text("o.claimed_at"),
                utc_text("f.updated_at")
            ),
            &[(&group, Type::TEXT), (&topic, Type::TEXT)],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(PartitionRecord {
                partition: row.try_get(0)?,
                owner: row.try_get(1)?,
                epoch: row.try_get(2)?,
                claimed_at: row.try_get(3)?,
                next_offset: row.try_get(4)?,
                recorded_at: row.try_get(5)?,
            })
        })
        .collect()
}
