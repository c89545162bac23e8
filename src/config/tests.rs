//! The settings' rules, layers and secrets.

use super::*;

const ALL: Needs = Needs {
    kafka: true,
    database: true,
};

fn valid() -> Settings {
    let mut s = Settings::default();
    s.kafka.brokers = "localhost:9092".into();
    s.database.url = "postgres://app:secret@localhost/inventory".into();
    s
}

fn error_of(s: &Settings) -> String {
    s.validate(ALL).unwrap_err().to_string()
}

#[test]
fn defaults_plus_required_values_are_valid() {
    valid().validate(ALL).unwrap();
    assert!(error_of(&Settings::default()).contains("kafka.brokers"));
}

#[test]
fn errors_name_the_key() {
    let mut s = valid();
    s.processing.batch_max_events = 0;
    assert!(error_of(&s).contains("processing.batch_max_events"));

    let mut s = valid();
    s.processing.drain_timeout_ms = Some(50_000);
    assert!(error_of(&s).contains("processing.drain_timeout_ms"));

    let mut s = valid();
    s.kafka
        .properties
        .insert("enable.auto.commit".into(), Value::from("true"));
    assert!(error_of(&s).contains("kafka.properties.enable.auto.commit"));

    let mut s = valid();
    s.kafka
        .properties
        .insert("enable.idempotence".into(), Value::from("false"));
    assert!(error_of(&s).contains("kafka.properties.enable.idempotence"));

    let mut s = valid();
    s.kafka.group_protocol = GroupProtocol::Consumer;
    s.kafka
        .properties
        .insert("session.timeout.ms".into(), Value::from(6000));
    assert!(error_of(&s).contains("kafka.properties.session.timeout.ms"));

    let mut s = valid();
    s.kafka
        .properties
        .insert("no.such.property".into(), Value::from("1"));
    assert!(error_of(&s).contains("kafka.properties"));

    let mut s = valid();
    s.database.connect_timeout_ms = 0;
    assert!(error_of(&s).contains("database.connect_timeout_ms"));

    let mut s = valid();
    s.processing.buffer_bytes = 100;
    assert!(error_of(&s).contains("processing.buffer_bytes"));

    let mut s = valid();
    s.database.url = "mysql:/nope".into();
    assert!(error_of(&s).contains("database.url"));

    let mut s = valid();
    s.http.addr = "nowhere".into();
    assert!(error_of(&s).contains("http.addr"));
}

#[test]
fn managed_properties_accept_the_consumers_own_value_in_any_spelling() {
    for (name, given) in [
        ("auto.offset.reset", "earliest"),
        ("auto.offset.reset", "smallest"),
        ("auto.offset.reset", "Beginning"),
        ("isolation.level", "read_committed"),
        ("enable.auto.commit", "false"),
        ("enable.auto.commit", "0"),
        ("enable.idempotence", "1"),
        ("acks", "-1"),
        ("acks", "all"),
    ] {
        let mut s = valid();
        s.kafka.properties.insert(name.into(), Value::from(given));
        assert!(s.validate(ALL).is_ok(), "{name}={given}");
    }
    for (name, given) in [
        ("auto.offset.reset", "latest"),
        ("auto.offset.reset", "largest"),
        ("isolation.level", "read_uncommitted"),
        ("enable.auto.commit", "true"),
        ("acks", "1"),
        ("group.instance.id", "replica-0"),
    ] {
        let mut s = valid();
        s.kafka.properties.insert(name.into(), Value::from(given));
        assert!(
            error_of(&s).contains(&format!("kafka.properties.{name}")),
            "{name}={given}"
        );
    }
}

#[test]
fn drain_must_fit_inside_the_session_timeout() {
    let mut s = valid();
    s.kafka
        .properties
        .insert("session.timeout.ms".into(), Value::from(6000));
    s.processing.drain_timeout_ms = Some(6000);
    assert!(error_of(&s).contains("below session.timeout.ms"));
    s.processing.drain_timeout_ms = Some(5000);
    s.validate(ALL).unwrap();
}

#[test]
fn a_retry_deadline_past_the_poll_interval_is_allowed_now_that_retries_do_not_hold_the_poll_loop() {
    let mut s = valid();
    s.processing.retry_deadline_ms = 600_000;
    s.validate(ALL).unwrap();
}

#[test]
fn liveness_allows_the_longest_rebalance_callback() {
    let mut s = valid();
    assert_eq!(s.liveness_window(), Duration::from_secs(60), "the floor");
    s.kafka.group_protocol = GroupProtocol::Consumer;
    s.processing.drain_timeout_ms = Some(100_000);
    s.validate(ALL).unwrap();
    assert!(s.liveness_window() >= s.drain_timeout() + Duration::from_secs(30));
}

