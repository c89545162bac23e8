//! `config`: the settings a replica would run with, after every layer and the validation `run`
//! does, secrets masked; and the bounds derived from them (the drain, `/livez`'s window, the
//! longest a replica takes to stop), for checking a deployment before it starts.

use std::process::ExitCode;

use clap::Args;
use serde_json::{Value, json};

use crate::config::Settings;

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Print JSON (one object: `settings`, `derived`) instead of `key = value` lines.
    #[arg(long)]
    pub json: bool,
}

/// What stands in for a secret.
const MASK: &str = "********";

pub fn main(settings: &Settings, args: &ConfigArgs) -> anyhow::Result<ExitCode> {
    let report = json!({
        "settings": masked(settings)?,
        "derived": {
            "drain_timeout_ms": settings.drain_timeout().as_millis() as u64,
            "liveness_window_ms": settings.liveness_window().as_millis() as u64,
            "shutdown_bound_ms": crate::cli::run::shutdown_bound(settings).as_millis() as u64,
        },
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mut lines = Vec::new();
        flatten("", &report, &mut lines);
        println!("{}", lines.join("\n"));
    }
    Ok(ExitCode::SUCCESS)
}

/// The settings as JSON, with the database password and every secret-like Kafka property
/// (passwords, secrets, private keys) masked.
fn masked(settings: &Settings) -> anyhow::Result<Value> {
    let mut value = serde_json::to_value(settings)?;
    if let Some(url) = value.pointer_mut("/database/url") {
        *url = Value::from(mask_password(&settings.database.url));
    }
    if let Some(Value::Object(properties)) = value.pointer_mut("/kafka/properties") {
        properties.clear();
        for (name, v) in settings.kafka.flat_properties() {
            let secret = [
                "password",
                "secret",
                "key.pem",
                "private",
                "oauthbearer.config",
            ]
            .iter()
            .any(|s| name.contains(s));
            properties.insert(name, Value::from(if secret { MASK.to_owned() } else { v }));
        }
    }
    Ok(value)
}

/// `url` with its password masked. A URL that the `url` crate reads as PostgreSQL does (one
/// host) is shown whole with its password masked; any other form (several hosts, key=value)
/// only as `user@host:port/db`, built from the parsed settings, which hold no password.
fn mask_password(url: &str) -> String {
    let single_host = url::Url::parse(url)
        .ok()
        .filter(|u| u.host_str().is_some() && crate::store::tls::parse(url).is_ok());
    if let Some(mut parsed) = single_host {
        if parsed.password().is_some() {
            let _ = parsed.set_password(Some(MASK));
        }
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    MASK.into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        if pairs.iter().any(|(k, _)| k == "password") {
            parsed.query_pairs_mut().clear().extend_pairs(pairs);
        }
        return parsed.into();
    }
    let described = crate::config::describe_database(url);
    match crate::store::tls::parse(url) {
        Ok((config, _)) if config.get_password().is_some() => {
            format!("{described} (password {MASK})")
        }
        _ => described,
    }
}

/// `a.b = value` lines of a JSON object, in its order.
fn flatten(prefix: &str, value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push(format!("{prefix} = {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_in_every_url_form() {
        for url in [
            "postgres://app:s3cret@db:5432/x?sslmode=require",
            "postgres://app@db/x?password=s3cret",
            "host=db user=app password=s3cret dbname=x",
            "host=db user=app password = s3cret dbname=x",
            "host=db user=app password='s3cret and more' dbname=x",
            "postgres://app:s3cret@h1:5432,h2:5432/x",
        ] {
            let masked = mask_password(url);
            assert!(!masked.contains("s3cret"), "{url}: {masked}");
            assert!(masked.contains(MASK), "{url}: {masked}");
        }
        assert_eq!(mask_password("postgres://app@db/x"), "postgres://app@db/x");
    }
}
