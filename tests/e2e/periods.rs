//! History periods against a real PostgreSQL (src/store/retention.rs): an event id stays a
//! duplicate in the periods after its own until the dedupe horizon drops it; a counted period's
//! range of ids says where a batch reads recorded ids, and a period counted without one (as
//! releases before migration 15 leave it) is read whole; a new period starts only once the old
//! one's batches have ended. Time is moved on by moving the periods' timestamps back
//! (`support::history`), so nothing here waits for a day to pass.

use std::time::Duration;

use serde_json::json;

use crate::support::history::{
    apply_events, assert_audit_passes, claimed_store, maintain, pass_days, restock, settings,
};
use crate::support::{TestEnv, batch, migrated_store, terminate_all, wait_until};
use inventory_consumer::domain::lock_key;
use inventory_consumer::store::retention;
use inventory_consumer::store::{self, Guards, apply_batch, audit};

/// An event id recorded in an earlier period is still a duplicate (the batch reads every period
/// kept); once its period is past the dedupe horizon and dropped, the same id applies again, as
/// the horizon says. The ledger's dropped periods become opening balances, dead letters and
/// events are counted as dropped, and the audit holds at every step.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_id_stays_a_duplicate_in_later_periods_until_the_horizon_drops_it() {
    let (db, pool, source, epoch) = claimed_store().await;
    let client = db.client().await;
    let apply =
        |offset: i64, events: Vec<String>| apply_events(&pool, &source, epoch, offset, events);
    let stock = || async {
        db.scalar("SELECT current_stock FROM products WHERE sku = 'S-1'")
            .await
    };

    assert_eq!(apply(0, vec![restock("e1", 5)]).await.applied, 1);
    assert_eq!(
        db.scalar("SELECT period::bigint FROM processed_events WHERE event_id = 'e1'")
            .await,
        1
    );
    pass_days(&client, 2).await;
    let m = maintain(&db).await;
    assert!(m.started && m.period == 2, "{m:?}");
    assert_eq!(
        db.scalar(
            "SELECT events_counted * 10 + events_dropped FROM history_periods WHERE period = 1"
        )
        .await,
        10,
        "the pass that ended period 1 counted its event, to be recorded when it is dropped"
    );

    let again = apply(1, vec![restock("e1", 5), "{not json".to_owned()]).await;
    assert_eq!((again.duplicates, again.dead_letters), (1, 1), "{again:?}");
    assert_eq!(
        stock().await,
        5,
        "a duplicate from an earlier period changed stock"
    );
    assert_audit_passes(&db, "two periods").await;

    // Period 1 ended 16 days ago: past the 15-day horizon, inside the ledger's 30 days. Left
    // uncounted, as a period that ended before migration 13 is: the drop counts it itself.
    client
        .execute(
            "UPDATE history_periods SET events_counted = NULL WHERE period = 1",
            &[],
        )
        .await
        .expect("uncounting period 1");
    pass_days(&client, 16).await;
    let m = maintain(&db).await;
    assert_eq!(
        m.dropped,
        [
            "processed_events_p0",
            "replies_p0",
            "processed_events_p1",
            "replies_p1"
        ],
        "only periods 0 (empty: this database began with migration 8) and 1 lose their events and replies: {m:?}"
    );
    assert_audit_passes(&db, "events of period 1 dropped").await;
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM pg_class
             WHERE relname IN ('processed_events_p1', 'replies_p1')"
        )
        .await,
        0,
        "period 1's detached tables were not dropped"
    );
    assert_eq!(
        db.scalar("SELECT events_dropped FROM history_periods WHERE period = 1")
            .await,
        1
    );

    assert_eq!(
        apply(2, vec![restock("e1", 5)]).await.applied,
        1,
        "past the horizon an event id applies again"
    );
    assert_eq!(stock().await, 10);

    pass_days(&client, 31).await;
    // As a pass that stopped after detaching a partition would leave it.
    client
        .batch_execute("CREATE TABLE stock_movements_p999 (LIKE stock_movements)")
        .await
        .expect("a detached table");
    let m = maintain(&db).await;
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_class WHERE relname = 'stock_movements_p999'")
            .await,
        0,
        "a detached table left behind was not dropped"
    );
    for gone in [
        "stock_movements_p1",
        "stock_movements_p2",
        "dead_letters_p2",
        "processed_events_p2",
    ] {
        assert!(m.dropped.iter().any(|d| d == gone), "{gone} kept: {m:?}");
    }
    assert_eq!(
        db.scalar("SELECT stock FROM ledger_openings WHERE sku = 'S-1'")
            .await,
        5,
        "period 1's restock carried forward"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM stock_movements").await,
        1,
        "the re-applied restock's movement is kept"
    );
    assert_audit_passes(&db, "ledger periods dropped").await;
    assert_eq!(
        audit::settled(&client).await.expect("settled"),
        3,
        "e1 twice (the duplicate is no row) and the dead letter, counted whether dropped or kept"
    );

    // The audit still catches a ledger that disagrees with stock once balances carry forward.
    client
        .execute("UPDATE ledger_openings SET stock = stock + 1", &[])
        .await
        .expect("corrupting an opening");
    let report = audit::audit(&client, None).await.expect("auditing");
    assert!(!report.passed(), "a wrong opening balance passed the audit");
}

