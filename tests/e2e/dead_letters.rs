//! `dead-letters`: what an operator does once a producer's mistake is understood.

use serde_json::json;

use crate::support::{EXIT, SETTLE};
use crate::support::{TOPIC, TestEnv, output_text, wait_until, watermarks};

/// Two sales dead-lettered for a malformed quantity, and a message that is not JSON: `list`
/// and `show` tell them apart; the two sales redriven with corrected payloads apply once; a
/// second redrive is refused and sends nothing; with `--again` it is sent and changes nothing
/// (its event id is recorded); the message that is not JSON stays pending.
#[tokio::test(flavor = "multi_thread")]
async fn corrected_dead_letters_are_redriven_once() {
    let env = TestEnv::new(2).await;
    let mut replica = env.replica("r1", &[]);
    env.produce_json(
        &[
            json!({"event_id": "restock-a", "type": "restock", "sku": "A", "quantity": 10}),
            json!({"event_id": "sale-1", "type": "sale", "sku": "A", "quantity": "three"}),
            json!({"event_id": "sale-2", "type": "sale", "sku": "A", "quantity": -2}),
        ],
        false,
    );
    crate::support::send(
        &env.broker.bootstrap,
        [(0, "A".to_owned(), b"not json".to_vec())],
    );
    wait_until("the restock and three dead letters", SETTLE, || async {
        env.db.settled().await == 4
    })
    .await;
    let id_of = |event: &'static str| {
        let db = &env.db;
        async move {
            db.scalar(&format!(
                "SELECT id FROM dead_letters WHERE convert_from(payload, 'UTF8') LIKE '%\"{event}\"%'"
            ))
            .await
        }
    };
    let (sale1, sale2) = (id_of("sale-1").await, id_of("sale-2").await);
    let not_json = env
        .db
        .scalar("SELECT id FROM dead_letters WHERE error = 'invalid_json'")
        .await;

    let list = env.command("dead-letters", &["list"]);
    assert!(list.status.success(), "{}", output_text(&list));
    for id in [sale1, sale2, not_json] {
        assert!(
            output_text(&list)
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{id} "))),
            "list names {id}:\n{}",
            output_text(&list)
        );
    }
    assert!(
        output_text(&list).contains("3 dead letter(s)"),
        "{}",
        output_text(&list)
    );
    let shown = env.command("dead-letters", &["show", &sale1.to_string()]);
    assert!(
        shown.status.success()
            && output_text(&shown).contains("\"quantity\":\"three\"")
            && output_text(&shown).contains("error:     wrong_type")
            && output_text(&shown).contains("redriven:  no"),
        "{}",
        output_text(&shown)
    );

    // Corrected, one file each.
    for (id, corrected) in [
        (
            sale1,
            json!({"event_id": "sale-1", "type": "sale", "sku": "A", "quantity": 3}),
        ),
        (
            sale2,
            json!({"event_id": "sale-2", "type": "sale", "sku": "A", "quantity": 2}),
        ),
    ] {
        let file = env.path(&format!("corrected-{id}.json"));
        std::fs::write(&file, corrected.to_string()).expect("writing the correction");
        let dry = env.command(
            "dead-letters",
            &[
                "redrive",
                &id.to_string(),
                "--payload",
                file.to_str().unwrap_or_default(),
                "--dry-run",
            ],
        );
        assert!(
            dry.status.success() && output_text(&dry).contains("would send"),
            "{}",
            output_text(&dry)
        );
        let sent = env.command(
            "dead-letters",
            &[
                "redrive",
                &id.to_string(),
                "--payload",
                file.to_str().unwrap_or_default(),
            ],
        );
        assert!(
            sent.status.success()
                && output_text(&sent).contains(&format!("redrove dead letter {id}")),
            "{}",
            output_text(&sent)
        );
    }
    wait_until("the corrected sales to apply", SETTLE, || async {
        env.db
            .scalar("SELECT count(*) FROM processed_events WHERE event_id IN ('sale-1', 'sale-2') AND outcome = 'applied'")
            .await
            == 2
    })
    .await;
    assert_eq!(env.db.stock().await["A"], 5);

    // Again by accident: refused, nothing sent.
    let high =
        |w: &std::collections::BTreeMap<i32, (i64, i64)>| w.values().map(|(_, h)| h).sum::<i64>();
    let before = high(&watermarks(&env.broker.bootstrap, TOPIC));
    let refused = env.command("dead-letters", &["redrive", &sale1.to_string()]);
    assert_eq!(refused.status.code(), Some(2), "{}", output_text(&refused));
    assert!(
        output_text(&refused).contains("already redriven"),
        "{}",
        output_text(&refused)
    );
    assert_eq!(
        high(&watermarks(&env.broker.bootstrap, TOPIC)),
        before,
        "nothing sent"
    );

    // Again on purpose: sent, and recognised as a duplicate.
    let file = env.path(&format!("corrected-{sale1}.json"));
    let again = env.command(
        "dead-letters",
        &[
            "redrive",
            &sale1.to_string(),
            "--payload",
            file.to_str().unwrap_or_default(),
            "--again",
        ],
    );
    assert!(again.status.success(), "{}", output_text(&again));
    assert_eq!(high(&watermarks(&env.broker.bootstrap, TOPIC)), before + 1);
    wait_until("the resent sale to be consumed", SETTLE, || async {
        env.lag() == 0
    })
    .await;
    let (status, stats) = replica.terminate(EXIT);
    assert!(status.success());
    assert_eq!(
        stats.duplicates, 1,
        "the resent sale was skipped: {stats:?}"
    );
    assert_eq!(env.db.stock().await["A"], 5);
    assert_eq!(
        env.db
            .scalar("SELECT count(*) FROM dead_letters WHERE redriven_at IS NOT NULL")
            .await,
        2
    );
    let pending = env.command("dead-letters", &["list"]);
    assert!(
        output_text(&pending).contains("1 dead letter(s)")
            && output_text(&pending)
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{not_json} "))),
        "only the message that is not JSON is still pending:\n{}",
        output_text(&pending)
    );
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}

