//! Recovery from a backup: the database holds the offsets beside the effects, so a restored
//! backup says itself where each partition resumes.

use std::path::Path;
use std::process::Command;

use inventory_devtools::embedded::postgres::client_program;

use crate::support::{EXIT, SETTLE_SLOW};
use crate::support::{TestDb, TestEnv, connect, terminate_all, wait_for_group, wait_until};

/// On Apache Kafka: a `pg_dump` taken while two replicas apply a workload, at least 20,000
/// more events applied after it, the database dropped and restored from the dump, half the
/// partitions replayed from their start (`replay --to-offset 0`), two new replicas started.
/// They read each message once more from the backup's offsets or the replay's, apply again
/// exactly the events the backup lacks (each once), skip the rest, and the end state equals
/// the oracle.
#[tokio::test(flavor = "multi_thread")]
async fn a_restored_backup_resumes_from_its_own_offsets() {
    let env = TestEnv::on_apache(6, 1).await;
    let mut first = vec![env.replica("r1", &[]), env.replica("r2", &[])];
    // The group formed before the workload starts, so the backup is taken while events flow,
    // not after a backlog has been applied at full speed.
    wait_for_group(&[&first[0], &first[1]], 6, SETTLE_SLOW).await;
    let producing = env.produce_in_background(&[
        "--events",
        "30000",
        "--skus",
        "500",
        "--duplicates",
        "0.03",
        "--invalid",
        "0.01",
        "--rate",
        "2000",
        "--seed",
        "21",
    ]);
    // Events decided, as the backup's count below: dead letters are settled messages too, and
    // waiting on those could take the dump with fewer than 4,000 events in it.
    wait_until(
        "a few thousand events to be applied",
        SETTLE_SLOW,
        || async { env.db.scalar("SELECT count(*) FROM processed_events").await >= 4_000 },
    )
    .await;
    let dump = env.path("mid-stream.dump");
    pg_dump(&env.db.url, &dump);

    let expected = producing.finish();
    let total = (expected.events + expected.dead_letters) as i64;
    env.wait_processed(total, SETTLE_SLOW).await;
    terminate_all(&mut first, EXIT);

    drop_and_restore(&env.db, &dump).await;
    let in_backup = env.db.scalar("SELECT count(*) FROM processed_events").await;
    println!(
        "recovery: the backup holds {in_backup} of {} events",
        expected.events
    );
    assert!(
        in_backup >= 4_000 && (expected.events as i64) - in_backup >= 20_000,
        "the backup holds {in_backup} of {} events: taken mid-stream, 20,000 or more after it",
        expected.events
    );
    let offsets_in_backup = env
        .db
        .scalar("SELECT sum(next_offset)::bigint FROM partition_offsets")
        .await;
    assert!(offsets_in_backup < expected.messages as i64);
    // Partitions 0 to 2 replayed from their start before the new replicas start; 3 to 5 resume
    // at the backup's own offsets. Everything up to those is recorded in the backup, so
    // nothing of the replayed window applies again.
    let kept_offsets = env
        .db
        .scalar("SELECT coalesce(sum(next_offset), 0)::bigint FROM partition_offsets WHERE partition >= 3")
        .await;
    let replayed: serde_json::Value = serde_json::from_str(&env.command_ok(
        "replay",
        &[
            "--to-offset",
            "0",
            "--partition",
            "0",
            "--partition",
            "1",
            "--partition",
            "2",
            "--json",
        ],
    ))
    .expect("replay --json");
    assert_eq!(replayed["again"], 0, "{replayed}");
    assert_eq!(
        replayed["messages"].as_i64(),
        Some(offsets_in_backup - kept_offsets),
        "{replayed}"
    );
    assert_eq!(
        env.db
            .scalar("SELECT sum(next_offset)::bigint FROM partition_offsets")
            .await,
        kept_offsets,
        "partitions 0 to 2 rewound to their start"
    );

    let mut second = vec![env.replica("r3", &[]), env.replica("r4", &[])];
    wait_until("the restored database to catch up", SETTLE_SLOW, || async {
        env.db.settled().await == total
    })
    .await;
    env.db
        .wait_offsets_recorded(expected.messages as i64, SETTLE_SLOW)
        .await;
    let stats = terminate_all(&mut second, EXIT);
    assert_eq!(
        (stats.applied + stats.rejected) as i64,
        expected.events as i64 - in_backup,
        "exactly the events the backup lacks were decided again"
    );
    assert_eq!(
        stats.applied + stats.rejected + stats.duplicates + stats.dead_letters,
        expected.messages - kept_offsets as u64,
        "each message read once more from where the replay or the backup set: {stats:?}"
    );
    assert_eq!(env.db.stock().await, expected.stock);
    crate::oracle::assert_database_matches(&env.db, &crate::oracle::truth_of(&env)).await;
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
}

/// `pg_dump` of `url` in the custom format (one consistent snapshot).
fn pg_dump(url: &str, to: &Path) {
    let out = Command::new(client_program("pg_dump").expect("pg_dump"))
        .args(["--format=custom", "--file"])
        .arg(to)
        .arg(format!("--dbname={url}"))
        .output()
        .expect("running pg_dump");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What docs/operations.md's procedure ("Backup and restore") does, the group stopped: drop the database, create it empty,
/// `pg_restore` the dump into it.
async fn drop_and_restore(db: &TestDb, dump: &Path) {
    let config: tokio_postgres::Config = db.url.parse().expect("the test database's URL");
    let name = config.get_dbname().expect("a database name").to_owned();
    let admin_url =
        inventory_consumer::store::with_database(&db.url, "template1").expect("an admin URL");
    let admin = connect(&admin_url).await;
    admin
        .batch_execute(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .await
        .expect("dropping the database");
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .expect("creating it empty");
    let out = Command::new(client_program("pg_restore").expect("pg_restore"))
        .args(["--exit-on-error", "--no-owner"])
        .arg(format!("--dbname={}", db.url))
        .arg(dump)
        .output()
        .expect("running pg_restore");
    assert!(
        out.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