/// A counted period's range of event ids says where a batch reads recorded ids: ids at its
/// ends and between are still duplicates in a later period, ids outside it are new. The audit
/// catches a range that leaves out an id of its period, which would let that id apply again.
#[tokio::test(flavor = "multi_thread")]
async fn a_counted_periods_range_of_ids_says_where_recorded_ids_are_read() {
    let (db, pool, source, epoch) = claimed_store().await;
    let client = db.client().await;
    let apply = |offset: i64, ids: &[&str]| {
        let events = ids.iter().map(|id| restock(id, 1)).collect();
        apply_events(&pool, &source, epoch, offset, events)
    };

    assert_eq!(apply(0, &["id-b", "id-m", "id-y"]).await.applied, 3);
    pass_days(&client, 2).await;
    let m = maintain(&db).await;
    assert!(m.started && m.counted.contains(&1), "{m:?}");
    let range = client
        .query_one(
            "SELECT events_min_id, events_max_id FROM history_periods WHERE period = 1",
            &[],
        )
        .await
        .expect("period 1's range");
    assert_eq!(
        (range.get::<_, String>(0), range.get::<_, String>(1)),
        ("id-b".to_owned(), "id-y".to_owned())
    );

    let again = apply(3, &["id-a", "id-b", "id-m", "id-y", "id-z"]).await;
    assert_eq!((again.duplicates, again.applied), (3, 2), "{again:?}");
    assert_audit_passes(&db, "a counted period").await;

    client
        .execute(
            "UPDATE history_periods SET events_min_id = 'id-c' WHERE period = 1",
            &[],
        )
        .await
        .expect("narrowing the range");
    let report = audit::audit(&client, None).await.expect("auditing");
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.passed).collect();
    assert!(
        failed.len() == 1 && failed[0].name == "period id ranges",
        "{failed:?}"
    );
    assert_eq!(
        apply(8, &["id-b"]).await.applied,
        1,
        "a batch below the narrowed range did not skip period 1"
    );
}

