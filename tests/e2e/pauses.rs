//! `pause` and `resume`: a maintenance window on one partition, across replicas.

use crate::support::{EXIT, SETTLE};
use crate::support::{Replica, TOPIC, TestEnv, output_text, wait_until, watermarks};

/// Partition 0 paused before a workload is sent: its owner applies the other partitions and
/// not it; the owner leaves gracefully (the waiting batch does not hold up the drain) and the
/// replica that owns partition 0 next meets the same pause; `status` shows it; after `resume`
/// everything applies once and the end state equals the oracle.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_partition_stays_paused_on_its_new_owner() {
    let env = TestEnv::new(4).await;
    let mut first = env.replica("first", &[]);
    wait_until(
        "the first replica to own every partition",
        SETTLE,
        || async { first.owned().len() == 4 },
    )
    .await;
    let paused = env.command("pause", &["--partition", "0", "--reason", "reindex"]);
    assert!(paused.status.success(), "{}", output_text(&paused));

    let expected = env.produce(&["--events", "2000", "--skus", "100", "--seed", "12"]);
    let ends = watermarks(&env.broker.bootstrap, TOPIC);
    assert!(ends.values().all(|(_, high)| *high > 0), "{ends:?}");
    wait_until("partitions 1 to 3 to be applied", SETTLE, || async {
        let db = env.db.client().await;
        let mut done = 0;
        for p in 1..4 {
            let rows = db
                .query(
                    "SELECT next_offset FROM partition_offsets WHERE partition = $1",
                    &[&p],
                )
                .await
                .expect("offsets");
            done += rows
                .iter()
                .filter(|r| r.get::<_, i64>(0) == ends[&p].1)
                .count();
        }
        done == 3
    })
    .await;
    wait_until("the first owner to meet the pause", SETTLE, || async {
        met_pause(&first)
    })
    .await;
    let on_partition_0 = "SELECT count(*) FROM processed_events WHERE partition = 0";
    assert_eq!(env.db.scalar(on_partition_0).await, 0);

    // A rebalance: the second replica joins, the first leaves gracefully.
    let mut second = env.replica("second", &[]);
    wait_until("the second replica to own partitions", SETTLE, || async {
        !second.owned().is_empty()
    })
    .await;
    let (status, _) = first.terminate(EXIT);
    assert!(status.success(), "the first replica's drain: {status}");
    wait_until(
        "the second replica to own every partition",
        SETTLE,
        || async { second.owned().len() == 4 },
    )
    .await;
    wait_until("the new owner to meet the pause", SETTLE, || async {
        met_pause(&second)
    })
    .await;
    assert_eq!(env.db.scalar(on_partition_0).await, 0, "still paused");
    let shown: serde_json::Value =
        serde_json::from_str(&env.command_ok("status", &["--json"])).expect("status --json");
    assert_eq!(shown["partitions"][0]["paused"], true, "{shown}");
    assert_eq!(shown["partitions"][1]["paused"], false, "{shown}");
    assert_eq!(shown["pauses"][0]["reason"], "reindex", "{shown}");

    let resumed = env.command("resume", &["--partition", "0"]);
    assert!(resumed.status.success(), "{}", output_text(&resumed));
    env.wait_processed(expected.events as i64, SETTLE).await;
    assert!(env.db.scalar(on_partition_0).await > 0);
    let (status, _) = second.terminate(EXIT);
    assert!(status.success());
    assert_eq!(env.db.stock().await, expected.stock);
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
}

/// Whether `replica` logged that a batch of partition 0 waits for a resume.
fn met_pause(replica: &Replica) -> bool {
    replica
        .events("pause_met")
        .iter()
        .any(|e| e["partition"] == 0)
}
