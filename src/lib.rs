//! inventory-consumer: applies inventory change events from Kafka to PostgreSQL, exactly once in
//! effect, with any number of replicas in one consumer group.
//!
//! How the pieces fit:
//! - [`domain`] is pure: it decodes events, applies the inventory rules and decides a batch.
//! - [`store`] is PostgreSQL: the pool, the migrations, the batch transaction (advisory locks,
//!   dedupe, atomic stock updates, ledger, dead letters) and the audit behind `verify`.
//! - [`kafka`] is the consumer: a poll thread owning the librdkafka handle and its rebalance
//!   callbacks, one [`kafka::worker`] task per assigned partition, and the offsets they hand back,
//!   committed only after the database commit that holds their effect.
//! - [`http`] serves the probes and [`metrics`] per replica; [`logs`] names the log events
//!   others rely on.
//! - [`expectation`] is the outcome `verify --expected` compares the database with.
//! - [`cli`] holds one module per subcommand; `main.rs` only parses and hands off.
//!
//! The development tools (the embedded brokers and PostgreSQL, the workload generator and its
//! oracle, `produce`, `demo`, `bench`) are the workspace's other crate, `devtools/`
//! (`inventory-dev`): the service's binary and image carry none of them.
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod cli;
pub mod config;
pub mod domain;
pub mod expectation;
pub mod http;
pub mod kafka;
pub mod logs;
pub mod metrics;
pub mod signals;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod traces;
