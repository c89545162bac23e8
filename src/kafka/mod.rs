//! Kafka: client configuration, the consumer's poll thread with its rebalance handling, the
//! per-partition offsets, and a producer for `produce`.

pub mod client;
pub mod consumer;
pub mod flow;
pub mod group;
pub mod membership;
pub mod offsets;
pub mod producer;
pub mod worker;
