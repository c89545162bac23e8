//! What development, tests and the demo run locally instead of real infrastructure: a
//! Kafka-protocol broker (librdkafka's mock cluster), Apache Kafka itself started from its
//! jars, and a throwaway PostgreSQL cluster. Production never uses these; it points
//! `kafka.brokers` and `database.url` at real services.

pub mod apache;
pub mod broker;
pub mod cpu;
pub mod faults;
pub mod local_kafka;
pub mod postgres;
pub mod replica;
pub mod topic;
pub mod wait;
