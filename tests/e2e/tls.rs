//! PostgreSQL over TLS, as a managed service offers it: a server that accepts only TLS
//! (`hostssl`), its certificate from a private CA. `sslmode=verify-full` with `sslrootcert`
//! works through every command users call (`migrate`, `run`, `verify`); the wrong CA, or a
//! host name the certificate does not name, is refused with an error that says TLS.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use inventory_consumer::logs::chain;
use inventory_consumer::store;
use inventory_devtools::embedded::postgres::{PostgresOptions, ThrowawayPostgres};

use crate::support::{BIN, TestEnv, http_get, output_text, private_ca, wait_until};

async fn uses_tls(url: &str) -> Result<bool, store::Failure> {
    let client = store::connect(url).await?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// A TLS-only server with a certificate for 127.0.0.1 and localhost from a private CA; the CA's
/// certificate is written to `dir/ca.pem`.
async fn tls_only_server(dir: &Path) -> ThrowawayPostgres {
    let (ca_pem, server) = private_ca();
    std::fs::write(dir.join("ca.pem"), ca_pem).expect("writing the CA");
    tokio::task::spawn_blocking(move || {
        ThrowawayPostgres::start(PostgresOptions {
            tls: Some(server),
            ..PostgresOptions::default()
        })
    })
    .await
    .expect("joining")
    .expect("starting PostgreSQL with TLS")
}

fn command(args: &[&str], database_url: &str) -> Output {
    Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("INVENTORY_DATABASE__CONNECT_TIMEOUT_MS", "5000")
        .output()
        .expect("running the binary")
}

#[tokio::test(flavor = "multi_thread")]
async fn sslmode_require_verifies_the_server_and_plain_text_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pg = tls_only_server(dir.path()).await;
    let plain = pg.url("postgres");
    let verified = format!(
        "{plain}?sslmode=verify-full&sslrootcert={}",
        dir.path().join("ca.pem").display()
    );
    assert!(matches!(uses_tls(&verified).await, Ok(true)));

    // The server's CA is not among the public roots: no silent fallback to trust or plain text.
    let unknown = uses_tls(&format!("{plain}?sslmode=require")).await;
    assert!(
        matches!(&unknown, Err(e) if chain(e).to_lowercase().contains("certificate")),
        "an unverifiable server is refused: {unknown:?}"
    );
    // No sslmode: plain text, which this server refuses.
    let refused = uses_tls(&plain).await;
    assert!(
        matches!(&refused, Err(e) if chain(e).contains("no encryption")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_works_through_migrate_run_and_verify_and_a_wrong_ca_or_host_is_refused() {
    let mut env = TestEnv::new(4).await;
    let pg = tls_only_server(env.dir.path()).await;
    let ca = env.path("ca.pem");
    let verified = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url("postgres"),
        ca.display()
    );

    let migrated = command(&["migrate"], &verified);
    assert!(migrated.status.success(), "{}", output_text(&migrated));

    // A replica and `verify` on the TLS server, as users point them at it (DATABASE_URL).
    env.db.url = verified.clone();
    let mut replica = env.replica("r1", &[("database.migrate", "false")]);
    let expected = env.produce(&["--events", "2000", "--skus", "50", "--seed", "11"]);
    wait_until(
        "the replica to apply the workload over TLS",
        Duration::from_secs(120),
        || {
            let verified = env.verify(Some(&expected)).0;
            async move { verified }
        },
    )
    .await;
    let probe = store::connect(&verified)
        .await
        .expect("connecting over TLS");
    let encrypted: i64 = probe
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name = 'inventory-consumer' AND s.ssl",
            &[],
        )
        .await
        .expect("reading pg_stat_ssl")
        .get(0);
    assert!(encrypted >= 1, "the replica's connections are encrypted");
    let (status, stats) = replica.terminate(Duration::from_secs(30));
    assert!(status.success(), "replica exit: {status}");
    assert_eq!(stats.applied + stats.rejected, expected.events);

    // Another CA: refused, saying why, by every command.
    let (other_ca, _) = private_ca();
    let other = env.path("other-ca.pem");
    std::fs::write(&other, other_ca).expect("writing the other CA");
    let wrong_ca = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url("postgres"),
        other.display()
    );
    // A name the certificate does not hold, at the server's address.
    let wrong_host = format!(
        "postgres://postgres@db.example.invalid:{}/postgres?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
        pg.port(),
        ca.display()
    );
    for (url, why) in [
        (&wrong_ca, "UnknownIssuer"),
        (&wrong_host, "not valid for name"),
    ] {
        for args in [&["migrate"][..], &["verify"][..]] {
            let out = command(args, url);
            let text = output_text(&out);
            assert_eq!(out.status.code(), Some(3), "{args:?} {why}:\n{text}");
            assert!(
                text.contains("TLS") && text.contains(why),
                "{args:?}: the error names TLS and {why}:\n{text}"
            );
        }
        // A replica waits (a certificate rotated ahead of its secret is fixed without a
        // restart), not ready and out of the group, saying why.
        let mut refused = env.replica_with_env(why, &[("DATABASE_URL", url)], &[]);
        let addr = refused.http_addr().await;
        wait_until(
            "the replica to say why it is not ready",
            Duration::from_secs(30),
            || {
                let (status, body) = http_get(&addr, "/readyz");
                async move { status == 503 && body.contains("TLS") && body.contains(why) }
            },
        )
        .await;
        assert!(refused.owned().is_empty(), "{}", refused.log());
        let (status, _) = refused.terminate(Duration::from_secs(30));
        assert!(
            status.success(),
            "run with {why}: {status}\n{}",
            refused.log()
        );
        assert!(!refused.has_event("partitions_assigned"), "never joined");
    }
}
