//! Kafka: client configuration, the consumer's poll thread ([`consumer`]) with its rebalance
//! handling ([`group`], on the group's state [`partitions`], which decides through
//! [`membership`]), the delivery path and its flow
//! control ([`intake`], [`flow`]), the partition workers ([`workers`], [`worker`]) and the
//! transactions they may share ([`combiner`]), the
//! per-partition offsets and their commits ([`offsets`], [`commits`]), the relay of replies to
//! order steps ([`relay`]) and operators' rewinds ([`rewinds`]).

pub mod client;
pub mod combiner;
pub mod commits;
pub mod consumer;
pub mod flow;
pub mod group;
pub mod horizon;
pub mod intake;
pub mod membership;
pub mod offsets;
pub mod partitions;
pub mod relay;
pub mod rewinds;
pub mod standing;
pub mod worker;
pub mod workers;
