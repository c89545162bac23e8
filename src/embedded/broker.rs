//! The embedded broker: librdkafka's mock cluster, which speaks the real Kafka protocol on
//! 127.0.0.1 so that separate processes (replicas, `produce`, kcat) can use it.
//!
//! The cluster is created through a producer configured with `test.mock.num.brokers`, because
//! only the raw handle reached that way exposes the group settings below; the producer owns
//! the cluster, so [`EmbeddedBroker`] keeps it alive. The topic is created explicitly with the
//! requested partition count (the mock auto-creates topics with 4).

use rdkafka::ClientConfig;
use rdkafka::bindings as rdsys;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer};

#[derive(Debug, Clone)]
pub struct BrokerOptions {
    pub topic: String,
    pub partitions: i32,
    pub brokers: i32,
    /// Delay before the first classic-protocol join completes (Kafka's default is 3 s).
    pub initial_rebalance_delay_ms: i32,
    /// KIP-848 groups: how long before a silent member is expelled.
    pub consumer_session_timeout_ms: i32,
    /// KIP-848 groups: heartbeat interval the broker asks members to keep; rebalances are
    /// noticed within about one interval.
    pub consumer_heartbeat_interval_ms: i32,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            topic: "inventory-events".into(),
            partitions: 12,
            brokers: 1,
            initial_rebalance_delay_ms: 100,
            consumer_session_timeout_ms: 10_000,
            consumer_heartbeat_interval_ms: 500,
        }
    }
}

pub struct EmbeddedBroker {
    // Owns the mock cluster: dropping it stops the brokers.
    owner: BaseProducer,
    bootstrap: String,
}

impl EmbeddedBroker {
    pub fn start(options: &BrokerOptions) -> Result<Self, KafkaError> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", options.brokers.to_string())
            .set("log_level", "3")
            .create()?;
        let mock = owner
            .client()
            .mock_cluster()
            .ok_or(KafkaError::MockCluster(RDKafkaErrorCode::Fail))?;
        mock.create_topic(&options.topic, options.partitions, options.brokers.min(3))?;
        let bootstrap = mock.bootstrap_servers();
        drop(mock);
        let broker = EmbeddedBroker { owner, bootstrap };
        broker.tune_groups(options);
        Ok(broker)
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Group timings only reachable through the raw mock API.
    fn tune_groups(&self, options: &BrokerOptions) {
        // SAFETY: the handle belongs to `self.owner`, which outlives this call; these setters
        // only store integers in the cluster's configuration.
        unsafe {
            let cluster = rdsys::rd_kafka_handle_mock_cluster(self.owner.client().native_ptr());
            if cluster.is_null() {
                return;
            }
            rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(
                cluster,
                options.initial_rebalance_delay_ms,
            );
            rdsys::rd_kafka_mock_set_group_consumer_session_timeout_ms(
                cluster,
                options.consumer_session_timeout_ms,
            );
            rdsys::rd_kafka_mock_set_group_consumer_heartbeat_interval_ms(
                cluster,
                options.consumer_heartbeat_interval_ms,
            );
        }
    }
}
