//! Connections that keep their prepared statements.
//!
//! A statement sent unnamed (`query_typed`) is parsed and planned again every time. For the
//! batch transaction that is about ten plans per batch, and each custom plan is made for the
//! batch's actual arrays, where PostgreSQL's defaults (a random read costs four sequential
//! ones) often pick a hash join over a whole table instead of a few index probes by key.
//! A statement prepared once per connection is parsed once, and after five executions
//! PostgreSQL settles on one generic plan, made for arrays of unknown length: the index probes
//! by key. [`Statements`] prepares each statement on first use and keeps it with its connection.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};

use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error, GenericClient, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

/// A statement's text and its parameters with their types.
pub type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

/// The statements prepared on one connection, by their text.
#[derive(Clone, Default)]
pub struct Statements(Arc<Mutex<HashMap<&'static str, Statement>>>);

impl Statements {
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
        client.execute(&statement, &values(params)).await
    }

    pub async fn query(
        &self,
        client: &impl GenericClient,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, Error> {
        let statement = self.prepared(client, sql, params).await?;
        client.query(&statement, &values(params)).await
    }

    pub async fn query_opt(
        &self,
        client: &impl GenericClient,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Option<Row>, Error> {
        let statement = self.prepared(client, sql, params).await?;
        client.query_opt(&statement, &values(params)).await
    }

    pub async fn query_one(
        &self,
        client: &impl GenericClient,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Row, Error> {
        let statement = self.prepared(client, sql, params).await?;
        client.query_one(&statement, &values(params)).await
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

    async fn is_valid(&self, conn: &mut Connection) -> Result<(), Error> {
        self.0.is_valid(&mut conn.client).await
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        self.0.has_broken(&mut conn.client)
    }
}
