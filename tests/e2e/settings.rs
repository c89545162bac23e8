//! Every setting a user can give either works or is refused at start-up, through the
//! configuration layer and the command line as users give them: each refusal exits 2 and names
//! the key, for every command, before the command connects to anything.

use std::process::{Command, Output};

use crate::support::{BIN, output_text};

/// Commands that load the settings, with arguments that would otherwise be valid.
const COMMANDS: &[&[&str]] = &[
    &["run"],
    &["migrate"],
    &["maintain"],
    &["verify"],
    &["status"],
    &["replay", "--to-offset", "0", "--dry-run"],
    &["dead-letters", "list"],
    &["pause", "--partition", "0"],
];

/// Runs `args` with `--set` pairs and environment variables: every required setting is given
/// (pointing at nothing that listens), so a command that got past validation would fail to
/// connect instead, with another exit code.
fn invoke(args: &[&str], sets: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KAFKA_BROKERS", "127.0.0.1:1")
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("INVENTORY_DATABASE__CONNECT_TIMEOUT_MS", "500");
    for (k, v) in env {
        cmd.env(k, v);
    }
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.output().expect("running the binary")
}

/// The command exits 2 with `key` named in what it printed.
fn assert_refused(out: &Output, key: &str, what: &str) {
    let text = output_text(out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: exit 2 expected:\n{text}"
    );
    assert!(
        text.contains(key),
        "{what}: the message names {key}:\n{text}"
    );
}

#[test]
fn settings_past_their_bounds_are_refused_by_every_command() {
    let refused: &[(&str, &str)] = &[
        // PostgreSQL's timeouts are 32-bit counts of milliseconds.
        (
            "database.statement_timeout_ms=2147483648",
            "database.statement_timeout_ms",
        ),
        ("database.lock_timeout_ms=0", "database.lock_timeout_ms"),
        (
            "database.idle_in_transaction_timeout_ms=99999999999",
            "database.idle_in_transaction_timeout_ms",
        ),
        (
            "database.connect_timeout_ms=86400000",
            "database.connect_timeout_ms",
        ),
        (
            "processing.retry_deadline_ms=18446744073709551615",
            "processing.retry_deadline_ms",
        ),
        (
            "processing.retry_backoff_max_ms=0",
            "processing.retry_backoff_max_ms",
        ),
        (
            "processing.commit_interval_ms=360000000",
            "processing.commit_interval_ms",
        ),
        ("reservations.max_ttl_s=0", "reservations.max_ttl_s"),
        ("reservations.max_ttl_s=31536001", "reservations.max_ttl_s"),
        (
            "history.dedupe_horizon_s=999999999999",
            "history.dedupe_horizon_s",
        ),
        // The start position, the isolation and static membership are the consumer's.
        (
            "kafka.properties.auto.offset.reset=latest",
            "kafka.properties.auto.offset.reset",
        ),
        (
            "kafka.properties.isolation.level=read_uncommitted",
            "kafka.properties.isolation.level",
        ),
        (
            "kafka.properties.group.instance.id=replica",
            "kafka.properties.group.instance.id",
        ),
        // A root certificate file that is not there.
        (
            "database.url=postgres://u@db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "database.url",
        ),
    ];
    for command in COMMANDS {
        for (set, key) in refused {
            let out = invoke(command, &[set], &[]);
            assert_refused(&out, key, &format!("{command:?} --set {set}"));
        }
    }
}

