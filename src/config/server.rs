//! `[http]` and `[log]`: where a replica serves its probes and metrics, and how it logs.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `json` or `pretty`; unset: pretty on a terminal, JSON otherwise.
    pub format: Option<LogFormat>,
    /// A tracing filter, e.g. `info` or `inventory_consumer=debug,rdkafka=warn`.
    pub level: String,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            addr: "0.0.0.0:8080".into(),
        }
    }
}

impl HttpSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.addr
            .parse::<SocketAddr>()
            .map(|_| ())
            .map_err(|e| ConfigError::key("http.addr", format!("not a socket address: {e}")))
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: None,
            level: "info".into(),
        }
    }
}

impl LogSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|e| ConfigError::key("log.level", e))
    }
}
