//! Connections that keep their prepared statements.
//!
//! A statement sent unnamed (`query_typed`) is parsed and planned again every time. For the
//! batch transaction that is about ten plans per batch, and each custom plan is made for the
//! batch's actual arrays, where PostgreSQL's defaults (a random read costs four sequential
//! ones) often pick a hash join over a whole table instead of a few index probes by key.
//! A statement prepared once per connection is parsed once, and planned once for arrays of any
//! length (the pool sets `plan_cache_mode = force_generic_plan`): the index probes by key.
//! [`Statements`] prepares each statement on first use and keeps it with its connection.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};

use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error, GenericClient, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

/// A statement's text and its parameters with their types.
pub type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

/// The statements prepared on one connection, by their text.
///
/// Statements sent together (pipelined) run in the order they are *sent*, and one not yet
/// prepared is sent only after its Parse returns, behind the others: so a caller that sends
/// several at once must [`Statements::prepare`] all of them first.
#[derive(Clone, Default)]
pub struct Statements(Arc<Mutex<HashMap<&'static str, Statement>>>);

impl Statements {
    /// Prepares those of `statements` (text, and parameters for their types) that are not yet,
    /// one after the other: afterwards each runs with no round trip of its own, in the order
    /// sent.
    pub async fn prepare(
        &self,
        client: &impl GenericClient,
        statements: &[(&'static str, &Params<'_>)],
    ) -> Result<(), Error> {
        for (sql, params) in statements {
            self.prepared(client, sql, params).await?;
        }
        Ok(())
    }

    /// `sql` prepared on `client`'s connection (which a transaction shares), once.
    async fn prepared(
        &self,
        client: &impl GenericClient,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Statement, Error> {
        if let Some(statement) = self.lock().get(sql) {
            return Ok(statement.clone());
        }
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        let statement = client.prepare_typed(sql, &types).await?;
        self.lock().insert(sql, statement.clone());
        Ok(statement)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Statement>> {
        // The map is only read and inserted into: a panic elsewhere cannot leave it torn.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub async fn execute(
        &self,
        client: &impl GenericClient,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<u64, Error> {
        let statement = self.prepared(client, sql, params).await?;
        self.checked(client.execute(&statement, &values(params)).await)
    }

    pub async fn query(
        &self,
        client: &impl GenericClient,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, Error> {
        let statement = self.prepared(client, sql, params).await?;
        self.checked(client.query(&statement, &values(params)).await)
    }

    pub async fn query_opt(
        &self,
        client: &impl GenericClient,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Option<Row>, Error> {
        let statement = self.prepared(client, sql, params).await?;
        self.checked(client.query_opt(&statement, &values(params)).await)
    }

    pub async fn query_one(
        &self,
        client: &impl GenericClient,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Row, Error> {
        let statement = self.prepared(client, sql, params).await?;
        self.checked(client.query_one(&statement, &values(params)).await)
    }

    /// Forgets every statement when the server no longer knows them (a pooler or `DISCARD`
    /// dropped them) or can no longer run them as prepared (a migration changed a result
    /// type): the retry prepares them again ([`super::Failure`] counts both as transient).
    fn checked<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &result
            && is_stale_statement(e)
        {
            self.lock().clear();
        }
        result
    }
}

/// Whether `e` says a prepared statement is gone or no longer matches the schema.
pub fn is_stale_statement(e: &Error) -> bool {
    match e.code() {
        Some(code) if *code == SqlState::INVALID_SQL_STATEMENT_NAME => true,
        Some(code) if *code == SqlState::FEATURE_NOT_SUPPORTED => {
            e.as_db_error().is_some_and(|d| {
                d.message()
                    .contains("cached plan must not change result type")
            })
        }
        _ => false,
    }
}

fn values<'a>(params: &'a Params<'a>) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|(value, _)| *value).collect()
}

/// A pooled connection: the client, and the statements prepared on it.
pub struct Connection {
    client: Client,
    pub statements: Statements,
}

impl Deref for Connection {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// bb8's PostgreSQL manager, its connections given a [`Statements`] each.
#[derive(Clone)]
pub struct Manager(pub PostgresConnectionManager<MakeRustlsConnect>);

impl bb8::ManageConnection for Manager {
    type Connection = Connection;
    type Error = Error;

    async fn connect(&self) -> Result<Connection, Error> {
        Ok(Connection {
            client: self.0.connect().await?,
            statements: Statements::default(),
        })
    }

    /// No round trip per checkout (an empty query before every batch): only a connection known
    /// to be closed is refused, and its query fails at once without reaching the server. One
    /// that broke unnoticed fails its first statement instead, which is retried as transient.
    async fn is_valid(&self, conn: &mut Connection) -> Result<(), Error> {
        if conn.client.is_closed() {
            self.0.is_valid(&mut conn.client).await
        } else {
            Ok(())
        }
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        self.0.has_broken(&mut conn.client)
    }
}
