//! The test's PostgreSQL: a fresh database (on a shared server, or a throwaway one), plain
//! connections, the store-level tests' pool and source, and a private CA for TLS.

use std::collections::BTreeMap;
use std::time::Duration;

use inventory_consumer::config::Settings;
use inventory_consumer::domain::{Batch, Delivery};
use inventory_consumer::store::{self, Source};
use inventory_devtools::embedded::postgres::{PostgresOptions, ServerTls, ThrowawayPostgres};

use super::wait_until;

/// A fresh database for one test.
pub struct TestDb {
    pub url: String,
    server: Option<ThrowawayPostgres>,
    /// On a shared server: (admin URL, database name) to drop afterwards.
    shared: Option<(String, String)>,
}

impl TestDb {
    /// Stops a throwaway server for good (its database is lost); `false` on a shared server,
    /// which tests never stop.
    pub fn stop_server(&mut self) -> bool {
        match &mut self.server {
            Some(server) => {
                server.stop();
                true
            }
            None => false,
        }
    }

    /// Restarts the throwaway server (every session ended, committed data kept) on the same
    /// port; `false` on a shared server.
    pub fn restart_server(&mut self) -> bool {
        match &mut self.server {
            Some(server) => {
                server.restart().expect("restarting PostgreSQL");
                true
            }
            None => false,
        }
    }

    pub async fn new() -> TestDb {
        let base = std::env::var("TEST_DATABASE_URL")
            .or_else(|_| std::env::var("DATABASE_URL"))
            .ok();
        match base {
            Some(admin) => {
                let name = format!(
                    "inventory_test_{}_{:08x}",
                    std::process::id(),
                    rand::random::<u32>()
                );
                TestDb {
                    url: inventory_consumer::store::create_database(&admin, &name)
                        .await
                        .expect("creating the test database"),
                    server: None,
                    shared: Some((admin, name)),
                }
            }
            None => {
                let server = tokio::task::spawn_blocking(|| {
                    ThrowawayPostgres::start(PostgresOptions::default())
                })
                .await
                .expect("joining")
                .expect("starting a throwaway PostgreSQL (or set TEST_DATABASE_URL)");
                TestDb {
                    url: server.url("postgres"),
                    server: Some(server),
                    shared: None,
                }
            }
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// The first column of the first row, as i64.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let client = self.client().await;
        client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    pub async fn stock(&self) -> BTreeMap<String, i64> {
        let client = self.client().await;
        client
            .query("SELECT sku, current_stock FROM products", &[])
            .await
            .expect("reading stock")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Rows in `processed_events` plus `dead_letters`: every message that reached an end. None
    /// while the first replica is still creating the schema (its last migration makes
    /// `history_periods`).
    pub async fn settled(&self) -> i64 {
        let client = self.client().await;
        let migrated: bool = client
            .query_one("SELECT to_regclass('history_periods') IS NOT NULL", &[])
            .await
            .expect("looking for the schema")
            .get(0);
        if !migrated {
            return 0;
        }
        inventory_consumer::store::audit::settled(&client)
            .await
            .expect("counting settled messages")
    }

    /// Waits until the offsets recorded beside the effects (`partition_offsets`, each
    /// partition's next offset to read) add up to `messages`: every message of the topic read
    /// and its batch committed, whatever Kafka's own commits say.
    pub async fn wait_offsets_recorded(&self, messages: i64, timeout: Duration) {
        wait_until(
            &format!("the recorded offsets to reach the end ({messages} messages)"),
            timeout,
            || async {
                self.scalar("SELECT sum(next_offset)::bigint FROM partition_offsets")
                    .await
                    == messages
            },
        )
        .await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.shared.take() {
            // Drop runs outside any runtime guarantee: use a small one of our own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let _ = rt.block_on(inventory_consumer::store::drop_database(&admin, &name));
            })
            .join();
        }
        drop(self.server.take());
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test database: {e}"));
    tokio::spawn(conn);
    client
}

/// A migrated test database, a pool on it, and where batches say they come from.
pub async fn migrated_store() -> (TestDb, store::Pool, Source) {
    let db = TestDb::new().await;
    store::migrate::migrate(&db.url).await.expect("migrations");
    let mut settings = Settings::default().database;
    settings.url = db.url.clone();
    let pool = store::pool(&settings).await.expect("pool");
    (db, pool, source())
}

/// The source of the store-level tests' batches.
pub fn source() -> Source {
    Source {
        group: "g".into(),
        topic: "t".into(),
        reservation_ttl: Duration::from_secs(900),
        reservation_max_ttl: Duration::from_secs(7 * 86_400),
        max_locks: inventory_consumer::domain::batch::MAX_LOCKS_PER_BATCH,
        reply_all: false,
    }
}

/// A private CA (its certificate, PEM) and a server certificate it signed for 127.0.0.1 and
/// localhost.
pub fn private_ca() -> (String, ServerTls) {
    // Distinct names: OpenSSL takes a certificate whose issuer equals its subject for a
    // self-signed one (rcgen gives every certificate the same default name).
    let name = |cn: &str| {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, cn);
        dn
    };
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name = name(&format!("test CA {:08x}", rand::random::<u32>()));
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("server key");
    let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let mut params = rcgen::CertificateParams::new(names).expect("server params");
    params.distinguished_name = name("127.0.0.1");
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    let server = ServerTls {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    (ca.pem(), server)
}

/// A batch of partition 0 holding `events` (JSON texts) at offsets from `first_offset` on.
pub fn batch(first_offset: i64, events: &[String]) -> Batch {
    partition_batch(0, first_offset, events)
}

/// A batch of `partition` holding `events` (JSON texts) at offsets from `first_offset` on.
pub fn partition_batch(partition: i32, first_offset: i64, events: &[String]) -> Batch {
    let mut batch = Batch::default();
    for (i, event) in events.iter().enumerate() {
        batch.push(Delivery {
            partition,
            offset: first_offset + i as i64,
            key: None,
            payload: Some(event.clone().into_bytes()),
            timestamp_ms: None,
            trace: None,
        });
    }
    batch
}
