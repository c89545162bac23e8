//! `replay`: a window of the topic read again while replicas run; and a partition whose fetch
//! starts ahead of the database is read again from where the database stands.

use crate::support::{EXIT, SETTLE_SLOW};
use crate::support::{
    TestEnv, http_get, metric, output_text, terminate_all, wait_for_group, wait_until,
};

/// On Apache Kafka, three replicas apply a workload; mid-stream, `replay --to-time` rewinds
/// every partition to the first message produced after a moment already applied.
/// - The dry run reads the window, predicts that none of its events applies again, and moves
///   nothing.
/// - The replay moves each partition back; each owner claims its partitions again (once per
///   partition) and reads the window again: every message of it is skipped as a duplicate,
///   exactly, so no worker kept its old position and none read the window twice.
/// - Each event is decided once, and stock equals the oracle.
#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_window_changes_nothing_while_three_replicas_run() {
    let env = TestEnv::on_apache(6, 1).await;
    let mut replicas = vec![
        env.replica("r1", &[]),
        env.replica("r2", &[]),
        env.replica("r3", &[]),
    ];
    wait_for_group(&[&replicas[0], &replicas[1], &replicas[2]], 6, SETTLE_SLOW).await;
    // No invalid messages: then every message of the window is an event, and a duplicate
    // when read again.
    let producing = env.produce_in_background(&[
        "--events",
        "12000",
        "--skus",
        "300",
        "--duplicates",
        "0.03",
        "--rate",
        "1500",
        "--seed",
        "31",
    ]);
    wait_until("2,000 events to be applied", SETTLE_SLOW, || async {
        env.db.settled().await >= 2_000
    })
    .await;
    let from = chrono::Utc::now().timestamp_millis().to_string();
    wait_until("5,000 events to be applied", SETTLE_SLOW, || async {
        env.db.settled().await >= 5_000
    })
    .await;

    let dry: serde_json::Value = serde_json::from_str(
        &env.command_ok("replay", &["--to-time", &from, "--dry-run", "--json"]),
    )
    .expect("replay --json");
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert!(
        dry["messages"].as_u64().unwrap_or(0) > 0,
        "a window to read: {dry}"
    );
    assert_eq!(dry["messages"], dry["events"], "no invalid messages: {dry}");
    assert_eq!(
        dry["again"], 0,
        "every event of the window is recorded: {dry}"
    );
    assert_eq!(dry["rewound"].as_array().map(Vec::len), Some(0), "{dry}");
    let marked = "SELECT count(*) FROM partition_owners WHERE rewound_at IS NOT NULL";
    assert_eq!(env.db.scalar(marked).await, 0, "a dry run moves nothing");

    let done: serde_json::Value =
        serde_json::from_str(&env.command_ok("replay", &["--to-time", &from, "--json"]))
            .expect("replay --json");
    assert_eq!(done["again"], 0, "{done}");
    let rewound = done["rewound"].as_array().cloned().unwrap_or_default();
    assert_eq!(rewound.len(), 6, "every partition moved back: {done}");
    let window: i64 = rewound
        .iter()
        .map(|r| r["from"].as_i64().unwrap_or(0) - r["to"].as_i64().unwrap_or(0))
        .sum();
    assert!(window >= 1_000, "a window of {window} messages: {done}");

    let expected = producing.finish();
    env.wait_processed(expected.events as i64, SETTLE_SLOW)
        .await;
    env.db
        .wait_offsets_recorded(expected.messages as i64, SETTLE_SLOW)
        .await;
    assert_eq!(env.db.scalar(marked).await, 0, "every rewind claimed");
    let mut replays = 0.0;
    for r in &replicas {
        let (_, metrics) = http_get(&r.http_addr().await, "/metrics");
        replays += metric(&metrics, "inventory_partition_replays_total", &[]);
    }
    // Each partition restarted once by its owner (a rebalance in between would leave the
    // restart to the next owner's claim instead, hence at most).
    assert!(
        (1.0..=6.0).contains(&replays),
        "each partition claimed again at most once: {replays}"
    );

    let stats = terminate_all(&mut replicas, EXIT);
    assert_eq!(
        stats.applied + stats.rejected,
        expected.events,
        "each event decided once"
    );
    assert_eq!(
        stats.duplicates as i64,
        expected.duplicates as i64 + window,
        "the producer's duplicates, and the window read again exactly once"
    );
    assert_eq!(env.db.stock().await, expected.stock);
    crate::oracle::assert_database_matches(&env.db, &crate::oracle::truth_of(&env)).await;
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");

    // What the dry run predicts when ids are no longer recorded (as past the dedupe horizon):
    // ten distinct events of partition 0 forgotten, ten to decide again.
    let forgotten = env
        .db
        .scalar(
            "WITH gone AS (DELETE FROM processed_events WHERE event_id IN (
                 SELECT event_id FROM processed_events WHERE partition = 0
                 ORDER BY \"offset\" LIMIT 10) RETURNING 1)
             SELECT count(*) FROM gone",
        )
        .await;
    assert_eq!(forgotten, 10);
    let predicted: serde_json::Value = serde_json::from_str(&env.command_ok(
        "replay",
        &[
            "--to-offset",
            "0",
            "--partition",
            "0",
            "--dry-run",
            "--json",
        ],
    ))
    .expect("replay --json");
    assert_eq!(predicted["again"], 10, "{predicted}");
    assert_eq!(predicted["partitions"][0]["again"], 10, "{predicted}");

    // Moving it would apply those ten a second time: refused, nothing moved, unless forced.
    let replay = ["--to-offset", "0", "--partition", "0", "--json"];
    let refused = env.command("replay", &replay);
    assert_eq!(refused.status.code(), Some(2), "{}", output_text(&refused));
    assert!(
        output_text(&refused).contains("--force"),
        "{}",
        output_text(&refused)
    );
    assert_eq!(
        env.db.scalar(marked).await,
        0,
        "a refused replay moves nothing"
    );
    // A period whose ids retention dropped after the window's messages were produced is
    // named as one that may have held them (here one marked so, as a drop leaves it).
    let gone = env
        .db
        .scalar(
            "WITH p AS (UPDATE history_periods SET events_gone = true, ended_at = now()
                        WHERE period = 0 RETURNING 1)
             SELECT count(*) FROM p",
        )
        .await;
    assert_eq!(gone, 1);
    let forced: serde_json::Value =
        serde_json::from_str(&env.command_ok("replay", &[&replay[..], &["--force"]].concat()))
            .expect("replay --json");
    assert_eq!(forced["periods_gone"][0]["period"], 0, "{forced}");
    assert_eq!(forced["rewound"][0]["partition"], 0, "{forced}");
    assert_eq!(
        env.db.scalar(marked).await,
        1,
        "forced: partition 0 moved back"
    );
}