#[test]
fn an_unset_drain_follows_the_session_timeout() {
    let mut s = valid();
    assert_eq!(s.drain_timeout(), Duration::from_secs(10));
    s.kafka
        .properties
        .insert("session.timeout.ms".into(), Value::from(6000));
    s.validate(ALL).unwrap();
    assert_eq!(s.drain_timeout(), Duration::from_secs(4));
    // KIP-848: the session is the broker's, not the client's.
    let mut s = valid();
    s.kafka.group_protocol = GroupProtocol::Consumer;
    assert_eq!(s.drain_timeout(), Duration::from_secs(10));
}

#[test]
fn properties_flatten_from_nested_and_underscored_names() {
    let mut s = valid();
    let nested = figment::value::Dict::from([("mechanism".to_owned(), Value::from("PLAIN"))]);
    s.kafka
        .properties
        .insert("sasl".into(), Value::from(nested));
    s.kafka
        .properties
        .insert("fetch_queue_backoff_ms".into(), Value::from(0));
    let p = s.kafka.flat_properties();
    assert_eq!(p["sasl.mechanism"], "PLAIN");
    assert_eq!(p["fetch.queue.backoff.ms"], "0");
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail returns figment::Error
fn layers_apply_in_the_documented_order() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            "[kafka]\nbrokers = \"file:9092\"\ntopic = \"from-file\"\n[processing]\nbatch_max_events = 7\n",
        )?;
        jail.set_env("DATABASE_URL", "postgres://u:pw@short/db");
        jail.set_env("INVENTORY_KAFKA__TOPIC", "from-env");
        // Injected by Kubernetes for a Service named inventory-consumer: not a setting.
        jail.set_env("INVENTORY_CONSUMER_SERVICE_HOST", "10.0.0.1");
        jail.set_env("INVENTORY_KAFKA__PROPERTIES__SASL_MECHANISM", "PLAIN");
        jail.set_env("INVENTORY_KAFKA__PROPERTIES__FETCH_QUEUE_BACKOFF_MS", "0");
        let s = Settings::load(
            Some(Path::new("c.toml")),
            &[("processing.batch_max_events".into(), "9".into())],
            ALL,
        )
        .map_err(|e| e.to_string())?;
        assert_eq!(s.kafka.brokers, "file:9092");
        assert_eq!(s.kafka.topic, "from-env");
        assert_eq!(s.database.url, "postgres://u:pw@short/db");
        assert_eq!(s.processing.batch_max_events, 9);
        assert_eq!(s.kafka.flat_properties()["sasl.mechanism"], "PLAIN");
        assert_eq!(s.kafka.flat_properties()["fetch.queue.backoff.ms"], "0");

        jail.set_env("INVENTORY_PROCESSING__BATCH_MAX_EVENTS", "lots");
        let err = Settings::load(Some(Path::new("c.toml")), &[], ALL).unwrap_err();
        assert!(
            err.to_string()
                .contains("processing.batch_max_events: invalid type"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn database_descriptions_hold_no_password() {
    for url in [
        "postgres://app:secret@db:5432/x",
        "postgres://app@db/x?password=secret",
        "host=db user=app password=secret dbname=x",
    ] {
        let d = describe_database(url);
        assert!(!d.contains("secret"), "{d}");
        assert!(d.starts_with("app@db:") && d.ends_with("/x"), "{d}");
    }
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail returns figment::Error
fn the_standard_otel_variables_configure_traces() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("DATABASE_URL", "postgres://u@db/x");
        jail.set_env("KAFKA_BROKERS", "k:9092");
        let s = Settings::load(None, &[], ALL).map_err(|e| e.to_string())?;
        assert!(
            !s.traces.enabled(),
            "tracing must be off without an endpoint"
        );

        jail.set_env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        jail.set_env("OTEL_SERVICE_NAME", "stock");
        jail.set_env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio");
        jail.set_env("OTEL_TRACES_SAMPLER_ARG", "0.1");
        let s = Settings::load(None, &[], ALL).map_err(|e| e.to_string())?;
        assert_eq!(s.traces.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(s.traces.service_name, "stock");
        assert_eq!(s.traces.sampler, "parentbased_traceidratio");
        assert!((s.traces.sampler_arg - 0.1).abs() < 1e-9);

        // The service's own variables win over the standard ones.
        jail.set_env("INVENTORY_TRACES__SERVICE_NAME", "mine");
        let s = Settings::load(None, &[], ALL).map_err(|e| e.to_string())?;
        assert_eq!(s.traces.service_name, "mine");

        jail.set_env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
        let err = Settings::load(None, &[], ALL).unwrap_err().to_string();
        assert!(err.contains("traces.protocol: only http/protobuf"), "{err}");
        jail.set_env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");

        jail.set_env("OTEL_TRACES_SAMPLER", "sometimes");
        let err = Settings::load(None, &[], ALL).unwrap_err().to_string();
        assert!(err.contains("traces.sampler: must be one of"), "{err}");
        Ok(())
    });
}
