//! Kafka security on the real broker (the embedded one has none): Apache Kafka with a SASL_SSL
//! listener, TLS from a private CA and SCRAM-SHA-512 users. Replicas connect through
//! `kafka.properties` exactly as docs/configuration.md documents; refused credentials and untrusted
//! certificates end the replica at start-up with a clear error and exit 3, not a silent retry
//! loop; the password never appears in a log line or in `/metrics`.

use std::time::Duration;

use inventory_devtools::embedded::apache::{ClusterOptions, SaslSsl};

use crate::support::SETTLE;
use crate::support::{Replica, TestEnv, http_get, private_ca, wait_until};

/// A replica that cannot authenticate must give up well within this.
const GIVE_UP: Duration = Duration::from_secs(60);
const USER: &str = "inventory";

struct Secure {
    env: TestEnv,
    password: String,
    ca: std::path::PathBuf,
    bootstrap: String,
}

async fn secure_cluster() -> Secure {
    let (ca_pem, server) = private_ca();
    let password = format!("pw-{:016x}", rand::random::<u64>());
    let options = ClusterOptions {
        sasl_ssl: Some(SaslSsl {
            cert_pem: server.cert_pem,
            key_pem: server.key_pem,
            users: vec![(USER.to_owned(), password.clone())],
        }),
        ..Default::default()
    };
    let mut env = TestEnv::on_apache_with(3, options).await;
    let ca = env.path("ca.pem");
    std::fs::write(&ca, ca_pem).expect("writing the CA");
    let bootstrap = env
        .broker
        .apache()
        .secure_bootstrap()
        .expect("a SASL_SSL listener");
    Secure {
        env,
        password,
        ca,
        bootstrap,
    }
}

impl Secure {
    /// A replica on the SASL_SSL listener; the password comes from the environment, as a
    /// Kubernetes Secret would pass it (docs/configuration.md).
    fn replica(&self, name: &str, user: &str, password: &str, ca: &std::path::Path) -> Replica {
        let ca = ca.display().to_string();
        self.env.replica_with_env(
            name,
            &[
                ("KAFKA_BROKERS", self.bootstrap.as_str()),
                ("INVENTORY_KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SASL_SSL"),
                (
                    "INVENTORY_KAFKA__PROPERTIES__SASL_MECHANISM",
                    "SCRAM-SHA-512",
                ),
                ("INVENTORY_KAFKA__PROPERTIES__SASL_USERNAME", user),
                ("INVENTORY_KAFKA__PROPERTIES__SASL_PASSWORD", password),
                ("INVENTORY_KAFKA__PROPERTIES__SSL_CA_LOCATION", ca.as_str()),
            ],
            &[],
        )
    }
}

/// With the right user, password and CA the replica joins over TLS and SCRAM and applies a
/// workload exactly once; the password is in neither its log nor its metrics.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_work_over_sasl_ssl_and_never_show_the_password() {
    let s = secure_cluster().await;
    let mut replica = s.replica("secure", USER, &s.password, &s.ca);
    wait_until("the replica to own every partition", SETTLE, || async {
        replica.owned().len() == 3
    })
    .await;
    let expected = s
        .env
        .produce(&["--events", "3000", "--skus", "300", "--seed", "5"]);
    s.env.wait_processed(expected.events as i64, SETTLE).await;
    let (_, metrics) = http_get(&replica.http_addr().await, "/metrics");
    let (status, stats) = replica.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    assert_eq!(stats.applied + stats.rejected, expected.events);
    crate::oracle::assert_database_matches(&s.env.db, &crate::oracle::truth_of(&s.env)).await;
    let (ok, report) = s.env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
    assert!(metrics.contains("inventory_events_total"), "{metrics}");
    assert!(
        !metrics.contains(&s.password),
        "the password is in /metrics"
    );
    assert!(
        !replica.log().contains(&s.password),
        "the password is logged"
    );
}

/// A wrong password, an unknown user and a broker certificate from another CA: each replica
/// stops by itself with exit 3 and says why, and never logs the password it was given.
#[tokio::test(flavor = "multi_thread")]
async fn refused_credentials_and_untrusted_certificates_fail_at_start_up() {
    let s = secure_cluster().await;
    let (other_ca_pem, _) = private_ca();
    let other_ca = s.env.path("other-ca.pem");
    std::fs::write(&other_ca, other_ca_pem).expect("writing the other CA");
    let wrong = format!("{}-wrong", s.password);
    let cases = [
        ("wrong-password", USER, wrong.as_str(), s.ca.as_path()),
        (
            "unknown-user",
            "nobody",
            s.password.as_str(),
            s.ca.as_path(),
        ),
        (
            "untrusted-ca",
            USER,
            s.password.as_str(),
            other_ca.as_path(),
        ),
    ];
    let mut replicas: Vec<(&str, Replica)> = cases
        .iter()
        .map(|(name, user, password, ca)| (*name, s.replica(name, user, password, ca)))
        .collect();
    for (name, replica) in &mut replicas {
        let started = std::time::Instant::now();
        let (status, _) = replica.wait_exit(GIVE_UP);
        let log = replica.log();
        println!(
            "{name}: exit {status} after {:.1}s",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(
            status.code(),
            Some(3),
            "{name}: a fatal failure; log:\n{log}"
        );
        let reason = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["event"] == "kafka_fatal")
            .and_then(|e| e["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("{name}: no `fatal Kafka error` record; log:\n{log}"));
        let expected = if *name == "untrusted-ca" {
            "SSL"
        } else {
            "Authentication"
        };
        assert!(
            reason.contains(expected),
            "{name}: the error says what failed: {reason}"
        );
        assert!(!log.contains(&s.password), "{name}: the password is logged");
        assert!(!log.contains(&wrong), "{name}: the password is logged");
    }
}
