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
use rdkafka::mocking::MockCoordinator;
use rdkafka::producer::{BaseProducer, Producer};

use crate::embedded::faults::Fault;

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
    topic: String,
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
        let broker = EmbeddedBroker {
            owner,
            bootstrap,
            topic: options.topic.clone(),
        };
        broker.tune_groups(options);
        Ok(broker)
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Injects a fault (see [`crate::embedded::faults`]).
    pub fn inject(&self, fault: &Fault) -> Result<(), KafkaError> {
        let mock = self
            .owner
            .client()
            .mock_cluster()
            .ok_or(KafkaError::MockCluster(RDKafkaErrorCode::Fail))?;
        match fault {
            Fault::Down(broker) => mock.broker_down(*broker),
            Fault::Up(broker) => mock.broker_up(*broker),
            Fault::RoundTripTime(broker, delay) => mock.broker_round_trip_time(*broker, *delay),
            Fault::Errors { api, count, error } => {
                mock.request_errors(*api, &vec![*error; *count]);
                Ok(())
            }
            Fault::Leader { partition, broker } => {
                mock.partition_leader(&self.topic, *partition, Some(*broker))
            }
            Fault::Coordinator { group, broker } => {
                mock.coordinator(MockCoordinator::Group(group.clone()), *broker)
            }
        }
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
