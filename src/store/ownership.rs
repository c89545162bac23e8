//! Partition ownership in the database: the fence against zombies.
//!
//! Kafka says who owns a partition, but a replica that lost one without noticing yet (a long
//! GC-like pause, a session timeout, a network partition) still believes it owns it and may
//! hold deliveries it has not applied. So ownership is also recorded here: on assignment a
//! replica *claims* the partition by moving its epoch on, and every batch transaction first
//! locks the partition's row and checks that the epoch is still the one it claimed. A claim
//! waits for the batch in flight to finish (the row lock); a batch of an older epoch aborts.
//! Whatever a stale owner does after the new owner claimed the partition never commits.

use std::collections::HashMap;

use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use crate::store::{Failure, Pool, Source};

/// Moves each partition's epoch on (1 for a first claim); the row lock makes it wait for the
/// batch transaction in flight on that partition, if any. Rows are locked in partition order.
const CLAIM: &str = "
    INSERT INTO partition_owners AS o (consumer_group, topic, partition, epoch, owner)
    SELECT $1, $2, p, 1, $4 FROM unnest($3::int[]) AS t(p) ORDER BY p
    ON CONFLICT (consumer_group, topic, partition) DO UPDATE
        SET epoch = o.epoch + 1, owner = EXCLUDED.owner, claimed_at = now(), rewound_at = NULL
    RETURNING partition, epoch";

/// Locks the rows of some partitions, in partition order as batches and claims take them
/// (waiting for the batches in flight), and reads who claimed each last.
pub(super) const LOCK_OWNERS: &str = "
    SELECT partition, owner FROM partition_owners
    WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3)
    ORDER BY partition FOR UPDATE";

/// Run after the claim, as its own statement: its snapshot then includes the batch that the
/// claim waited for.
const LOAD_OFFSETS: &str = "
    SELECT partition, next_offset FROM partition_offsets
    WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[])";

/// The first statement of every batch transaction: holds its partitions' rows until commit
/// (in partition order, as claims and pauses take them), so no claim can slip in between this
/// check and the commit. (Whether a partition is paused is the next statement's question,
/// [`crate::store::pauses::PAUSED`].)
pub(crate) const FENCE: &str = "
    SELECT partition, epoch FROM partition_owners
    WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[])
    ORDER BY partition
    FOR UPDATE";

/// A claimed partition: the epoch its batches must carry, and where processing stands (the
/// offset recorded with its last batch; absent if this group never processed it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub epoch: i64,
    pub next_offset: Option<i64>,
}

/// Claims `partitions` for `owner` (a name for operators: host and process).
pub async fn claim(
    pool: &Pool,
    source: &Source,
    owner: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, Claim>, Failure> {
    let conn = pool.get().await?;
    let claim_params: [(&(dyn ToSql + Sync), Type); 4] = [
        (&source.group, Type::TEXT),
        (&source.topic, Type::TEXT),
        (&partitions, Type::INT4_ARRAY),
        (&owner, Type::TEXT),
    ];
    let load_params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&source.group, Type::TEXT),
        (&source.topic, Type::TEXT),
        (&partitions, Type::INT4_ARRAY),
    ];
    // Both sent at once; each commits on its own, in this order.
    let (claimed, recorded) = tokio::try_join!(
        biased;
        conn.query_typed(CLAIM, &claim_params),
        conn.query_typed(LOAD_OFFSETS, &load_params),
    )?;
    claims_of(&claimed, &recorded)
}

/// Each claimed partition (`partition, epoch` rows) with its recorded offset, if any
/// (`partition, next_offset` rows).
fn claims_of(claimed: &[Row], recorded: &[Row]) -> Result<HashMap<i32, Claim>, Failure> {
    let mut offsets = HashMap::with_capacity(recorded.len());
    for row in recorded {
        offsets.insert(row.try_get::<_, i32>(0)?, row.try_get::<_, i64>(1)?);
    }
    let mut claims = HashMap::with_capacity(claimed.len());
    for row in claimed {
        let partition = row.try_get::<_, i32>(0)?;
        let epoch = row.try_get::<_, i64>(1)?;
        let next_offset = offsets.get(&partition).copied();
        claims.insert(partition, Claim { epoch, next_offset });
    }
    Ok(claims)
}