/// A release before migration 15 counts an ended period without its range of ids, and one of
/// them may run beside migration 15 in a rolling update. Such a period may hold any id: a
/// batch reads its recorded ids there as in a period not counted yet, and maintenance counts it
/// again, with its range. (Before that, the batch skipped the period, and an id of it re-sent
/// applied a second time.) Through the command line: a replica records events, maintenance
/// counts their period, the range is taken away as that release leaves it, and the same events
/// sent again are all duplicates.
#[tokio::test(flavor = "multi_thread")]
async fn a_counted_period_without_a_range_of_ids_still_recognises_its_events() {
    let env = TestEnv::new(1).await;
    let settings = [
        ("history.period_s", "2"),
        ("history.dedupe_horizon_s", "3600"),
        ("history.ledger_retention_s", "3600"),
        ("history.dead_letter_retention_s", "3600"),
    ];
    let events: Vec<serde_json::Value> = (0..20)
        .map(|i| json!({"event_id": format!("old-{i:02}"), "type": "restock", "sku": "S-1", "quantity": 1}))
        .collect();
    let counted_with_range = "SELECT count(*) FROM history_periods h
         WHERE events_counted IS NOT NULL AND events_min_id IS NOT NULL
           AND EXISTS (SELECT 1 FROM processed_events e
                       WHERE e.period = h.period AND e.event_id = 'old-00')";

    let mut first = vec![env.replica("r1", &settings)];
    env.produce_json(&events, false);
    env.wait_processed(20, Duration::from_secs(120)).await;
    wait_until(
        "the events' period to be counted",
        Duration::from_secs(60),
        || async { env.db.scalar(counted_with_range).await == 1 },
    )
    .await;
    terminate_all(&mut first, Duration::from_secs(30));
    let cleared = env
        .db
        .client()
        .await
        .execute(
            "UPDATE history_periods SET events_min_id = NULL, events_max_id = NULL
             WHERE events_counted IS NOT NULL",
            &[],
        )
        .await
        .expect("taking the ranges away");
    assert!(cleared >= 1, "no counted period to take the range from");
    assert_eq!(env.db.scalar(counted_with_range).await, 0);

    // Maintenance takes this lock with a try-lock, each step: held here, every pass skips.
    let maintenance = env.db.client().await;
    let key = lock_key("history maintenance");
    maintenance
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .expect("holding maintenance off");
    let mut second = vec![env.replica("r2", &settings)];
    env.produce_json(&events, false);
    env.wait_processed(20, Duration::from_secs(120)).await;
    let recorded = "SELECT count(*) FROM processed_events WHERE event_id LIKE 'old-%'";
    assert_eq!(
        env.db.scalar(recorded).await,
        20,
        "the events sent again were applied again"
    );
    assert_eq!(
        env.db.scalar(counted_with_range).await,
        0,
        "maintenance ran although held off: the batches' read was not what recognised the events"
    );
    maintenance
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .expect("letting maintenance run");
    wait_until(
        "the period to be counted again",
        Duration::from_secs(60),
        || async { env.db.scalar(counted_with_range).await == 1 },
    )
    .await;
    env.produce_json(&events, false);
    env.wait_processed(20, Duration::from_secs(120)).await;
    let stats = terminate_all(&mut second, Duration::from_secs(30));
    assert_eq!(
        (stats.duplicates, stats.applied),
        (40, 0),
        "the events sent again were applied again: {stats:?}"
    );
    assert_eq!(env.db.stock().await.get("S-1"), Some(&20));
    assert_eq!(env.db.scalar(recorded).await, 20);
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}

/// A new period starts only once every transaction of the current one has ended: it waits for
/// a batch in flight, and a batch that comes meanwhile waits behind it and lands in the new
/// period. So no two transactions of different periods ever overlap.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_period_waits_for_the_batches_of_the_old_one() {
    let (db, pool, source) = migrated_store().await;
    let epoch = store::claim(&pool, &source, "a", &[0])
        .await
        .expect("claim")[&0]
        .epoch;
    let client = db.client().await;
    pass_days(&client, 2).await;

    let mut in_flight = db.client().await;
    let tx = in_flight.transaction().await.expect("begin");
    tx.execute(
        "SELECT pg_advisory_xact_lock_shared($1)",
        &[&retention::clock_key()],
    )
    .await
    .expect("a batch's clock lock");
    let switch = {
        let url = db.url.clone();
        tokio::spawn(async move {
            let mut client = store::connect(&url).await.expect("connect");
            retention::maintain(&mut client, &settings()).await
        })
    };
    let waiting_on_advisory = |n: i64| {
        let db = &db;
        async move {
            db.scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'
                   AND datname = current_database()",
            )
            .await
                == n
        }
    };
    wait_until("the period switch to wait", Duration::from_secs(30), || {
        waiting_on_advisory(1)
    })
    .await;
    let later = {
        let (pool, source) = (pool.clone(), source.clone());
        tokio::spawn(async move {
            apply_batch(
                &pool,
                &source,
                &batch(0, &[restock("late", 1)]),
                Guards::On,
                epoch,
            )
            .await
        })
    };
    wait_until("the later batch to queue", Duration::from_secs(30), || {
        waiting_on_advisory(2)
    })
    .await;
    assert!(!switch.is_finished() && !later.is_finished());
    tx.commit().await.expect("the batch in flight ends");

    let m = switch.await.expect("join").expect("maintenance");
    assert!(m.started && m.period == 2, "{m:?}");
    later.await.expect("join").expect("the later batch");
    assert_eq!(
        db.scalar("SELECT period::bigint FROM processed_events WHERE event_id = 'late'")
            .await,
        2,
        "the batch that queued behind the switch wrote to the new period"
    );
}
