//! PostgreSQL over TLS: `sslmode=require` encrypts and authenticates the server; a server the
//! configured roots do not vouch for is refused; a URL without `sslmode` stays plain.

use inventory_consumer::embedded::postgres::{PostgresOptions, ThrowawayPostgres};
use inventory_consumer::store;

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

#[tokio::test(flavor = "multi_thread")]
async fn sslmode_require_verifies_the_server_and_encrypts() {
    let (ca_pem, server) = crate::support::private_ca();
    let pg = tokio::task::spawn_blocking(move || {
        ThrowawayPostgres::start(PostgresOptions {
            tls: Some(server),
            ..PostgresOptions::default()
        })
    })
    .await
    .expect("joining")
    .expect("starting PostgreSQL with TLS");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("writing the CA");
    let plain = pg.url("postgres");

    let verified = format!(
        "{plain}?sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    );
    assert_eq!(uses_tls(&verified).await, Ok(true));
    store::migrate::migrate(&verified)
        .await
        .expect("migrating over TLS");

    // The server's CA is not among the public roots: no silent fallback to trust or plain text.
    let unknown = uses_tls(&format!("{plain}?sslmode=require")).await;
    assert!(
        matches!(&unknown, Err(e) if e.to_string().to_lowercase().contains("certificate")),
        "an unverifiable server is refused: {unknown:?}"
    );

    assert_eq!(uses_tls(&plain).await, Ok(false), "no sslmode: plain text");
}