/// The partitions an operator rewound (`replay`) and whose owner has not restarted them yet,
/// each with its epoch now. The owner claims each again ([`crate::kafka::rewinds`]).
pub async fn rewound(pool: &Pool, source: &Source) -> Result<Vec<(i32, i64)>, Failure> {
    let conn = pool.get().await?;
    let rows = conn
        .query_typed(
            "SELECT partition, epoch FROM partition_owners
             WHERE consumer_group = $1 AND topic = $2 AND rewound_at IS NOT NULL",
            &[(&source.group, Type::TEXT), (&source.topic, Type::TEXT)],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// Claims again, for `owner`, those of `partitions` it still owns in the database: a new epoch
/// (a rewind's mark stays until [`acknowledge_rewinds`]), and the offsets now recorded, read in
/// the same transaction. A partition another replica claimed since is not returned: it is that
/// replica's.
pub async fn reclaim(
    pool: &Pool,
    source: &Source,
    owner: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, Claim>, Failure> {
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    // Rows locked in partition order, as batches, claims and `replay` take them. The owner is
    // compared after the lock, on the row as it is then: a claim in flight (even one of ours
    // whose answer timed out) commits first.
    let locked = tx
        .query_typed(
            LOCK_OWNERS,
            &[
                (&source.group, Type::TEXT),
                (&source.topic, Type::TEXT),
                (&partitions, Type::INT4_ARRAY),
            ],
        )
        .await?;
    let mut mine = Vec::with_capacity(locked.len());
    for row in locked {
        if row.try_get::<_, &str>(1)? == owner {
            mine.push(row.try_get::<_, i32>(0)?);
        }
    }
    let claimed = tx
        .query_typed(
            "UPDATE partition_owners SET epoch = epoch + 1, claimed_at = now()
             WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3)
             RETURNING partition, epoch",
            &[
                (&source.group, Type::TEXT),
                (&source.topic, Type::TEXT),
                (&mine, Type::INT4_ARRAY),
            ],
        )
        .await?;
    let recorded = tx
        .query_typed(
            LOAD_OFFSETS,
            &[
                (&source.group, Type::TEXT),
                (&source.topic, Type::TEXT),
                (&partitions, Type::INT4_ARRAY),
            ],
        )
        .await?;
    tx.commit().await?;
    claims_of(&claimed, &recorded)
}

/// Clears the rewind marks of `restarted` partitions (each with the epoch its new worker
/// claimed): only after the restart, so that a claim whose answer was lost is tried again.
pub async fn acknowledge_rewinds(
    pool: &Pool,
    source: &Source,
    restarted: &[(i32, i64)],
) -> Result<(), Failure> {
    let (partitions, epochs): (Vec<i32>, Vec<i64>) = restarted.iter().copied().unzip();
    let conn = pool.get().await?;
    conn.execute_typed(
        "UPDATE partition_owners o SET rewound_at = NULL
         FROM unnest($3::int[], $4::bigint[]) AS t(p, epoch)
         WHERE o.consumer_group = $1 AND o.topic = $2 AND o.partition = t.p AND o.epoch = t.epoch",
        &[
            (&source.group, Type::TEXT),
            (&source.topic, Type::TEXT),
            (&partitions, Type::INT4_ARRAY),
            (&epochs, Type::INT8_ARRAY),
        ],
    )
    .await?;
    Ok(())
}

/// Marks `partition` to be read again from its recorded offset, as `replay` does, if it is
/// still at `epoch`; its owner restarts it ([`crate::kafka::rewinds`]).
pub async fn mark_rewound(
    pool: &Pool,
    source: &Source,
    partition: i32,
    epoch: i64,
) -> Result<(), Failure> {
    let conn = pool.get().await?;
    conn.execute_typed(
        "UPDATE partition_owners SET rewound_at = now()
         WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND epoch = $4",
        &[
            (&source.group, Type::TEXT),
            (&source.topic, Type::TEXT),
            (&partition, Type::INT4),
            (&epoch, Type::INT8),
        ],
    )
    .await?;
    Ok(())
}

/// Checks the result of [`FENCE`]: `Fenced` unless the partition is still at `epoch`.
pub(crate) fn check_fence(partition: i32, epoch: i64, current: Option<i64>) -> Result<(), Failure> {
    match current {
        Some(current) if current == epoch => Ok(()),
        Some(current) => Err(Failure::Fenced(format!(
            "partition {partition} was claimed again (epoch {current}; this owner holds {epoch})"
        ))),
        None => Err(Failure::Fenced(format!(
            "partition {partition} has no recorded owner (this owner holds epoch {epoch})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_current_epoch_passes_the_fence() {
        assert!(check_fence(3, 7, Some(7)).is_ok());
        assert!(matches!(
            check_fence(3, 7, Some(8)),
            Err(Failure::Fenced(_))
        ));
        assert!(matches!(check_fence(3, 7, None), Err(Failure::Fenced(_))));
    }
}
