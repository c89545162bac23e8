//! The dead letters, for operators: listed, shown, and marked when redriven (published to the
//! topic again, see `src/cli/dead_letters.rs`).

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Row, Transaction};

use crate::store::{Failure, utc_text};

/// One dead letter as kept: where it was read, why it was refused, and whether it was redriven.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub error: String,
    pub detail: String,
    /// RFC 3339, UTC.
    pub received_at: String,
    /// When (RFC 3339, UTC) and where (`topic/partition@offset`) it was last published again.
    pub redriven: Option<(String, String)>,
}

/// Which dead letters to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub partition: Option<i32>,
    pub error: Option<String>,
    /// Also those already redriven.
    pub redriven_too: bool,
    pub limit: i64,
}

fn columns() -> String {
    format!(
        "id, topic, partition, \"offset\", key, payload, error, detail, {}, {}, redriven_to",
        utc_text("received_at"),
        utc_text("redriven_at")
    )
}

/// Dead letters matching `filter`, newest first.
pub async fn list(db: &impl GenericClient, filter: &Filter) -> Result<Vec<DeadLetter>, Failure> {
    let rows = db
        .query_typed(
            &format!(
                "SELECT {} FROM dead_letters
                 WHERE ($1::int IS NULL OR partition = $1)
                   AND ($2::text IS NULL OR error = $2)
                   AND ($3 OR redriven_at IS NULL)
                 ORDER BY id DESC LIMIT $4",
                columns()
            ),
            &[
                (&filter.partition, Type::INT4),
                (&filter.error, Type::TEXT),
                (&filter.redriven_too, Type::BOOL),
                (&filter.limit, Type::INT8),
            ],
        )
        .await?;
    rows.iter().map(read).collect()
}

/// Dead letter `id`, if kept.
pub async fn get(db: &impl GenericClient, id: i64) -> Result<Option<DeadLetter>, Failure> {
    let row = db
        .query_typed_opt(
            &format!("SELECT {} FROM dead_letters WHERE id = $1", columns()),
            &[(&id, Type::INT8)],
        )
        .await?;
    row.as_ref().map(read).transpose()
}

/// The dead letters of `ids` (those that exist), locked until `tx` ends: two operators
/// redriving the same ones at once take turns, and the second sees the first's mark.
pub async fn lock(tx: &Transaction<'_>, ids: &[i64]) -> Result<Vec<DeadLetter>, Failure> {
    let rows = tx
        .query_typed(
            &format!(
                "SELECT {} FROM dead_letters WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                columns()
            ),
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?;
    rows.iter().map(read).collect()
}

/// Records that dead letter `id` was published again, to `to`.
pub async fn mark_redriven(tx: &Transaction<'_>, id: i64, to: &str) -> Result<(), Failure> {
    tx.execute_typed(
        "UPDATE dead_letters SET redriven_at = statement_timestamp(), redriven_to = $2
         WHERE id = $1",
        &[(&id, Type::INT8), (&to, Type::TEXT)],
    )
    .await?;
    Ok(())
}

fn read(row: &Row) -> Result<DeadLetter, Failure> {
    let redriven_at: Option<String> = row.try_get(9)?;
    let redriven_to: Option<String> = row.try_get(10)?;
    Ok(DeadLetter {
        id: row.try_get(0)?,
        topic: row.try_get(1)?,
        partition: row.try_get(2)?,
        offset: row.try_get(3)?,
        key: row.try_get(4)?,
        payload: row.try_get(5)?,
        error: row.try_get(6)?,
        detail: row.try_get(7)?,
        received_at: row.try_get(8)?,
        redriven: redriven_at.zip(redriven_to),
    })
}
