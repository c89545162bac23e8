//! What kind of failure an error is, by its cause. A *transient* failure (connection lost,
//! deadlock, serialization failure, a lock or statement timeout, a server restarting) is
//! retried with backoff and leaves the offset where it was. A *data* failure (SQLSTATE class
//! 22's that values cause: one the database cannot hold, such as a character the server's
//! encoding lacks) was caused by what a message carries: the worker finds that message and
//! dead-letters it (`crate::kafka::worker`). A *fatal* one (schema missing, authentication
//! refused, a bug) stops the process with a non-zero exit so that an operator sees it.
//!
//! The database's error is classified by [`From<tokio_postgres::Error>`] and kept whole as the
//! failure's `source()` ([`Cause`]): nothing the driver said is lost to a `format!`, and a
//! failure that ends the retries carries the last transient one as its cause.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

use tokio_postgres::error::SqlState;

/// A failure and what can be done about it. The first three carry their [`Cause`] as
/// `source()`, and their own message names only the class, so a chain printed whole
/// (`{:#}` of anyhow, [`crate::logs::chain`]) says each thing once.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error("transient database failure")]
    Transient(#[source] Cause),
    #[error("fatal database failure")]
    Fatal(#[source] Cause),
    /// The database refused a value of the batch (a data exception one message causes, e.g. a
    /// character the server's encoding lacks: [`is_data`]): nothing
    /// was done. Retrying cannot help; applying the batch without the message that carries
    /// the value can.
    #[error("the database cannot store a value of the batch")]
    Data(#[source] Cause),
    /// Another replica claimed the partition since this one did (see [`super::ownership`]):
    /// the batch was rolled back, and this replica must stop working on the partition.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The batch's commits and releases name reservations over more SKUs than one transaction
    /// may lock ([`crate::domain::batch::MAX_LOCKS_PER_BATCH`]): nothing was done; apply it in
    /// smaller parts.
    #[error("the batch would lock {skus} SKUs; split it")]
    TooManyLocks { skus: usize },
    /// An operator paused the partition (`pause`): nothing was done; try again later.
    #[error("partition {0} is paused")]
    Paused(i32),
    /// The database records an offset before the batch's first: the messages between were
    /// never applied (the fetch started at Kafka's committed offset, ahead of the database's
    /// after a restore or a replay). Nothing was done; the partition is marked to be read
    /// again from the recorded offset ([`crate::kafka::rewinds`]).
    #[error(
        "partition {partition}: the database records offset {recorded}, before the batch's first ({first}); reading it again from there"
    )]
    Behind {
        partition: i32,
        recorded: i64,
        first: i64,
    },
}

impl Failure {
    /// Retry with backoff: `what` happened, and nothing else explains it.
    pub fn transient(what: impl Into<String>) -> Self {
        Failure::Transient(Cause::new(what, None))
    }

    /// Stop the replica: `what` happened.
    pub fn fatal(what: impl Into<String>) -> Self {
        Failure::Fatal(Cause::new(what, None))
    }

    /// Retry with backoff: `what` happened because of `error`, which is kept.
    pub fn transient_from(what: impl Into<String>, error: impl Into<Cause>) -> Self {
        Failure::Transient(Cause::new(what, Some(error.into())))
    }

    /// Stop the replica: `what` happened because of `error`, which is kept.
    pub fn fatal_from(what: impl Into<String>, error: impl Into<Cause>) -> Self {
        Failure::Fatal(Cause::new(what, Some(error.into())))
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, Failure::Transient(_))
    }
}

/// Why a failure happened: the driver's or the Kafka client's error, kept whole with its own
/// `source()` chain, or our own account of it. An `Arc`, so that a failure clones cheaply.
#[derive(Clone)]
pub struct Cause(Arc<dyn Error + Send + Sync>);

