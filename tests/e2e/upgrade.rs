//! Upgrades as users run them (docs/operations.md, "Upgrades and migrations"): the previous release's
//! replicas consume while this build migrates, then are replaced one by one; events from
//! before the upgrade sent again are duplicates. And the way back: a release never runs on a
//! schema newer than its own, and a replica that leaves migrating to a Job waits for it.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::oracle::{assert_database_matches, truth_of};
use crate::support::{EXIT, SETTLE_GROUP};
use crate::support::{
    Replica, TestDb, TestEnv, assert_nothing_applied_twice, output_text, previous_release,
    read_whole_topic, send, wait_until, watermarks,
};
use inventory_consumer::stats::StatsSnapshot;

const EVENTS: i64 = 40_000;
/// One event in this many of those produced before the upgrade is sent again after it.
const RESEND_EVERY: usize = 10;

/// Writes a migration this build does not have into the schema's history: the database as the
/// next release (one migration ahead) leaves it.
async fn migrated_by_a_newer_release(db: &TestDb) {
    db.client()
        .await
        .execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
             VALUES (9999, 'from_a_newer_release',
                     to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), '0')",
            &[],
        )
        .await
        .expect("recording a newer migration");
}

/// What any start-up that writes would change: claims (epochs), periods, rows.
async fn written(db: &TestDb) -> Vec<i64> {
    let mut state = Vec::new();
    for sql in [
        "SELECT count(*) FROM partition_owners",
        "SELECT coalesce(sum(epoch), 0)::bigint FROM partition_owners",
        "SELECT count(*) FROM history_periods",
        "SELECT count(*) FROM processed_events",
        "SELECT count(*) FROM refinery_schema_history",
        "SELECT count(*) FROM partition_pauses",
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM partition_offsets",
        "SELECT count(*) FROM partition_owners WHERE rewound_at IS NOT NULL",
        "SELECT count(*) FROM dead_letters WHERE redriven_at IS NOT NULL",
    ] {
        state.push(db.scalar(sql).await);
    }
    state
}

/// A replica of `bin` that must stop at start-up with exit 3, saying `why`, and write nothing.
async fn refused(env: &TestEnv, bin: &Path, name: &str, settings: &[(&str, &str)], why: &str) {
    let before = written(&env.db).await;
    let mut replica = env.replica_of(bin, name, &[], settings);
    let (status, _) = replica.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(3), "{name}: {}", replica.log());
    assert!(
        replica.log().contains(why),
        "{name} did not say {why:?}:\n{}",
        replica.log()
    );
    assert_eq!(
        written(&env.db).await,
        before,
        "{name} wrote to the database"
    );
}

/// This build refuses a schema a newer release migrated, whether it migrates or not and in
/// every command that writes (`migrate`, `maintain`, `pause`, `resume`, `replay`,
/// `dead-letters redrive`), before writing anything; and a replica that leaves migrating to
/// the migration Job (`database.migrate = false`) waits, not ready and out of the group, until
/// the schema is its own, then works.
#[tokio::test(flavor = "multi_thread")]
async fn a_release_runs_only_on_its_own_schema() {
    let env = TestEnv::new(2).await;
    let bin = Path::new(crate::support::BIN);

    let mut waiting = env.replica("waiting", &[("database.migrate", "false")]);
    wait_until(
        "the replica to wait for migrations",
        SETTLE_GROUP,
        || async {
            waiting.events("database_unavailable").iter().any(|e| {
                e["error"]
                    .as_str()
                    .is_some_and(|why| why.contains("waiting for migrations: the schema is empty"))
            })
        },
    )
    .await;
    let addr = waiting.http_addr().await;
    let (code, body) = crate::support::http_get(&addr, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("waiting for migrations"), "{body}");
    assert!(waiting.owned().is_empty());
    let migrated = env.command_ok("migrate", &[]);
    assert!(migrated.contains("schema is up to date"), "{migrated}");
    let expected = env.produce(&["--events", "500", "--skus", "20", "--seed", "5"]);
    env.wait_processed(expected.events as i64, SETTLE_GROUP)
        .await;
    let (status, stats) = waiting.terminate(EXIT);
    assert!(status.success(), "{status}");
    assert_eq!(stats.applied + stats.rejected, expected.events, "{stats:?}");

    migrated_by_a_newer_release(&env.db).await;
    let why = "the database's schema is at migration 9999, which this release";
    refused(&env, bin, "migrating", &[], why).await;
    refused(
        &env,
        bin,
        "not-migrating",
        &[("database.migrate", "false")],
        why,
    )
    .await;
    let writers: [(&str, &[&str]); 6] = [
        ("migrate", &[]),
        ("maintain", &[]),
        ("pause", &[]),
        ("resume", &[]),
        ("replay", &["--to-offset", "0", "--force"]),
        ("dead-letters", &["redrive", "1"]),
    ];
    for (command, args) in writers {
        let before = written(&env.db).await;
        let out = env.command(command, args);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{command}: {}",
            output_text(&out)
        );
        assert!(output_text(&out).contains(why), "{}", output_text(&out));
        assert_eq!(written(&env.db).await, before, "{command} wrote");
    }
}