/// A database whose encoding is not UTF-8 (LATIN1) cannot hold every character an event may
/// carry. `run` refuses it at start-up (exit 2, naming the encoding) unless told to accept
/// it; then an event it cannot store (an id with `✓`) is dead-lettered as `unstorable` with its
/// payload, the events around it in the same partition apply, and the replica never stops
/// for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_latin1_database_is_refused_or_dead_letters_only_what_it_cannot_store() {
    let mut env = TestEnv::new(2).await;
    let name = format!("latin1_{:08x}", rand::random::<u32>());
    env.db
        .client()
        .await
        .batch_execute(&format!(
            "CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' \
             TEMPLATE template0"
        ))
        .await
        .expect("creating a LATIN1 database");
    env.db.url = inventory_consumer::store::with_database(&env.db.url, &name).expect("url");

    let mut refused = env.replica("refused", &[]);
    let status = refused.wait_abrupt_exit(EXIT);
    assert_eq!(status.code(), Some(2), "{}", refused.log());
    assert!(
        refused.log().contains("LATIN1") && refused.log().contains("database.allow_non_utf8"),
        "{}",
        refused.log()
    );
    assert_eq!(env.db.settled().await, 0, "refused before migrating");

    let mut replica = env.replica("r1", &[("database.allow_non_utf8", "true")]);
    // One SKU: one partition, so the event it cannot store shares batches with the others.
    env.produce_json(
        &[
            json!({"event_id": "latin-1", "type": "restock", "sku": "A", "quantity": 10}),
            json!({"event_id": "ENC-\u{2713}", "type": "restock", "sku": "A", "quantity": 5}),
            json!({"event_id": "latin-2", "type": "sale", "sku": "A", "quantity": 3}),
            json!({"event_id": "caf\u{e9}-1", "type": "sale", "sku": "A", "quantity": 1}),
        ],
        false,
    );
    wait_until("three events and one dead letter", SETTLE, || async {
        env.db.settled().await == 4
    })
    .await;
    assert!(replica.is_running(), "{}", replica.log());
    let unstorable = env
        .db
        .scalar(
            "SELECT count(*) FROM dead_letters WHERE error = 'unstorable'
               AND detail LIKE '%LATIN1%' AND position('\\x454e432de29c93'::bytea IN payload) > 0",
        )
        .await;
    assert_eq!(
        unstorable, 1,
        "kept with its payload and the database's words"
    );
    assert_eq!(
        env.db.stock().await.get("A"),
        Some(&6),
        "10 - 3 - 1: the events around it applied, once"
    );
    let (status, stats) = replica.terminate(EXIT);
    assert!(status.success(), "replica exit: {status}");
    assert_eq!((stats.applied, stats.dead_letters), (3, 1), "{stats:?}");
    let (ok, report) = env.verify(None);
    assert!(ok, "verify failed:\n{report}");
}