impl Cause {
    /// `what`, caused by `source` if given.
    fn new(what: impl Into<String>, source: Option<Cause>) -> Self {
        Cause(Arc::new(Context {
            what: what.into(),
            source,
        }))
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Error for Cause {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

impl From<tokio_postgres::Error> for Cause {
    fn from(e: tokio_postgres::Error) -> Self {
        Cause(Arc::new(DbError(e)))
    }
}

impl From<rdkafka::error::KafkaError> for Cause {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        Cause(Arc::new(e))
    }
}

impl From<Failure> for Cause {
    fn from(e: Failure) -> Self {
        Cause(Arc::new(e))
    }
}

impl From<String> for Cause {
    fn from(what: String) -> Self {
        Cause::new(what, None)
    }
}

/// Our words for a failure, and the error behind them if there is one.
#[derive(Debug)]
struct Context {
    what: String,
    source: Option<Cause>,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl Error for Context {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_ref().map(|c| c as &(dyn Error + 'static))
    }
}

/// The driver's error, shown as [`describe`] shows it (the database's message, SQLSTATE and
/// detail, which the driver's own `Display` leaves out). Its `Display` already says what the
/// driver's causes say, so it reports no `source()`: a chain printed whole says it once.
#[derive(Debug)]
struct DbError(tokio_postgres::Error);

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe(&self.0))
    }
}

impl Error for DbError {}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        let class = match e.code() {
            // No SQLSTATE: the connection broke or could not be made (I/O, closed, timeout).
            None => Failure::Transient,
            Some(code) if is_transient(code) => Failure::Transient,
            Some(code) if is_data(code) => Failure::Data,
            // Our connection's prepared statements, forgotten meanwhile and prepared again by
            // the retry (`super::statements`).
            Some(_) if super::statements::is_stale_statement(&e) => Failure::Transient,
            Some(_) => Failure::Fatal,
        };
        class(Cause::from(e))
    }
}

impl From<bb8::RunError<tokio_postgres::Error>> for Failure {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> Self {
        match e {
            bb8::RunError::User(e) => e.into(),
            bb8::RunError::TimedOut => {
                Failure::transient("timed out waiting for a database connection")
            }
        }
    }
}

/// The data exceptions (SQLSTATE class 22) one message's values cause: a character the
/// server's encoding lacks, a string or number past what its column holds, text that does not
/// read as its type. Not the whole class: a division by zero or a bad argument to a function
/// would be ours, the same for every message, and must stop the replica rather than
/// dead-letter everything.
fn is_data(code: &SqlState) -> bool {
    [
        SqlState::UNTRANSLATABLE_CHARACTER,
        SqlState::CHARACTER_NOT_IN_REPERTOIRE,
        SqlState::STRING_DATA_RIGHT_TRUNCATION,
        SqlState::STRING_DATA_LENGTH_MISMATCH,
        SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
        SqlState::INVALID_TEXT_REPRESENTATION,
        SqlState::INVALID_DATETIME_FORMAT,
        SqlState::DATETIME_FIELD_OVERFLOW,
    ]
    .contains(code)
}

fn is_transient(code: &SqlState) -> bool {
    let class = &code.code()[..2];
    matches!(
        class,
        "08" // connection exception
            | "40" // transaction rollback: serialization failure, deadlock detected
            | "53" // insufficient resources: too many connections, out of shared memory (locks)
            | "57" // operator intervention: admin shutdown, crash shutdown, cannot connect now, query canceled
            | "58" // system error (I/O)
    ) || *code == SqlState::LOCK_NOT_AVAILABLE
        // The server ended a session that sat in a transaction too long (this replica was
        // paused): a new connection retries, and the fence tells whether the partition is
        // still ours.
        || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
        // A racing replica recorded the same event id under other locks (a reused id with a
        // different body): retrying sees the row and dead-letters the conflict.
        || *code == SqlState::UNIQUE_VIOLATION
}

/// The database's message with its detail and SQLSTATE, which `Display` of the driver's error
/// leaves out.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} ({}){}",
            db.message(),
            db.code().code(),
            db.detail().map(|d| format!(": {d}")).unwrap_or_default()
        ),
        // Not from the server: the causes say what went wrong (refused, TLS certificate...).
        None => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                text = format!("{text}: {c}");
                cause = c.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_sqlstate_class() {
        for code in [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::QUERY_CANCELED,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::CONNECTION_FAILURE,
            SqlState::UNIQUE_VIOLATION,
        ] {
            assert!(is_transient(&code), "{code:?}");
        }
        for code in [
            SqlState::UNTRANSLATABLE_CHARACTER,
            SqlState::CHARACTER_NOT_IN_REPERTOIRE,
            SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
            SqlState::STRING_DATA_RIGHT_TRUNCATION,
        ] {
            assert!(is_data(&code) && !is_transient(&code), "{code:?}");
        }
        for code in [
            SqlState::DIVISION_BY_ZERO,
            SqlState::INVALID_PARAMETER_VALUE,
            SqlState::UNDEFINED_TABLE,
        ] {
            assert!(!is_data(&code), "{code:?}: ours, not the message's");
        }
        for code in [
            SqlState::UNDEFINED_TABLE,
            SqlState::INVALID_PASSWORD,
            SqlState::SYNTAX_ERROR,
            SqlState::CHECK_VIOLATION,
        ] {
            assert!(!is_transient(&code), "{code:?}");
        }
    }
}