/// A replica whose claim during the assignment fails starts from Kafka's committed offsets.
/// Where the database records earlier ones (after a restore, as here) the messages between were
/// never applied by this database: they must be read again, not skipped. The test holds the ownership rows locked while the replica joins,
/// so its claim times out; its first batch then finds the database behind its fetch position,
/// and the partition restarts from the recorded offset: every earlier message is read again.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_starts_ahead_of_the_database_reads_the_gap_again() {
    let env = TestEnv::new(2).await;
    let mut first = env.replica("first", &[]);
    let before = env.produce(&["--events", "1000", "--skus", "50", "--seed", "5"]);
    env.wait_processed(before.events as i64, SETTLE_SLOW).await;
    wait_until("Kafka's commits to reach the end", SETTLE_SLOW, || async {
        env.lag() == 0
    })
    .await;
    let (status, _) = first.terminate(EXIT);
    assert!(status.success());
    // As after restoring a backup taken before any of it was applied (the events stay
    // recorded here, so that reading them again shows as duplicates).
    env.db
        .client()
        .await
        .execute("UPDATE partition_offsets SET next_offset = 0", &[])
        .await
        .expect("moving the recorded offsets back");

    let mut db = env.db.client().await;
    let holding = db.transaction().await.expect("a transaction");
    holding
        .execute("SELECT 1 FROM partition_owners FOR UPDATE", &[])
        .await
        .expect("locking the ownership rows");
    let mut second = env.replica("second", &[]);
    wait_until(
        "the claim during the assignment to time out",
        SETTLE_SLOW,
        || async { second.has_event("claim_timed_out") },
    )
    .await;
    holding.rollback().await.expect("releasing the rows");

    // New messages make the first batches, at Kafka's committed offsets.
    let after = env.produce(&["--events", "200", "--skus", "50", "--seed", "6"]);
    env.wait_processed((before.events + after.events) as i64, SETTLE_SLOW)
        .await;
    env.db
        .wait_offsets_recorded((before.messages + after.messages) as i64, SETTLE_SLOW)
        .await;
    let (status, stats) = second.terminate(EXIT);
    assert!(status.success());
    assert!(second.has_event("partition_behind"), "the gap was found");
    assert_eq!(
        (stats.applied + stats.rejected, stats.duplicates),
        (after.events, before.messages),
        "the new events applied once, and every earlier message read again: {stats:?}"
    );
    crate::oracle::assert_database_matches(&env.db, &crate::oracle::truth_of(&env)).await;
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}