#[test]
fn a_default_ttl_beyond_the_maximum_is_refused_and_both_can_be_raised_together() {
    let out = invoke(&["verify"], &["reservations.default_ttl_s=700000"], &[]);
    assert_refused(&out, "reservations.default_ttl_s", "a default past a week");
    // Raised together they pass validation: `verify` then fails to connect (exit 3), which
    // shows that the settings were accepted.
    let out = invoke(
        &["verify"],
        &[
            "reservations.default_ttl_s=700000",
            "reservations.max_ttl_s=1000000",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
}

#[test]
fn the_consumers_own_values_of_managed_properties_are_accepted_from_the_environment() {
    // Giving the value the consumer sets itself is harmless; given as users give them in a
    // Deployment (environment variables, `_` for `.`).
    let out = invoke(
        &["verify"],
        &[],
        &[
            ("INVENTORY_KAFKA__PROPERTIES__AUTO_OFFSET_RESET", "earliest"),
            (
                "INVENTORY_KAFKA__PROPERTIES__ISOLATION_LEVEL",
                "read_committed",
            ),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    let out = invoke(
        &["verify"],
        &[],
        &[("INVENTORY_KAFKA__PROPERTIES__AUTO_OFFSET_RESET", "latest")],
    );
    assert_refused(
        &out,
        "kafka.properties.auto.offset.reset",
        "latest from the environment",
    );
}

/// The Deployment's grace period covers the longest a replica takes to stop with the
/// settings the manifests give it: the drain, then leaving the group and the process's own
/// bounded exit (docs/configuration.md: "drain timeout plus 8 s").
#[test]
fn the_deployments_grace_period_covers_the_longest_shutdown() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let deployment =
        std::fs::read_to_string(root.join("deploy/base/deployment.yaml")).expect("deployment");
    let grace: u64 = yaml_value(&deployment, "terminationGracePeriodSeconds")
        .and_then(|v| v.parse().ok())
        .expect("terminationGracePeriodSeconds in deploy/base/deployment.yaml");
    let configmap =
        std::fs::read_to_string(root.join("deploy/base/configmap.yaml")).expect("configmap");
    // The environment the pods get from the ConfigMap, through the configuration layer.
    let env: Vec<(String, String)> = configmap
        .split("\ndata:")
        .nth(1)
        .expect("the ConfigMap's data")
        .lines()
        .filter(|l| l.starts_with("  ") && !l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect();
    assert!(
        env.iter()
            .any(|(k, _)| k == "INVENTORY_PROCESSING__DRAIN_TIMEOUT_MS"),
        "the ConfigMap sets the drain: {env:?}"
    );
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // The Secret's URL (a password in it).
    env.push((
        "DATABASE_URL",
        "postgres://app:s3cret@127.0.0.1:1/inventory",
    ));
    let out = invoke(&["config", "--json"], &[], &env);
    assert!(out.status.success(), "{}", output_text(&out));
    let config: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("config --json prints JSON");
    let stop_ms = config["derived"]["shutdown_bound_ms"]
        .as_u64()
        .expect("derived.shutdown_bound_ms");
    let drain_ms = config["derived"]["drain_timeout_ms"]
        .as_u64()
        .expect("derived.drain_timeout_ms");
    assert!(stop_ms > drain_ms, "the bound includes the drain: {config}");
    assert!(
        stop_ms < grace * 1000,
        "a replica may take {stop_ms} ms to stop, past the grace period of {grace} s"
    );
    // And the secret stays out of what the command prints.
    assert!(
        !output_text(&out).contains("s3cret"),
        "{}",
        output_text(&out)
    );
    assert_eq!(
        config["settings"]["kafka"]["group_protocol"], "classic",
        "the manifests' protocol, through the configuration layer: {config}"
    );
}

/// The value of `key: value` in a YAML text (the first one; scalars only).
fn yaml_value<'a>(yaml: &'a str, key: &str) -> Option<&'a str> {
    yaml.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.trim())
}

/// The lock table is read at start-up: a server whose table is too small for
/// `database.max_replicas` replicas (the default 6) is refused with exit 2 and what to raise;
/// for one replica the same server serves it, in batches that take no more SKU locks than the
/// replica's share allows (one transaction at a time, fewer than 500 SKUs), exactly.
#[tokio::test(flavor = "multi_thread")]
async fn a_small_lock_table_is_refused_or_shared_out_in_smaller_batches() {
    use inventory_devtools::embedded::postgres::{PostgresOptions, ThrowawayPostgres};
    const EXIT: std::time::Duration = std::time::Duration::from_secs(30);
    let mut env = crate::support::TestEnv::new(2).await;
    // 40 locks a transaction for 20 connections: a table of 800, a share of 400 for one
    // replica, 66 for six.
    let small = tokio::task::spawn_blocking(|| {
        ThrowawayPostgres::start(PostgresOptions {
            max_connections: 20,
            max_locks_per_transaction: 40,
            ..PostgresOptions::default()
        })
    })
    .await
    .expect("joining")
    .expect("starting a server with a small lock table");
    env.db.url = small.url("postgres");

    let mut refused = env.replica("refused", &[]);
    let status = refused.wait_abrupt_exit(EXIT);
    let log = refused.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("max_locks_per_transaction") && log.contains("database.max_replicas = 6"),
        "{log}"
    );

    // A backlog: without the budget, batches would fill to 500.
    let expected = env.produce(&["--events", "3000", "--skus", "1000", "--seed", "5"]);
    let mut replica = env.replica("r1", &[("database.max_replicas", "1")]);
    env.wait_processed(
        expected.messages as i64,
        std::time::Duration::from_secs(120),
    )
    .await;
    let (_, metrics) = crate::support::http_get(&replica.http_addr().await, "/metrics");
    let locks = crate::support::metric(&metrics, "inventory_lock_budget_locks_per_batch", &[]);
    assert!((200.0..500.0).contains(&locks), "{locks} SKU locks a batch");
    assert_eq!(
        crate::support::metric(&metrics, "inventory_lock_budget_transactions", &[]),
        1.0
    );
    let (status, _) = replica.terminate(EXIT);
    assert!(status.success(), "replica exit: {status}");
    let batches = replica.batches();
    let largest = batches
        .iter()
        .map(|b| b.last_offset - b.first_offset + 1)
        .max()
        .unwrap_or(0);
    assert!(largest >= 200, "the backlog fills batches: {largest}");
    for b in &batches {
        assert!(
            ((b.last_offset - b.first_offset) as f64) < locks,
            "a batch of events of one line each takes at most {locks}: {b:?}"
        );
    }
    let (ok, report) = env.verify(Some(&expected));
    assert!(ok, "verify failed:\n{report}");
}

/// Every setting `config --json` prints (every key the configuration layer knows, since it
/// prints the whole loaded settings) has a row in docs/configuration.md's table, named in
/// backticks as users write it: a setting added without its documentation fails here.
#[test]
fn every_setting_is_documented() {
    let out = invoke(&["config", "--json"], &[], &[]);
    assert!(out.status.success(), "{}", output_text(&out));
    let config: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("config --json prints JSON");
    let mut keys = Vec::new();
    let sections = config["settings"].as_object().expect("settings by section");
    for (section, fields) in sections {
        for (key, _) in fields.as_object().expect("a section's fields") {
            keys.push(format!("{section}.{key}"));
        }
    }
    assert!(keys.len() > 30, "too few settings to check: {keys:?}");
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
    )
    .expect("reading docs/configuration.md");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !docs.contains(&format!("| `{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "settings missing from docs/configuration.md: {missing:?}"
    );
}
