//! inventory-dev: what development, the tests, the demo and the benchmark run beside the
//! service, kept out of the service's binary and image.
//!
//! - [`embedded`] runs locally what production points at: librdkafka's mock cluster, Apache
//!   Kafka from its jars, a throwaway PostgreSQL, replicas as separate processes.
//! - [`workload`] generates reproducible streams of events and, through the service's own
//!   decoder and rules, the [`inventory_consumer::expectation::Expectation`] they must reach.
//! - [`producer`] sends workloads and counts their acknowledgements.
//! - [`history`] fills a database with years of rows for the steady-state benchmark.
//! - [`cli`] holds the commands: `broker`, `produce`, `demo`, `bench`, and `consumer`, the
//!   service itself (every command of `inventory-consumer`), which the demo and the benchmark
//!   run as their replicas so that they always run the service they were built with.
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod cli;
pub mod embedded;
pub mod history;
pub mod producer;
pub mod workload;