/// A rolling update from the previous release, on Apache Kafka: two replicas of the previous
/// release consume 40,000 events produced at 2,000/s; this build's `migrate` runs while they
/// do; each is then replaced by a replica of this build (which leaves migrating to `migrate`),
/// the new one joining before the old one leaves. One in ten of the events produced before the
/// upgrade is then sent again. Every event is decided once (the ones sent again are all
/// skipped as duplicates), the stock equals the tests' model, `verify` passes, and every old
/// replica exits 0. Then the way back: the previous release refuses to start on a schema one
/// migration newer than this build's, and writes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_update_from_the_previous_release_decides_every_event_once() {
    let (commit, previous) = previous_release();
    let env = TestEnv::on_apache(6, 1).await;
    // Periods of 5 s: the old replicas count ended periods (with their ranges of ids) during
    // the run, and the events sent again are looked for in them.
    let settings = [
        ("processing.drain_timeout_ms", "4000"),
        ("history.period_s", "5"),
    ];
    let mut new_settings = settings.to_vec();
    new_settings.push(("database.migrate", "false"));

    let out = env.command_of(&previous, "migrate", &[]);
    assert!(out.status.success(), "{}", output_text(&out));
    let mut old: Vec<Replica> = (1..=2)
        .map(|i| env.replica_of(&previous, &format!("old{i}"), &[], &settings))
        .collect();
    wait_balanced(&[&old[0], &old[1]]).await;
    let producer = env.produce_in_background(&[
        "--events",
        &EVENTS.to_string(),
        "--skus",
        "2000",
        "--duplicates",
        "0",
        "--seed",
        "27",
        "--rate",
        "2000",
    ]);
    wait_until(
        "the old replicas to apply a quarter",
        SETTLE_GROUP,
        || async { env.db.settled().await >= EVENTS / 4 },
    )
    .await;

    // The upgrade: the new schema first, while the old replicas consume.
    let before_upgrade = watermarks(&env.broker.bootstrap, "inventory-events");
    let old_schema = env
        .db
        .scalar("SELECT max(version)::bigint FROM refinery_schema_history")
        .await;
    let migrated = env.command_ok("migrate", &[]);
    println!(
        "upgrade: this build's migrate while 2 old replicas consumed, from schema {old_schema} \
         to {}: {}",
        inventory_consumer::store::migrate::newest_known(),
        migrated.trim()
    );
    let mut new: Vec<Replica> = Vec::new();
    let mut old_exits = StatsSnapshot::default();
    for (i, replica) in old.iter_mut().enumerate() {
        let started = Instant::now();
        new.push(env.replica(&format!("new{}", i + 1), &new_settings));
        let joined = new.last().expect("just started");
        wait_until(
            "the new replica to own partitions",
            SETTLE_GROUP,
            || async { !joined.owned().is_empty() },
        )
        .await;
        let (status, stats) = replica.terminate(EXIT);
        assert!(status.success(), "{} exited with {status}", replica.name());
        old_exits = old_exits + stats;
        println!(
            "upgrade: {} replaced by {} in {:.1} s",
            replica.name(),
            joined.name(),
            started.elapsed().as_secs_f64()
        );
    }
    let expected = producer.finish();
    env.wait_processed(expected.events as i64, SETTLE_GROUP)
        .await;

    // A share of the events from before the upgrade, sent again to their partitions.
    let (messages, _) = read_whole_topic(&env.broker.bootstrap, "inventory-events");
    let again: Vec<(i32, String, Vec<u8>)> = messages
        .iter()
        .filter(|m| {
            before_upgrade
                .get(&m.partition)
                .is_some_and(|(_, high)| m.offset < *high)
        })
        .step_by(RESEND_EVERY)
        .map(|m| {
            let key = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
            (m.partition, key, m.payload.clone().unwrap_or_default())
        })
        .collect();
    assert!(again.len() as i64 >= EVENTS / 4 / RESEND_EVERY as i64 - 1);
    // Some of them must be looked for in periods counted with their range (by the old
    // replicas or the new), the path a range decides.
    let ids: Vec<String> = again
        .iter()
        .filter_map(|(_, _, payload)| {
            let event: serde_json::Value = serde_json::from_slice(payload).ok()?;
            Some(event["event_id"].as_str()?.to_owned())
        })
        .collect();
    let in_ranged: i64 = env
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM processed_events e JOIN history_periods h USING (period)
             WHERE h.events_min_id IS NOT NULL AND e.event_id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("finding the periods of the events sent again")
        .get(0);
    assert!(
        in_ranged > 0,
        "no event sent again lies in a counted period"
    );
    send(&env.broker.bootstrap, again.clone());
    wait_until(
        "the events sent again to be consumed",
        SETTLE_GROUP,
        || async { env.lag() == 0 },
    )
    .await;

    let mut new_exits = StatsSnapshot::default();
    for replica in &mut new {
        let (status, stats) = replica.terminate(EXIT);
        assert!(status.success(), "{} exited with {status}", replica.name());
        new_exits = new_exits + stats;
    }
    let all: Vec<&Replica> = old.iter().chain(new.iter()).collect();
    assert_nothing_applied_twice(&all);
    let truth = truth_of(&env);
    assert_database_matches(&env.db, &truth).await;
    assert_eq!(
        truth.duplicates,
        again.len() as u64,
        "the model's duplicates"
    );
    let skipped = old_exits.duplicates + new_exits.duplicates;
    assert_eq!(
        skipped,
        again.len() as u64,
        "duplicates skipped (old {old_exits:?}, new {new_exits:?})"
    );
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
    let counted = env
        .db
        .scalar("SELECT count(*) FROM history_periods WHERE events_min_id IS NOT NULL")
        .await;
    println!(
        "upgrade from the previous release (commit {commit}): {} events produced, {} applied \
         by the old replicas and {} by the new; {} sent again from before the upgrade ({in_ranged} \
         of them in periods counted with their ranges), {skipped} skipped as duplicates; \
         {counted} periods counted with their ranges; verify PASS; every old replica exited 0",
        expected.events,
        old_exits.applied + old_exits.rejected,
        new_exits.applied + new_exits.rejected,
        again.len(),
    );

    // The way back: the previous release on the schema of the release after this one.
    migrated_by_a_newer_release(&env.db).await;
    // It names the first migration it lacks: this build's own, when this build added one
    // (the schema is this build's now), else the newer release's.
    let why = "is missing from the filesystem";
    refused(&env, &previous, "old-again", &settings, why).await;
    println!("upgrade: the previous release refused a schema newer than its own (exit 3)");
}

/// Waits until every replica owns partitions and together they own all 6.
async fn wait_balanced(replicas: &[&Replica]) {
    wait_until("the group to balance", SETTLE_GROUP, || async {
        let owned: Vec<Vec<i32>> = replicas.iter().map(|r| r.owned()).collect();
        owned.iter().all(|o| !o.is_empty()) && owned.iter().map(Vec::len).sum::<usize>() == 6
    })
    .await;
}
