//! `[traces]`: OpenTelemetry traces over OTLP (docs/operations.md, "Traces"). Off unless an
//! endpoint is set. The standard `OTEL_*` variables are short forms of these keys
//! ([`short_forms`]), so a deployment configured for any OpenTelemetry SDK works unchanged.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The samplers of the OpenTelemetry specification (`OTEL_TRACES_SAMPLER`).
pub const SAMPLERS: [&str; 6] = [
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracesSettings {
    /// Where spans go: the OTLP/HTTP traces URL (`http://collector:4318/v1/traces`). Empty:
    /// tracing off (the trace context is still carried from requests to their replies).
    pub endpoint: String,
    /// Only `http/protobuf` is built in.
    pub protocol: String,
    pub service_name: String,
    /// One of [`SAMPLERS`].
    pub sampler: String,
    /// The ratio of the `traceidratio` samplers, 0..=1.
    pub sampler_arg: f64,
}

impl Default for TracesSettings {
    fn default() -> Self {
        TracesSettings {
            endpoint: String::new(),
            protocol: "http/protobuf".into(),
            service_name: "inventory-consumer".into(),
            sampler: "parentbased_always_on".into(),
            sampler_arg: 1.0,
        }
    }
}

impl TracesSettings {
    pub fn enabled(&self) -> bool {
        !self.endpoint.is_empty()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.protocol != "http/protobuf" {
            return Err(ConfigError::key(
                "traces.protocol",
                format!(
                    "only http/protobuf is built in (OTLP over HTTP, port 4318), got `{}`",
                    self.protocol
                ),
            ));
        }
        if self.enabled() && !self.endpoint.starts_with("http://") {
            return Err(ConfigError::key(
                "traces.endpoint",
                "must be an http:// URL (TLS is not built in: send to a collector beside the \
                 replica, which may forward over TLS)",
            ));
        }
        if !SAMPLERS.contains(&self.sampler.as_str()) {
            return Err(ConfigError::key(
                "traces.sampler",
                format!("must be one of {}", SAMPLERS.join(", ")),
            ));
        }
        if !(0.0..=1.0).contains(&self.sampler_arg) {
            return Err(ConfigError::key("traces.sampler_arg", "must be in [0, 1]"));
        }
        if self.service_name.is_empty() {
            return Err(ConfigError::key("traces.service_name", "must not be empty"));
        }
        Ok(())
    }
}

/// The standard variables as `(key, value)` settings, in the order they apply (later wins), from
/// `var` (the environment). Empty values count as unset, as the specification says.
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is a base URL, to which the traces path is added;
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is used as it is. `OTEL_SDK_DISABLED=true` or
/// `OTEL_TRACES_EXPORTER=none` turn tracing off.
pub fn short_forms(var: impl Fn(&str) -> Option<String>) -> Vec<(&'static str, String)> {
    let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    let mut set = Vec::new();
    if let Some(base) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        set.push((
            "traces.endpoint",
            format!("{}/v1/traces", base.trim_end_matches('/')),
        ));
    }
    let simple = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "traces.endpoint"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "traces.protocol"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "traces.protocol"),
        ("OTEL_SERVICE_NAME", "traces.service_name"),
        ("OTEL_TRACES_SAMPLER", "traces.sampler"),
        ("OTEL_TRACES_SAMPLER_ARG", "traces.sampler_arg"),
    ];
    for (name, key) in simple {
        if let Some(value) = var(name) {
            set.push((key, value));
        }
    }
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    if disabled {
        set.push(("traces.endpoint", String::new()));
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forms(vars: &[(&str, &str)]) -> Vec<(&'static str, String)> {
        short_forms(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_base_endpoint_gets_the_traces_path_and_the_signal_one_wins() {
        assert_eq!(
            forms(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]),
            vec![("traces.endpoint", "http://c:4318/v1/traces".to_string())]
        );
        let both = forms(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/x"),
        ]);
        assert_eq!(
            both.last(),
            Some(&("traces.endpoint", "http://t:1/x".into()))
        );
    }

    #[test]
    fn empty_values_are_unset_and_disabled_turns_it_off() {
        assert!(forms(&[("OTEL_SERVICE_NAME", " ")]).is_empty());
        let off = forms(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ]);
        assert_eq!(off.last(), Some(&("traces.endpoint", String::new())));
    }
}
